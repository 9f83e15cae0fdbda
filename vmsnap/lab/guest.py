"""The built-in tiny VM: the lab guest booted under QEMU with a guest agent, ready for real backups.

:class:`LabGuest` boots the image from :mod:`vmsnap.lab.image` with data disks, waits for qemu-ga, and hands
out a :class:`~vmsnap.vm.machine.QemuMachine`, the agent and an :class:`~vmsnap.runner.AgentRunner`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from vmsnap.errors import AgentError, CommandError, UsageError, VmsnapError
from vmsnap.image import qemu_img
from vmsnap.lab.image import GUEST_DATA_PREFIX, LabImage, build_lab_image
from vmsnap.lab.qemu import Accel, DriveSpec, QemuProcess, qemu_io
from vmsnap.lab.rootfs import ROOT_APPEND, ROOT_SERIAL, make_root_disk
from vmsnap.model import validate_name
from vmsnap.runner import CommandResult, LocalRunner, Runner
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.agent_runner import AgentRunner
from vmsnap.vm.machine import QemuMachine

DATA_SERIAL = GUEST_DATA_PREFIX
"""Serial of the default data disk; the guest formats it (when blank) and mounts it at :data:`DATA_MOUNT`."""

DATA_MOUNT = f"/mnt/{DATA_SERIAL}"


class LabGuestError(VmsnapError):
    """The lab guest did not boot or its agent never answered; the message carries the console's end."""

    default_hint = "see the console log named in the message; VMSNAP_ACCEL=tcg forces the slow but sure path"


@attrs.frozen
class FsckResult:
    """``e2fsck -fn`` of an image, run on the host.

    :param clean: e2fsck found nothing to fix (exit status 0)
    :param exit_code: e2fsck's exit status (4: errors left uncorrected)
    :param output: what it printed
    """

    clean: bool
    exit_code: int
    output: str


