"""Recorded daemons: NBD/FUSE servers (qemu-storage-daemon, nbdkit) that outlive the process that started
them, each with a private directory and a record in it, so that any later process finds them and stops them
by pid.

A daemon's private directory (``<parent>/<prefix>XXXXXXXX/``, 0700) holds its record ``daemon.json`` (0600:
program, pid, start time, sockets, FUSE files), its sockets, its pid file and whatever its wrapper puts there.
A recorded pid is signalled only while ``/proc/PID`` still shows the program, the private directory on its
command line and the recorded start time (:func:`vmsnap.processes.matches`), so a reused pid is never
signalled. The wrappers (:mod:`vmsnap.image.storage_daemon`, :mod:`vmsnap.image.nbdkit`) subclass
:class:`RecordedDaemon`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import attrs

from vmsnap import processes
from vmsnap.errors import NotFoundError, UsageError, VmsnapError
from vmsnap.files import DIR_MODE, write_json_atomic
from vmsnap.mounts import fuse_mounted
from vmsnap.runner import LocalRunner, Runner

RECORD = "daemon.json"
RECORD_FORMAT = 1


@attrs.frozen
class DaemonRecord:
    """What another process needs to find, check and stop a daemon (``daemon.json``, 0600).

    :param program: the executable's base name
    :param pid: its pid
    :param start_time: its start time in clock ticks since boot (guards against a reused pid)
    :param directory: its private directory (also the marker its command line holds)
    :param qmp_socket: its QMP monitor, when it has one
    :param nbd_socket: its NBD server's unix socket, when it has one
    :param fuse_files: the files its FUSE exports are mounted on
    :param exports: NBD export names it serves
    """

    program: str
    pid: int
    start_time: int | None
    directory: Path
    qmp_socket: Path | None = None
    nbd_socket: Path | None = None
    fuse_files: tuple[Path, ...] = ()
    exports: tuple[str, ...] = ()

    @property
    def marker(self) -> str:
        return str(self.directory)

    @property
    def identity(self) -> processes.Identity:
        """What the recorded pid must still be before it is signalled."""
        return processes.Identity(self.program, self.marker, self.start_time)

    def alive(self) -> bool:
        """True while the recorded pid is still this daemon (:func:`vmsnap.processes.matches`)."""
        return processes.matches(self.pid, self.identity)

    def uri(self, export: str) -> str:
        """The NBD URI of one of its exports.

        :raise UsageError: it has no NBD server
        """
        if self.nbd_socket is None:
            raise UsageError(f"{self.program} (pid {self.pid}) serves no NBD exports")
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "program": self.program,
            "pid": self.pid,
            "start_time": self.start_time,
            "directory": str(self.directory),
            "qmp_socket": str(self.qmp_socket) if self.qmp_socket else None,
            "nbd_socket": str(self.nbd_socket) if self.nbd_socket else None,
            "fuse_files": [str(p) for p in self.fuse_files],
            "exports": list(self.exports),
        }

    @classmethod
    def from_json(cls, data: Any, *, where: Path) -> DaemonRecord:
        """Parse a record.

        :raise VmsnapError: it is not a daemon record of this format
        """
        try:
            if data["format"] != RECORD_FORMAT:
                raise ValueError(f"format {data['format']!r}")
            return cls(
                program=str(data["program"]),
                pid=int(data["pid"]),
                start_time=None if data["start_time"] is None else int(data["start_time"]),
                directory=Path(data["directory"]),
                qmp_socket=Path(data["qmp_socket"]) if data.get("qmp_socket") else None,
                nbd_socket=Path(data["nbd_socket"]) if data.get("nbd_socket") else None,
                fuse_files=tuple(Path(p) for p in data.get("fuse_files", [])),
                exports=tuple(str(e) for e in data.get("exports", [])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise VmsnapError(
                f"daemon record {where} is damaged ({err})",
                hint=f"stop the daemon by hand if one runs (see the pid in {where}), then remove that file",
            ) from err

    def write(self, path: Path) -> None:
        """Write the record atomically (0600)."""
        write_json_atomic(path, self.to_json())


def read_record(path: Path) -> DaemonRecord:
    """The record at ``path`` (a daemon's ``daemon.json``).

    :raise NotFoundError: there is none
    :raise VmsnapError: it is damaged
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise NotFoundError(f"no daemon record at {path}") from err
    except (OSError, ValueError) as err:
        raise VmsnapError(f"daemon record {path} is unreadable ({err})") from err
    return DaemonRecord.from_json(data, where=path)


def read_pid(path: Path) -> int | None:
    """The pid in a pid file (``PID\\n``), None while it is missing or not whole."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):  # not written whole yet
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stop(pid: int, identity: processes.Identity, timeout: float) -> bool:
    """Stop a daemon by pid while it is the process ``identity`` names; True when it was signalled.

    :raise VmsnapError: it survived SIGKILL (stuck in the kernel, e.g. on a FUSE mount it serves)
    """
    started = identity.start_time if identity.start_time is not None else processes.start_time(pid)
    if not processes.terminate(pid, timeout=timeout, identity=identity):
        return False
    if processes.same_process(pid, started):
        raise VmsnapError(
            f"{identity.program} (pid {pid}) survived SIGKILL",
            hint=f"it is stuck in the kernel: see /proc/{pid}/stack and the FUSE mounts it served",
        )
    return True


def _unmount_fuse_files(paths: Sequence[Path], runner: Runner) -> None:
    # a daemon killed with SIGKILL cannot unmount its FUSE exports: the kernel keeps them, dead
    for path in paths:
        if fuse_mounted(path):
            runner.run(["umount", "--lazy", str(path)], timeout=60)


def stop_recorded(record: DaemonRecord, *, timeout: float = 10.0, runner: Runner | None = None) -> None:
    """Stop a recorded daemon (if it still runs), lazily unmount FUSE files it left mounted (a daemon killed
    with SIGKILL cannot unmount them), and remove its private directory. Safe to call twice.

    :raise VmsnapError: the daemon survived SIGKILL
    :raise CommandError: a dead FUSE mount could not be detached
    """
    _stop(record.pid, record.identity, timeout)
    _unmount_fuse_files(record.fuse_files, runner or LocalRunner())
    if (record.directory / RECORD).is_file():  # only a directory a wrapper made (it holds the record)
        shutil.rmtree(record.directory, ignore_errors=True)


def stop_unrecorded(
    directory: Path,
    program: str,
    pid_file: str,
    *,
    fuse_files: Sequence[Path] = (),
    timeout: float = 10.0,
    runner: Runner | None = None,
) -> int | None:
    """Stop the daemon of a private directory that has no record yet (it started, but whoever started it
    died or failed before recording it): by its pid file, while that pid still runs ``program`` with
    ``directory`` on its command line; unmount ``fuse_files`` left mounted. The directory is kept.

    :return: the pid signalled, None when none was
    :raise VmsnapError: the daemon survived SIGKILL
    """
    pid = read_pid(directory / pid_file)
    identity = processes.Identity(program, str(directory))
    stopped = pid is not None and _stop(pid, identity, timeout)
    _unmount_fuse_files(fuse_files, runner or LocalRunner())
    return pid if stopped else None


@attrs.define
class RecordedDaemon:
    """The life cycle every recorded daemon shares; a context manager that stops it on exit.

    :meth:`start` makes a fresh private directory in ``parent``, lets the subclass start its program
    (:meth:`_launch`, which returns the record once the daemon is ready) and writes the record;
    :meth:`stop` stops the daemon by pid and removes the directory, also when :meth:`start` failed
    half-way. To keep it running after this process exits, register :meth:`stop` on a
    :class:`contextlib.ExitStack` and ``pop_all()`` once the rest of the work succeeded; the record at
    :attr:`record_path` lets any later process stop it (:func:`read_record`, :func:`stop_recorded`).

    :param parent: where the private directory is made (default: the system's temp directory)
    :param stop_timeout: seconds between SIGTERM and SIGKILL
    :param runner: runs the daemon; must be this host (sockets and FUSE files are local)
    """

    program: ClassVar[str]
    """The executable's base name."""
    private_prefix: ClassVar[str]
    """The private directory's name before its random part."""
    pid_file: ClassVar[str]
    """The pid file the daemon writes in its private directory once it is ready."""
    title: ClassVar[str]
    """What messages call it ("the storage daemon")."""

    parent: Path | None = attrs.field(default=None, kw_only=True)
    stop_timeout: float = attrs.field(default=10.0, kw_only=True)
    runner: Runner = attrs.field(factory=LocalRunner, kw_only=True)
    _directory: Path | None = attrs.field(default=None, init=False)
    _record: DaemonRecord | None = attrs.field(default=None, init=False)

    @property
    def directory(self) -> Path:
        """The private directory (exists while the daemon runs)."""
        if self._directory is None:
            raise UsageError(f"{self.title} is not running", hint="call start() first")
        return self._directory

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD

    @property
    def record(self) -> DaemonRecord:
        """The running daemon's record."""
        if self._record is None:
            raise UsageError(f"{self.title} is not running", hint="call start() first")
        return self._record

    @property
    def pid(self) -> int | None:
        return self._record.pid if self._record is not None else None

    def start(self) -> Self:
        """Start the daemon; returns once it is ready and recorded.

        :raise NotFoundError: the parent directory does not exist
        :raise TransferError: the daemon refused to start (its error in the message)
        """
        if self._record is not None:
            raise UsageError(f"{self.title} runs already")
        parent = self.parent if self.parent is not None else Path(tempfile.gettempdir())
        if not parent.is_dir():
            raise NotFoundError(f"directory {parent} for {self.title} does not exist")
        self._directory = Path(tempfile.mkdtemp(prefix=self.private_prefix, dir=parent)).absolute()
        self._directory.chmod(DIR_MODE)
        try:
            record = self._launch(self._directory)
            record.write(self._directory / RECORD)
            self._record = record
        except BaseException:
            self._discard()
            raise
        return self

    def _launch(self, directory: Path) -> DaemonRecord:
        """Start the program with its private directory ``directory``; return its record once it is ready."""
        raise NotImplementedError

    def _fuse_files(self, directory: Path) -> list[Path]:
        """The files in ``directory`` the daemon mounts FUSE exports on (none by default)."""
        return []

    def _recorded(
        self,
        directory: Path,
        pid: int,
        *,
        qmp_socket: Path | None = None,
        nbd_socket: Path | None = None,
        exports: Sequence[str] = (),
    ) -> DaemonRecord:
        """The record of this daemon, started in ``directory`` with pid ``pid`` (its start time read now)."""
        return DaemonRecord(
            program=self.program,
            pid=pid,
            start_time=processes.start_time(pid),
            directory=directory,
            qmp_socket=qmp_socket,
            nbd_socket=nbd_socket,
            fuse_files=tuple(self._fuse_files(directory)),
            exports=tuple(exports),
        )

    def _discard(self) -> None:
        record, self._record = self._record, None
        directory, self._directory = self._directory, None
        if record is not None:
            stop_recorded(record, timeout=self.stop_timeout, runner=self.runner)
        elif directory is not None:  # it may have started before the record was written
            stop_unrecorded(
                directory,
                self.program,
                self.pid_file,
                fuse_files=self._fuse_files(directory),
                timeout=self.stop_timeout,
                runner=self.runner,
            )
            shutil.rmtree(directory, ignore_errors=True)

    def stop(self) -> None:
        """Stop the daemon this object started (by pid), unmount its FUSE files and remove its directory."""
        self._discard()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
