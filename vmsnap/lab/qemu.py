"""Start and stop real QEMU processes for the demo, the tests and the benchmarks.

:class:`QemuProcess` runs ``qemu-system-x86_64`` with ``-blockdev`` disks, a QMP socket and optionally a guest
agent channel; :class:`StorageDaemon` runs ``qemu-storage-daemon``. Both stop only the process they started
(by pid, through :mod:`vmsnap.processes`) and choose the accelerator by probing, never by assuming this host's
quirks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import attrs

from vmsnap import processes
from vmsnap.errors import VmsnapError
from vmsnap.lab.image.contents import AGENT_PORT
from vmsnap.runner import child_environment
from vmsnap.sockets import unix_listening as listening
from vmsnap.vm.qmp import QMPMonitor

Accel = Literal["kvm", "tcg"]


def kvm_usable() -> bool:
    """True when ``/dev/kvm`` opens read-write (KVM may still be slow: see :func:`kvm_is_hardware`)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def kvm_is_hardware() -> bool:
    """True when KVM is backed by VT-x/AMD-V (kvm_intel / kvm_amd), not a software nested module.

    Software KVM modules (e.g. ``kvm_pvm``) run a guest with no OS fine but boot a stock Linux kernel very
    slowly, so booting guests prefers TCG there.
    """
    modules = Path("/sys/module")
    return kvm_usable() and ((modules / "kvm_intel").exists() or (modules / "kvm_amd").exists())


def choose_accel(*, booting_guest: bool) -> Accel:
    """The accelerator to use: ``VMSNAP_ACCEL`` if set, else KVM when it is usable (and, for a booting guest,
    hardware-backed), else TCG."""
    forced = os.environ.get("VMSNAP_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return "kvm" if forced == "kvm" else "tcg"
    if booting_guest:
        return "kvm" if kvm_is_hardware() else "tcg"
    return "kvm" if kvm_usable() else "tcg"


@attrs.frozen
class DriveSpec:
    """One disk to attach.

    :param path: image file
    :param id: the guest device's qdev id (also the disk's name in vmsnap)
    :param format: "qcow2" or "raw"
    :param bus: "virtio" (virtio-blk) or "scsi" (scsi-hd on virtio-scsi)
    :param serial: serial the guest sees (``/dev/disk/by-id/virtio-SERIAL``)
    """

    path: Path
    id: str
    format: str = "qcow2"
    bus: Literal["virtio", "scsi"] = "virtio"
    serial: str | None = None
    cache_direct: bool = False

    @property
    def node_name(self) -> str:
        return f"fmt-{self.id}"

    @property
    def file_node_name(self) -> str:
        return f"file-{self.id}"

    def blockdev_args(self, flag: str = "-blockdev") -> list[str]:
        """The two block nodes of this disk (``file-ID`` under ``fmt-ID``) as QEMU options, ``flag`` each."""
        protocol: dict[str, object] = {
            "driver": "file",
            "filename": str(self.path),
            "node-name": self.file_node_name,
        }
        if self.cache_direct:
            protocol["cache"] = {"direct": True}
        fmt = {"driver": self.format, "file": self.file_node_name, "node-name": self.node_name}
        return [flag, _json(protocol), flag, _json(fmt)]


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class QemuStartError(VmsnapError):
    """QEMU exited or did not open its QMP socket; the message carries the end of its log."""


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class _Launched:
    """What :class:`QemuProcess` and :class:`StorageDaemon` share: a QEMU program this process started (in
    its own session, output to ``NAME.log``) that serves QMP on ``workdir/NAME.qmp``, stopped only by its pid.

    :param workdir: where the socket and the log go (created when missing)
    :param drives: the disks given on the command line
    :param name: the base name of the socket and the log
    """

    what: ClassVar[str]
    """The program, for messages."""

    def __init__(self, workdir: Path, drives: Sequence[DriveSpec], name: str) -> None:
        self.workdir = Path(workdir)
        self.drives = list(drives)
        self.qmp_socket = self.workdir / f"{name}.qmp"
        self.log = self.workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The full command line (an argv list)."""
        raise NotImplementedError

    def _launch(self, *, timeout: float, stop_timeout: float) -> None:
        """Start :meth:`argv` and wait until it listens on its QMP socket.

        :param stop_timeout: when it never listens, SIGTERM it and SIGKILL it after this long (0: SIGKILL now)
        :raise QemuStartError: it exited early, or did not listen within ``timeout`` (it is stopped then)
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.qmp_socket.unlink()
        with open(self.log, "wb") as out:
            process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_environment(),
            )
        self.process = process
        deadline = time.monotonic() + timeout
        while not listening(self.qmp_socket):
            if process.poll() is not None:
                raise QemuStartError(
                    f"{self.what} exited with code {process.returncode}: {_log_tail(self.log)}",
                    hint=f"see {self.log}",
                )
            if time.monotonic() > deadline:
                processes.stop_child(process, timeout=stop_timeout)
                raise QemuStartError(
                    f"{self.what} did not open {self.qmp_socket} within {timeout:g} s", hint=f"see {self.log}"
                )
            time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def monitor(self) -> QMPMonitor:
        """A new, connected QMP monitor (close it when done: QEMU serves one client at a time)."""
        return QMPMonitor(self.qmp_socket).connect()

    def _stop_process(self, *, timeout: float) -> None:
        """SIGTERM, SIGKILL after ``timeout`` (0: at once), by pid; then reap it."""
        if self.process is not None:
            processes.stop_child(self.process, timeout=timeout)