class LabGuest:
    """The lab guest under QEMU: a context manager that boots it and stops it (by pid).

    By default it gets one blank 64 MiB qcow2 data disk (serial ``data``, node ``fmt-data``) that the guest
    formats as ext4 and mounts at ``/mnt/data``. More disks come as ``extra_drives``; a disk whose serial
    starts with ``data`` is formatted (when blank) and mounted at ``/mnt/<serial>``, the others are left raw.

    >>> with LabGuest(Path("/tmp/lab")) as guest:            # doctest: +SKIP
    ...     guest.write_file("/mnt/data/hello", b"hi\\n")
    ...     guest.run(["sha256sum", "/mnt/data/hello"]).stdout

    :param workdir: where the data disk image and logs go
    :param extra_drives: more disks (their images must exist)
    :param data_disk_size: size of the default data disk; None: no default data disk
    :param name: the VM's name (``-name``, and the machine's name in backups)
    :param image: a built lab image (default: :func:`build_lab_image`, cached)
    :param accel: force "kvm" or "tcg" (default: ``VMSNAP_ACCEL``, else TCG unless KVM is hardware)
    :param boot_timeout: seconds to wait for the agent's first answer
    :param root_disk: boot with the root filesystem on this qcow2 image (serial ``root``, made by
        :func:`vmsnap.lab.rootfs.make_root_disk` when missing) instead of running from the initramfs
    :param display: give the guest a VGA device with the kernel's warnings and errors on it (its early VGA
        console, kept: ``earlyprintk=vga,keep``), for screenshots
    :param extra_args: more QEMU arguments (e.g. ``-drive if=pflash,…``)
    """

    def __init__(
        self,
        workdir: Path,
        *,
        extra_drives: Sequence[DriveSpec] = (),
        data_disk_size: str | None = "64M",
        name: str = "labvm",
        memory_mb: int = 512,
        image: LabImage | None = None,
        accel: Accel | None = None,
        boot_timeout: float = 120.0,
        host_runner: Runner | None = None,
        root_disk: Path | None = None,
        display: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.name = validate_name(name, "VM name")
        self.extra_drives = list(extra_drives)
        self.data_disk_size = data_disk_size
        self.memory_mb = memory_mb
        self.image = image
        self.accel = accel
        self.boot_timeout = boot_timeout
        self.root_disk = Path(root_disk) if root_disk is not None else None
        self.display = display
        self.extra_args = list(extra_args)
        self.host_runner: Runner = host_runner if host_runner is not None else LocalRunner()
        self.data_image: Path | None = (
            self.workdir / f"{DATA_SERIAL}.qcow2" if data_disk_size is not None else None
        )
        self.process: QemuProcess | None = None
        self._rundir: Path | None = None
        self._machine: QemuMachine | None = None
        self._runner: AgentRunner | None = None
        self.boot_seconds = 0.0

    # -- life cycle

    def start(self) -> LabGuest:
        """Build (or reuse) the image, boot, and wait until the agent answers ``guest-ping``.

        :raise LabGuestError: QEMU exited, or the agent did not answer within ``boot_timeout``
        """
        image = self.image or build_lab_image()
        self.image = image
        self.workdir.mkdir(parents=True, exist_ok=True)
        drives: list[DriveSpec] = []
        append = image.append
        extra_args = ["-no-reboot", *self.extra_args]
        if self.root_disk is not None:
            if not self.root_disk.exists():
                make_root_disk(image, self.root_disk, runner=self.host_runner)
            drives.append(DriveSpec(self.root_disk, ROOT_SERIAL, serial=ROOT_SERIAL))
            append = f"{append} {ROOT_APPEND}"
        if self.display:
            # PVH sets up no text console: the kernel's early VGA console, kept, shows its messages (and
            # what the init writes to /dev/kmsg) on the screen; /dev/console stays the serial port
            append = f"{append} earlyprintk=vga,keep"
            extra_args += ["-device", "VGA"]
        if self.data_image is not None and self.data_disk_size is not None:
            if not self.data_image.exists():
                self.host_runner.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", str(self.data_image), self.data_disk_size]
                )
            drives.append(DriveSpec(self.data_image, DATA_SERIAL, serial=DATA_SERIAL))
        drives += self.extra_drives
        # unix socket paths are limited to 107 bytes: keep QEMU's sockets in a short private directory
        self._rundir = Path(tempfile.mkdtemp(prefix="vmsnap-lab-"))
        started = time.monotonic()
        self.process = QemuProcess(
            self._rundir,
            drives,
            name=self.name,
            memory_mb=self.memory_mb,
            kernel=image.kernel,
            initrd=image.initrd,
            append=append,
            agent=True,
            accel=self.accel,
            extra_args=extra_args,
        )
        try:
            self.process.start()
            self._wait_for_agent(started)
            self._machine = QemuMachine(self.process.qmp_socket, self.process.agent_socket, name=self.name)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _wait_for_agent(self, started: float) -> None:
        assert self.process is not None
        probe = GuestAgent.from_socket(self.process.agent_socket, timeout=2.0)
        try:
            while True:
                if not self.process.alive():
                    raise LabGuestError(f"the lab guest's QEMU exited while booting: {self._console_tail()}")
                if self.process.agent_socket.exists() and probe.is_responding(timeout=1.0):
                    return
                if time.monotonic() - started > self.boot_timeout:
                    raise LabGuestError(
                        f"the lab guest's agent did not answer within {self.boot_timeout:g} s; "
                        f"console: {self._console_tail()}"
                    )
                time.sleep(0.2)
        finally:
            probe.close()

    def _console_tail(self, lines: int = 8) -> str:
        if self.process is None:
            return ""
        try:
            text = self.process.console.read_text(errors="replace")
        except OSError:
            return f"(no console log at {self.process.console})"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Sync the guest's disks when it can, quit QEMU, kill it if it lingers (only the pid we started)."""
        if self._machine is not None:
            with contextlib.suppress(VmsnapError):
                agent = self._machine.agent()
                if agent is not None and agent.fsfreeze_status() == "thawed":
                    AgentRunner(agent, self.name).run(["sync"], timeout=30)
            self._machine.close()
            self._machine = None
        self._runner = None
        if self.process is not None:
            self.process.stop()
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def __enter__(self) -> LabGuest:
        if self._machine is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what callers use

    @property
    def machine(self) -> QemuMachine:
        """The running guest as a :class:`QemuMachine` (QMP + agent)."""
        if self._machine is None:
            raise LabGuestError("the lab guest is not running", hint="call start() or use it in a with block")
        return self._machine

    @property
    def agent(self) -> GuestAgent:
        """The guest agent."""
        agent = self.machine.agent()
        assert agent is not None
        return agent

    @property
    def agent_socket(self) -> Path:
        """The host end of the agent channel."""
        assert self.process is not None
        return self.process.agent_socket

    @property
    def qmp_socket(self) -> Path:
        """QEMU's QMP socket."""
        assert self.process is not None
        return self.process.qmp_socket

    @property
    def pid(self) -> int | None:
        """QEMU's pid."""
        return self.process.pid if self.process is not None else None

    @property
    def runner(self) -> AgentRunner:
        """Runs argv lists inside the guest (``host`` is ``guest:<name>``)."""
        agent = self.agent
        # machine.close() drops its agent; a runner kept on the old one would open a second connection,
        # and QEMU serves the agent socket to one client at a time
        if self._runner is None or self._runner.agent is not agent:
            self._runner = AgentRunner(agent, self.name)
        return self._runner

    def run(
        self, argv: Sequence[str], *, ok_codes: Sequence[int] = (0,), input: bytes | str | None = None
    ) -> CommandResult:
        """Run a command in the guest (see :class:`AgentRunner`)."""
        return self.runner.run(argv, ok_codes=ok_codes, input=input, timeout=300)

    def sh(self, script: str, *, ok_codes: Sequence[int] = (0,)) -> CommandResult:
        """Run a POSIX sh script in the guest (dash)."""
        return self.run(["sh", "-c", script], ok_codes=ok_codes)

    def write_file(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Write a whole file in the guest (guest-file-*), optionally chmod it."""
        self.agent.write_file(path, data)
        if mode is not None:
            self.run(["chmod", f"{mode:o}", path])

    def read_file(self, path: str) -> bytes:
        """Read a whole file from the guest."""
        return self.agent.read_file(path)

    def sync(self) -> None:
        """``sync`` in the guest, then flush QEMU's caches of every disk so the image files are current."""
        self.run(["sync"])
        for drive in self.drives:
            qemu_io(self.machine.qmp(), drive.id, "flush")

    @property
    def drives(self) -> list[DriveSpec]:
        """The disks attached at boot."""
        return list(self.process.drives) if self.process is not None else []

    def is_thawed(self) -> bool:
        """True when the agent answers and says ``thawed``."""
        try:
            return self.agent.fsfreeze_status() == "thawed"
        except AgentError:
            return False


@contextlib.contextmanager
def _raw_copy(
    image: Path, *, snapshot: str | None, fmt: str, scratch: Path | None, runner: Runner
) -> Iterator[Path]:
    """A raw copy of ``image`` (or of its internal snapshot ``snapshot``) in a temporary directory under
    ``scratch`` (default: beside the image), read with ``-U`` so that a running QEMU may hold the image.

    :raise CommandError: qemu-img could not read it
    """
    opts = {"snapshot.name": snapshot} if snapshot is not None else None
    source = qemu_img.image_args(image, fmt, image_opts=opts, force_share=True)
    with tempfile.TemporaryDirectory(prefix=".raw-", dir=scratch or image.parent) as tmp:
        raw = Path(tmp) / "fs.raw"
        runner.run(["qemu-img", "convert", *source, "-O", "raw", str(raw)], timeout=600)
        yield raw


def fsck_image(
    image: Path,
    *,
    snapshot: str | None = None,
    fmt: str = "qcow2",
    scratch: Path | None = None,
    runner: Runner | None = None,
) -> FsckResult:
    """``e2fsck -fn`` of the ext4 filesystem in a disk image (or one of its internal snapshots), on the host.

    The image is converted to a raw scratch file first (``qemu-img convert -U``, so a running QEMU may
    hold it); e2fsck never writes.

    :param snapshot: an internal snapshot's name, read with ``-l snapshot.name=…``
    :param scratch: directory for the raw copy (default: next to the image)
    :raise CommandError: qemu-img could not read the image, or e2fsck failed to run at all (exit ≥ 8)
    """
    run = runner if runner is not None else LocalRunner()
    with _raw_copy(image, snapshot=snapshot, fmt=fmt, scratch=scratch, runner=run) as raw:
        result = run.run(["e2fsck", "-fn", str(raw)], ok_codes=(0, 1, 2, 4), timeout=600)
        return FsckResult(result.exit_code == 0, result.exit_code, result.stdout + result.stderr)


def read_image_file(
    image: Path,
    path: str,
    *,
    snapshot: str | None = None,
    fmt: str = "qcow2",
    scratch: Path | None = None,
    runner: Runner | None = None,
) -> bytes:
    """The content of ``path`` inside the ext4 filesystem of a disk image, read on the host with debugfs.

    :param path: absolute path inside the filesystem (debugfs takes it in a command string: no spaces)
    :raise UsageError: a path debugfs could misread
    :raise CommandError: the image or the file cannot be read
    """
    if not path.startswith("/") or any(c.isspace() or c in "\"'\\" for c in path):
        raise UsageError(
            f"cannot read {path!r} from an image", hint="give an absolute path without spaces or quotes"
        )
    run = runner if runner is not None else LocalRunner()
    with _raw_copy(image, snapshot=snapshot, fmt=fmt, scratch=scratch, runner=run) as raw:
        out = raw.with_name("out")
        run.run(["debugfs", "-R", f"dump -p {path} {out}", str(raw)], timeout=600)
        if not out.exists():
            raise CommandError(["debugfs", "dump", path], 1, "", f"{path} not found in {image}")
        return out.read_bytes()
