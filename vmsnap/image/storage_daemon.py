"""The one production wrapper of ``qemu-storage-daemon``: block nodes from option dicts, served over NBD
(a unix socket in a private 0700 directory) and/or as FUSE files, daemonised so that it outlives the process
that started it, and recorded so that another process can find it and stop it by pid.

Everything a daemon owns lives in its private directory (``<parent>/qsd-XXXXXXXX/``, 0700)::

    daemon.json     the record (0600): pid, process start time, program, sockets, FUSE files
    qmp.sock        its QMP monitor (control: ``query-block-exports``, ``block-export-del`` …)
    nbd.sock        its NBD server, when it has NBD exports (``nbd+unix:///NAME?socket=…/nbd.sock``)
    <name>          one regular file per FUSE export, the guest-visible bytes of the node
    qsd.pid         written by the daemon once every export is ready

A recorded pid is trusted only while ``/proc/PID/cmdline`` still names the program and the daemon's private
directory, and ``/proc/PID/stat`` still has the recorded start time (:func:`process_matches`), so a reused pid
is never signalled. Block nodes are read-only unless the caller asks otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, TransferError, UsageError, VmsnapError
from vmsnap.model import validate_name
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.qmp import QMPMonitor

PROGRAM = "qemu-storage-daemon"
RECORD = "daemon.json"
RECORD_FORMAT = 1
PRIVATE_PREFIX = "qsd-"
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_SOCKET_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


# ------------------------------------------------------------------------------------------ process identity


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[-1].split()
    return not fields or fields[0] in ("Z", "X")


def _exists(pid: int, start_time: int | None) -> bool:
    started = process_start_time(pid)
    return started is not None and started == start_time and not _zombie(pid)


def process_matches(pid: int, program: str, marker: str, start_time: int | None = None) -> bool:
    """True when ``pid`` is alive (not a zombie) and still the daemon a record describes.

    :param program: the executable's base name (``argv[0]``), e.g. ``qemu-storage-daemon`` or ``nbdkit``
    :param marker: a string that only that daemon's command line holds (its private directory)
    :param start_time: the recorded start time (:func:`process_start_time`); None skips that check
    """
    if pid <= 1:
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not argv or os.path.basename(argv[0]) != program:
        return False
    if not any(marker in arg for arg in argv[1:]):
        return False
    if start_time is not None and process_start_time(pid) != start_time:
        return False
    return not _zombie(pid)


def stop_process(
    pid: int, program: str, marker: str, start_time: int | None = None, *, timeout: float = 10.0
) -> bool:
    """Stop a recorded daemon by pid: SIGTERM (repeated, a signal can land before its handler exists), then
    SIGKILL after ``timeout``; returns once it is gone. A pid that is no longer that daemon is left alone.

    :return: True when a process was signalled
    :raise VmsnapError: it survived SIGKILL for 5 s (stuck in the kernel: check ``/proc/PID/stack``)
    """
    if not process_matches(pid, program, marker, start_time):
        return False
    # identified once; from here on "still there" is the same start time, because an exiting process's
    # cmdline reads empty before it is gone
    start = start_time if start_time is not None else process_start_time(pid)
    deadline = time.monotonic() + timeout
    next_term = 0.0
    while _exists(pid, start) and time.monotonic() < deadline:
        if time.monotonic() >= next_term:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            next_term = time.monotonic() + 0.5
        time.sleep(0.01)
    if _exists(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed_by = time.monotonic() + 5.0
        while _exists(pid, start):
            if time.monotonic() > killed_by:
                raise VmsnapError(
                    f"{program} (pid {pid}) survived SIGKILL",
                    hint=f"it is stuck in the kernel: see /proc/{pid}/stack and the FUSE mounts it served",
                )
            time.sleep(0.01)
    return True


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as \ooo octal escapes
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _fuse_mounted(path: Path) -> bool:
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("fuse") and _unescape_mount_field(parts[1]) == str(path):
            return True
    return False


# ---------------------------------------------------------------------------------------------- the record


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

    def alive(self) -> bool:
        """True while the recorded pid is still this daemon (:func:`process_matches`)."""
        return process_matches(self.pid, self.program, self.marker, self.start_time)

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
        write_private_json(path, self.to_json())


def write_private_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a 0600 temp file, fsync, rename, fsync the directory."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), _FILE_MODE)
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def stop_recorded(record: DaemonRecord, *, timeout: float = 10.0, runner: Runner | None = None) -> None:
    """Stop a recorded daemon (if it still runs), lazily unmount FUSE files it left mounted (a daemon killed
    with SIGKILL cannot unmount them), and remove its private directory. Safe to call twice.

    :raise VmsnapError: the daemon survived SIGKILL
    :raise CommandError: a dead FUSE mount could not be detached
    """
    stop_process(record.pid, record.program, record.marker, record.start_time, timeout=timeout)
    for path in record.fuse_files:
        if _fuse_mounted(path):
            (runner or LocalRunner()).run(["umount", "--lazy", str(path)], timeout=60)
    if (record.directory / RECORD).is_file():  # only a directory a wrapper made (it holds the record)
        shutil.rmtree(record.directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ exports


@attrs.frozen
class NbdExport:
    """A block node served over the daemon's NBD unix socket.

    :param node: the node name (from a blockdev dict)
    :param name: the export name clients ask for
    :param writable: let clients write (default read-only)
    """

    node: str
    name: str
    writable: bool = False

    def __attrs_post_init__(self) -> None:
        validate_name(self.node, "block node name")
        validate_name(self.name, "NBD export name")


@attrs.frozen
class FuseExport:
    """A block node as one regular file in the daemon's private directory (a FUSE mount on that file).

    :param node: the node name
    :param name: the file's name in the private directory
    :param writable: allow writes (default read-only)
    """

    node: str
    name: str
    writable: bool = False

    def __attrs_post_init__(self) -> None:
        validate_name(self.node, "block node name")
        validate_name(self.name, "FUSE export name")
        if self.name in (RECORD, "qmp.sock", "nbd.sock", "qsd.pid"):
            raise UsageError(f"FUSE export name {self.name!r} is reserved")


def _read_only(options: Mapping[str, Any]) -> dict[str, Any]:
    # children (file, backing) inherit read-only from the node that opens them
    return {**options, "read-only": True, "auto-read-only": False}


def _escape_opt(value: str) -> str:
    return value.replace(",", ",,")


# ------------------------------------------------------------------------------------------------ the daemon


@attrs.define
class QemuStorageDaemon:
    """A daemonised ``qemu-storage-daemon``; a context manager that stops it on exit.

    To keep it running after this process exits (mount, instant restore), register :meth:`stop` on an
    :class:`contextlib.ExitStack` and ``pop_all()`` once the rest of the work succeeded; the record at
    :attr:`record_path` lets any later process stop it (:func:`read_record`, :func:`stop_recorded`).

    >>> node = {"driver": "qcow2", "node-name": "disk0",                       # doctest: +SKIP
    ...         "file": {"driver": "file", "filename": "/backups/vm1/ID/disk0.qcow2"}}
    >>> with QemuStorageDaemon([node], nbd_exports=[NbdExport("disk0", "disk0")]) as qsd:
    ...     print(qsd.uri("disk0"))

    :param blockdevs: ``--blockdev`` option dicts (JSON), each with a ``node-name``
    :param nbd_exports: nodes to serve over NBD on ``nbd.sock``
    :param fuse_exports: nodes to expose as files in the private directory
    :param parent: where the private directory is made (default: the system's temp directory)
    :param writable: open the nodes read-write (default: every blockdev gets ``read-only: true``)
    :param max_connections: NBD clients at once
    :param stop_timeout: seconds between SIGTERM and SIGKILL
    :param runner: runs the daemon; must be this host (sockets and FUSE files are local)
    """

    blockdevs: Sequence[Mapping[str, Any]]
    nbd_exports: Sequence[NbdExport] = ()
    fuse_exports: Sequence[FuseExport] = ()
    parent: Path | None = None
    writable: bool = False
    max_connections: int = 16
    stop_timeout: float = 10.0
    runner: Runner = attrs.Factory(LocalRunner)
    _directory: Path | None = attrs.field(default=None, init=False)
    _record: DaemonRecord | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.blockdevs:
            raise UsageError("a storage daemon needs at least one block node")
        names = [b.get("node-name") for b in self.blockdevs]
        if any(not isinstance(n, str) for n in names):
            raise UsageError("every blockdev of the storage daemon needs a node-name")
        for name in names:
            validate_name(str(name), "block node name")
        writable = [e.node for e in self.nbd_exports if e.writable]
        writable += [e.node for e in self.fuse_exports if e.writable]
        if writable and not self.writable:
            raise UsageError(f"export of {writable[0]} is writable but the daemon's nodes are read-only")
        if len({e.name for e in self.nbd_exports}) != len(self.nbd_exports):
            raise UsageError("two NBD exports of one storage daemon share a name")
        if len({e.name for e in self.fuse_exports}) != len(self.fuse_exports):
            raise UsageError("two FUSE exports of one storage daemon share a name")

    # -- where things are

    @property
    def directory(self) -> Path:
        """The private directory (exists while the daemon runs)."""
        if self._directory is None:
            raise UsageError("the storage daemon is not running", hint="call start() first")
        return self._directory

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.directory / "nbd.sock"

    def fuse_file(self, name: str) -> Path:
        """The file a FUSE export is mounted on."""
        if name not in {e.name for e in self.fuse_exports}:
            raise NotFoundError(f"the storage daemon has no FUSE export {name!r}")
        return self.directory / name

    def uri(self, export: str) -> str:
        """The NBD URI of an export (``nbd+unix:///NAME?socket=…``)."""
        if export not in {e.name for e in self.nbd_exports}:
            raise NotFoundError(f"the storage daemon has no NBD export {export!r}")
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    @property
    def record(self) -> DaemonRecord:
        """The running daemon's record."""
        if self._record is None:
            raise UsageError("the storage daemon is not running", hint="call start() first")
        return self._record

    @property
    def pid(self) -> int | None:
        return self._record.pid if self._record is not None else None

    # -- the command line

    def argv(self) -> list[str]:
        """The daemon's command line (inside :meth:`start`, once the private directory exists)."""
        directory = self.directory
        argv = [
            PROGRAM,
            "--daemonize",
            "--pidfile",
            str(directory / "qsd.pid"),
            "--chardev",
            f"socket,id=vmsnap-qmp,path={_escape_opt(str(self.qmp_socket))},server=on,wait=off",
            "--monitor",
            "chardev=vmsnap-qmp",
        ]
        for options in self.blockdevs:
            node = options if self.writable else _read_only(options)
            argv += ["--blockdev", json.dumps(node, separators=(",", ":"))]
        if self.nbd_exports:
            server = {
                "addr": {"type": "unix", "path": str(self.nbd_socket)},
                "max-connections": self.max_connections,
            }
            argv += ["--nbd-server", json.dumps(server, separators=(",", ":"))]
        for index, nbd in enumerate(self.nbd_exports):
            export = {
                "type": "nbd",
                "id": f"nbd{index}",
                "node-name": nbd.node,
                "name": nbd.name,
                "writable": nbd.writable,
            }
            argv += ["--export", json.dumps(export, separators=(",", ":"))]
        for index, fuse in enumerate(self.fuse_exports):
            export = {
                "type": "fuse",
                "id": f"fuse{index}",
                "node-name": fuse.node,
                "mountpoint": str(directory / fuse.name),
                "writable": fuse.writable,
                "allow-other": "off",
            }
            argv += ["--export", json.dumps(export, separators=(",", ":"))]
        return argv

    # -- life cycle

    def start(self) -> QemuStorageDaemon:
        """Start the daemon; returns once every export is ready (the daemon's parent exits then).

        :raise NotFoundError: the parent directory does not exist
        :raise UsageError: the private directory's path is too long for a unix socket
        :raise TransferError: the daemon refused to start (its error in the message)
        """
        if self._record is not None:
            raise UsageError("this storage daemon runs already")
        parent = self.parent if self.parent is not None else Path(tempfile.gettempdir())
        if not parent.is_dir():
            raise NotFoundError(f"directory {parent} for the storage daemon does not exist")
        self._directory = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=parent)).absolute()
        os.chmod(self._directory, _DIR_MODE)
        try:
            if len(str(self.qmp_socket)) > _SOCKET_MAX or len(str(self.nbd_socket)) > _SOCKET_MAX:
                raise UsageError(
                    f"{self._directory} is too deep for a unix socket path (at most {_SOCKET_MAX} bytes)",
                    hint="use a shorter parent directory",
                )
            for fuse in self.fuse_exports:
                path = self._directory / fuse.name
                path.touch(mode=_FILE_MODE)
            self._run()
        except BaseException:
            self._discard()
            raise
        return self

    def _run(self) -> None:
        directory = self.directory
        try:
            self.runner.run(self.argv(), timeout=120)
        except VmsnapError as err:
            detail = " ".join(str(getattr(err, "stderr", "") or err.message).split())
            locked = "Failed to get" in detail and "lock" in detail
            raise TransferError(
                f"{PROGRAM} did not start: {detail}",
                hint=(
                    "a running QEMU holds the image: serve a copy or a snapshot"
                    if locked
                    else "check that the images exist and are readable, and that /dev/fuse opens"
                ),
            ) from err
        try:
            pid = int((directory / "qsd.pid").read_text().strip())
        except (OSError, ValueError) as err:
            raise TransferError(f"{PROGRAM} wrote no pid file in {directory}: {err}") from err
        self._record = DaemonRecord(
            program=PROGRAM,
            pid=pid,
            start_time=process_start_time(pid),
            directory=directory,
            qmp_socket=self.qmp_socket,
            nbd_socket=self.nbd_socket if self.nbd_exports else None,
            fuse_files=tuple(directory / e.name for e in self.fuse_exports),
            exports=tuple(e.name for e in self.nbd_exports),
        )
        self._record.write(self.record_path)

    def _discard(self) -> None:
        record, self._record = self._record, None
        directory, self._directory = self._directory, None
        if record is not None:
            stop_recorded(record, timeout=self.stop_timeout, runner=self.runner)
        elif directory is not None:
            pid = _read_pid(directory / "qsd.pid")
            if pid is not None:  # it started but we could not record it
                stop_process(pid, PROGRAM, str(directory), timeout=self.stop_timeout)
            for fuse in self.fuse_exports:
                if _fuse_mounted(directory / fuse.name):
                    self.runner.run(["umount", "--lazy", str(directory / fuse.name)], timeout=60)
            shutil.rmtree(directory, ignore_errors=True)

    def stop(self) -> None:
        """Stop the daemon this object started (by pid), unmount its FUSE files and remove its directory."""
        self._discard()

    def monitor(self) -> QMPMonitor:
        """A new connected QMP monitor of the daemon (close it when done)."""
        return QMPMonitor(self.qmp_socket).connect()

    def __enter__(self) -> QemuStorageDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def qcow2_chain_node(path: Path, node: str, *, format: str = "qcow2") -> dict[str, Any]:
    """A blockdev dict for an image file whose backing chain QEMU opens from the image's own header.

    :param path: the top image (absolute after this call: the daemon changes directory when it daemonises)
    :param node: the node name
    :param format: "qcow2" or "raw"
    :raise NotFoundError: the image does not exist
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"unsupported image format {format!r}", hint="use 'qcow2' or 'raw'")
    if not path.exists():
        raise NotFoundError(f"image {path} does not exist", hint="check the path")
    return {
        "driver": format,
        "node-name": node,
        "file": {"driver": "file", "filename": str(path.absolute())},
    }


def nbd_client_node(socket: Path, export: str, node: str) -> dict[str, Any]:
    """A raw blockdev dict reading another NBD server's export over a unix socket (e.g. nbdkit).

    :param socket: the server's unix socket
    :param export: the export name ("" for the default export)
    :param node: the node name of the raw node on top
    """
    return {
        "driver": "raw",
        "node-name": node,
        "file": {"driver": "nbd", "server": {"type": "unix", "path": str(socket)}, "export": export},
    }
