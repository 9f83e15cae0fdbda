"""Boot a bare QEMU's backup: its recorded command line rebuilt (:func:`vmsnap.verify_boot.plan`'s
overlays, a new name and UUID, the session's own QMP, agent and console, a restricted NIC) and started as a
process of this one's, with ``-pidfile`` in the session so that :func:`~vmsnap.restore.boot_session.recover`
finds it even when this process died before recording its pid.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import attrs

from vmsnap import processes
from vmsnap.errors import VmsnapError
from vmsnap.files import write_atomic
from vmsnap.restore.boot_session import PID_FILE, BootSession, BootStartError
from vmsnap.vm.machine_state import NVRAM, MachineState
from vmsnap.vm.qemu_cmdline import BootDisk, BootPlan, parse_argv, parse_opts, rebuild
from vmsnap.vm.qmp import QMPMonitor

START_TIMEOUT = 30.0


@attrs.define
class QemuCopy:
    """A running copy of a bare QEMU.

    :param process: the QEMU process (this process's child)
    :param qmp: its QMP socket
    :param agent: its guest agent socket
    :param console: its serial console log
    :param accelerator: "kvm" or "tcg" (from its command line)
    """

    process: subprocess.Popen[bytes]
    qmp: Path
    agent: Path
    console: Path
    accelerator: str
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def monitor(self) -> QMPMonitor:
        return QMPMonitor(self.qmp).connect()

    def stop(self) -> None:
        """``quit`` over QMP, then SIGTERM/SIGKILL by pid (only the process this one started)."""
        if self.alive():
            with contextlib.suppress(VmsnapError), self.monitor() as qmp:
                qmp.quit()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        processes.stop_child(self.process, timeout=5)


def accelerator_of(argv: list[str]) -> str:
    """The accelerator a QEMU command line asks for ("kvm", "tcg"; "" when it names none)."""
    _, options = parse_argv(argv)
    found = ""
    for option in options:
        if option.flag == "enable-kvm":
            found = "kvm"
        elif option.flag in ("machine", "M", "accel") and option.value:
            for key, value in parse_opts(option.value):
                if key == "accel" or (option.flag == "accel" and key is None):
                    found = value.split(":")[0]
    return found


def start_copy(
    session: BootSession,
    state: MachineState,
    overlays: Mapping[str, Path],
    *,
    name: str,
    ports: Mapping[int, int],
) -> QemuCopy:
    """Start the copy of the VM ``state`` describes on ``overlays`` (disk name → overlay).

    :raise UnsupportedError: the command line has an option that would touch what the VM uses
    :raise BootStartError: QEMU exited or did not open its QMP socket
    """
    assert state.argv is not None
    directory = session.directory
    pflash: dict[str, Path] = {}
    if NVRAM in state.files and state.nvram:
        variables = directory / "vars.fd"
        write_atomic(variables, state.files[NVRAM])
        pflash[state.nvram] = variables
    disks = tuple(
        BootDisk(d.node_name, d.file, overlays[d.name], d.qdev) for d in state.disks if d.name in overlays
    )
    plan = BootPlan(
        disks=disks,
        qmp=directory / "qmp.sock",
        agent=directory / "qga.sock",
        console=directory / "console.log",
        name=name,
        uuid=str(uuid.uuid4()),
        ports=dict(ports),
        pflash_vars=pflash,
    )
    argv = [*rebuild(list(state.argv), plan), "-pidfile", str(directory / PID_FILE)]
    cwd = state.cwd if state.cwd and os.path.isdir(state.cwd) else str(directory)
    log = directory / "qemu.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    session.record(
        qemu={
            "pid": process.pid,
            "start_time": processes.start_time(process.pid),
            "program": Path(argv[0]).name,
        }
    )
    copy = QemuCopy(process, plan.qmp, plan.agent, plan.console, accelerator_of(argv), log)
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(plan.qmp):
        if not copy.alive() or time.monotonic() > deadline:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            copy.stop()
            raise BootStartError(
                f"the booted copy's QEMU did not start: {tail or 'no output'}", hint=f"see {log}"
            )
        time.sleep(0.05)
    return copy


def _listening(path: Path) -> bool:
    import socket

    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
