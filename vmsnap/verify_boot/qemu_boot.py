"""Boot a bare QEMU's backup: its recorded command line rebuilt (:func:`~vmsnap.vm.qemu_rebuild.rebuild`:
the session's overlays, a new name and UUID, the session's own QMP, agent and console, a restricted NIC)
and started as a process of this one's, with ``-pidfile`` in the session so that
:func:`~vmsnap.restore.boot_session.recover` finds it even when this process died before recording its pid.

Nothing of the record is run as it is: the program is this host's ``qemu-system-<arch>`` found in ``PATH``
(the record only names the architecture), and its environment is vmsnap's without secrets
(:func:`~vmsnap.runner.child_environment`). Its working directory is the VM's recorded one when that
directory exists here (relative paths of the command line mean what they meant), else the session: every
file the rebuilt command line still names is only read. A VM that ran with ``-runas USER`` boots as that
user too: the copy never has more privileges than the VM had (the files it needs are opened before QEMU
drops to the user, and its screenshot is written through a descriptor this process opened).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import attrs

from vmsnap import processes
from vmsnap.errors import UnsupportedError, VmsnapError
from vmsnap.files import write_atomic
from vmsnap.restore.boot_session import PID_FILE, BootSession, BootStartError
from vmsnap.runner import child_environment
from vmsnap.sockets import unix_listening
from vmsnap.verify_boot.probe import screenshot
from vmsnap.vm.machine_state import NVRAM, MachineState
from vmsnap.vm.qemu_cmdline import is_qemu_program, parse_argv, parse_opts
from vmsnap.vm.qemu_rebuild import BootDisk, BootPlan, rebuild
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
    :param log: its standard output and error
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

    def screenshot(self, path: Path) -> str | None:
        """Its screen into ``path`` (PNG, made 0600 here and passed to QEMU as a descriptor, so a copy that
        dropped to a ``-runas`` user writes it too); None on success, else why there is none."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with self.monitor() as monitor:
                fdset = monitor.add_fd(fd)
                try:
                    return screenshot(monitor, path, target=f"/dev/fdset/{fdset}")
                finally:
                    with contextlib.suppress(VmsnapError):
                        monitor.execute("remove-fd", {"fdset-id": fdset})
        finally:
            os.close(fd)

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


def host_qemu(recorded: str, *, path: str | None = None) -> str:
    """This host's QEMU for a recorded program: ``qemu-system-<arch>`` of the same ``<arch>``, from ``PATH``.

    :raise UnsupportedError: the record names no ``qemu-system-*``
    :raise BootStartError: this host has no such QEMU
    """
    name = Path(recorded).name
    if not is_qemu_program(name):
        raise UnsupportedError(f"the recorded program {recorded!r} is no qemu-system-*")
    found = shutil.which(name, path=path)
    if found is None:
        raise BootStartError(
            f"this host has no {name} in PATH to boot the copy with",
            hint=f"install QEMU for that architecture (Debian: qemu-system-{name.rsplit('-', 1)[-1]})",
        )
    return found


def runas_user(argv: list[str]) -> pwd.struct_passwd | None:
    """The user a command line's ``-runas`` names, or None without one.

    :raise UnsupportedError: that user does not exist on this host
    """
    _, options = parse_argv(argv)
    names = [o.value for o in options if o.flag == "runas" and o.value]
    if not names:
        return None
    try:
        return pwd.getpwnam(names[-1])
    except KeyError:
        raise UnsupportedError(
            f"the VM ran with -runas {names[-1]}, a user this host does not have",
            hint="boot the copy on a host that has that user",
        ) from None


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
    program = host_qemu(state.argv[0])
    argv = [*rebuild(list(state.argv), plan, program=program), "-pidfile", str(directory / PID_FILE)]
    runas_user(argv)  # QEMU drops to that user before the guest runs: it must exist here
    log = directory / "qemu.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=state.cwd if state.cwd and os.path.isdir(state.cwd) else directory,
            env=child_environment(),
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
    while not unix_listening(plan.qmp):
        if not copy.alive() or time.monotonic() > deadline:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            copy.stop()
            raise BootStartError(
                f"the booted copy's QEMU did not start: {tail or 'no output'}", hint=f"see {log}"
            )
        time.sleep(0.05)
    return copy