class QemuProcess(_Launched):
    """A ``qemu-system-x86_64`` this process started, with QMP (and maybe agent) unix sockets in ``workdir``.

    :param workdir: where sockets and logs go (must exist)
    :param drives: disks on ``-blockdev`` node names ``fmt-<id>`` over ``file-<id>``
    :param kernel/initrd/append: direct kernel boot (the lab guest); without a kernel the VM has no OS
    :param agent: add a virtio-serial guest agent channel on ``workdir/agent.sock``
    :param accel: force an accelerator; default :func:`choose_accel`
    """

    what = "QEMU"

    def __init__(
        self,
        workdir: Path,
        drives: Sequence[DriveSpec] = (),
        *,
        name: str = "vm",
        memory_mb: int = 256,
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str | None = None,
        agent: bool = False,
        accel: Accel | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, drives, name)
        self.name = name
        self.memory_mb = memory_mb
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.agent = agent
        self.accel: Accel = accel or choose_accel(booting_guest=kernel is not None)
        self.extra_args = list(extra_args)
        self.agent_socket = self.workdir / f"{name}.qga"
        self.console = self.workdir / f"{name}.console"

    def argv(self) -> list[str]:
        cpu = "qemu64"
        argv = [
            "qemu-system-x86_64",
            "-name",
            self.name,
            "-machine",
            f"q35,accel={self.accel}",
            "-cpu",
            cpu,
            "-m",
            str(self.memory_mb),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-serial",
            f"file:{self.console}",
        ]
        if any(d.bus == "scsi" for d in self.drives):
            argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        for drive in self.drives:
            argv += drive.blockdev_args()
            serial = f",serial={drive.serial}" if drive.serial else ""
            if drive.bus == "scsi":
                argv += ["-device", f"scsi-hd,drive={drive.node_name},id={drive.id}{serial}"]
            else:
                argv += ["-device", f"virtio-blk-pci,drive={drive.node_name},id={drive.id}{serial}"]
        if self.agent:
            argv += [
                "-chardev",
                f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
                "-device",
                "virtio-serial-pci,id=vser0",
                "-device",
                f"virtserialport,chardev=qga0,name={AGENT_PORT}",
            ]
        if self.kernel is not None:
            argv += ["-kernel", str(self.kernel)]
            if self.initrd is not None:
                argv += ["-initrd", str(self.initrd)]
            if self.append:
                argv += ["-append", self.append]
            argv += ["-device", "virtio-rng-pci"]
        return argv + self.extra_args

    def start(self, *, timeout: float = 30.0) -> QemuProcess:
        """Start QEMU and wait for its QMP socket.

        :raise QemuStartError: QEMU exited early or never opened the socket (with its log's last lines)
        """
        with contextlib.suppress(FileNotFoundError):
            self.agent_socket.unlink()
        # SIGKILL when it never listens: nothing of a VM that never got going needs a clean quit
        self._launch(timeout=timeout, stop_timeout=0)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        """Quit QEMU cleanly (QMP ``quit``, so persistent bitmaps are written), then kill it if it lingers."""
        if not self.alive():
            return
        try:
            with self.monitor() as qmp:
                qmp.quit()
        except VmsnapError:
            pass
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the QEMU we started (by pid) and reap it."""
        self._stop_process(timeout=0)

    def __enter__(self) -> QemuProcess:
        if not self.alive():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StorageDaemon(_Launched):
    """A ``qemu-storage-daemon`` this process started, exporting nothing until told over QMP."""

    what = "qemu-storage-daemon"

    def __init__(self, workdir: Path, drives: Sequence[DriveSpec] = (), *, name: str = "qsd") -> None:
        super().__init__(workdir, drives, name)

    def argv(self) -> list[str]:
        argv = ["qemu-storage-daemon", "--chardev", f"socket,path={self.qmp_socket},server=on,wait=off,id=m0"]
        argv += ["--monitor", "chardev=m0"]
        for drive in self.drives:
            argv += drive.blockdev_args("--blockdev")
        return argv

    def start(self, *, timeout: float = 15.0) -> StorageDaemon:
        """Start the daemon and wait for its QMP socket.

        :raise QemuStartError: it exited early or never opened the socket (with its log's last lines)
        """
        self._launch(timeout=timeout, stop_timeout=10)
        return self

    def stop(self) -> None:
        """Stop the daemon we started (SIGTERM, then SIGKILL after 10 s), by pid."""
        self._stop_process(timeout=10)

    def __enter__(self) -> StorageDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def qemu_io(monitor: QMPMonitor, device: str, command: str) -> str:
    """Run a ``qemu-io`` command (e.g. ``write -P 0x5a 0 1M``) on a guest device through HMP.

    Writes land exactly as a guest's would (through the device's block backend), which is how tests
    change a running VM's disk without a guest OS. ``device`` is a qdev id; virtio-blk devices are
    addressed by their ``virtio-backend`` QOM path.

    :raise VmsnapError: qemu-io reported an error
    """
    target = device
    if not device.startswith("/"):
        for block in monitor.query_block():
            qdev = str(block.get("qdev", ""))
            if qdev.rstrip("/").split("/")[-1] == device or f"/peripheral/{device}/" in qdev + "/":
                target = qdev
                break
    out = monitor.hmp(f'qemu-io -d {target} "{command}"')
    if any(word in out.lower() for word in ("error", "failed", "not found", "invalid")):
        raise VmsnapError(f"qemu-io {command!r} on {device} failed: {out.strip()}")
    return out
