"""The one production wrapper of ``qemu-storage-daemon``: block nodes from option dicts, served over NBD
(a unix socket in a private 0700 directory) and/or as FUSE files, daemonised so that it outlives the process
that started it, and recorded so that another process can find it and stop it by pid
(:mod:`vmsnap.image.daemon`).

Everything a daemon owns lives in its private directory (``<parent>/qsd-XXXXXXXX/``, 0700)::

    daemon.json     the record (0600): pid, process start time, program, sockets, FUSE files
    qmp.sock        its QMP monitor (control: ``query-block-exports``, ``block-export-del`` …)
    nbd.sock        its NBD server, when it has NBD exports (``nbd+unix:///NAME?socket=…/nbd.sock``)
    <name>          one regular file per FUSE export, the guest-visible bytes of the node
    qsd.pid         written by the daemon once every export is ready

Block nodes are read-only unless the caller asks otherwise.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, TransferError, UsageError, VmsnapError
from vmsnap.files import FILE_MODE
from vmsnap.image.daemon import RECORD, DaemonRecord, RecordedDaemon, read_pid
from vmsnap.image.qemu_img import escape_option
from vmsnap.model import validate_name
from vmsnap.vm.qmp import QMPMonitor

PROGRAM = "qemu-storage-daemon"
PRIVATE_PREFIX = "qsd-"
PID_FILE = "qsd.pid"
_SOCKET_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


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
        if self.name in (RECORD, "qmp.sock", "nbd.sock", PID_FILE):
            raise UsageError(f"FUSE export name {self.name!r} is reserved")


def _read_only(options: Mapping[str, Any]) -> dict[str, Any]:
    # children (file, backing) inherit read-only from the node that opens them
    return {**options, "read-only": True, "auto-read-only": False}


# ------------------------------------------------------------------------------------------------ the daemon


@attrs.define
class QemuStorageDaemon(RecordedDaemon):
    """A daemonised ``qemu-storage-daemon``; a context manager that stops it on exit.

    To keep it running after this process exits (mount, instant restore), register :meth:`stop` on an
    :class:`contextlib.ExitStack` and ``pop_all()`` once the rest of the work succeeded; the record at
    :attr:`record_path` lets any later process stop it (:func:`~vmsnap.image.daemon.read_record`,
    :func:`~vmsnap.image.daemon.stop_recorded`).

    >>> node = {"driver": "qcow2", "node-name": "disk0",                       # doctest: +SKIP
    ...         "file": {"driver": "file", "filename": "/backups/vm1/ID/disk0.qcow2"}}
    >>> with QemuStorageDaemon([node], nbd_exports=[NbdExport("disk0", "disk0")]) as qsd:
    ...     print(qsd.uri("disk0"))

    :param blockdevs: ``--blockdev`` option dicts (JSON), each with a ``node-name``
    :param nbd_exports: nodes to serve over NBD on ``nbd.sock``
    :param fuse_exports: nodes to expose as files in the private directory
    :param writable: open the nodes read-write (default: every blockdev gets ``read-only: true``)
    :param max_connections: NBD clients at once
    :param parent: where the private directory is made (default: the system's temp directory)
    :param stop_timeout: seconds between SIGTERM and SIGKILL
    :param runner: runs the daemon; must be this host (sockets and FUSE files are local)
    """

    program = PROGRAM
    private_prefix = PRIVATE_PREFIX
    pid_file = PID_FILE
    title = "the storage daemon"

    blockdevs: Sequence[Mapping[str, Any]]
    nbd_exports: Sequence[NbdExport] = ()
    fuse_exports: Sequence[FuseExport] = ()
    writable: bool = False
    max_connections: int = 16

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

    # -- the command line

    def argv(self) -> list[str]:
        """The daemon's command line (inside :meth:`start`, once the private directory exists)."""
        directory = self.directory
        argv = [
            PROGRAM,
            "--daemonize",
            "--pidfile",
            str(directory / PID_FILE),
            "--chardev",
            f"socket,id=vmsnap-qmp,path={escape_option(str(self.qmp_socket))},server=on,wait=off",
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

    # -- life cycle (start, stop, the context manager: RecordedDaemon)

    def _fuse_files(self, directory: Path) -> list[Path]:
        return [directory / e.name for e in self.fuse_exports]

    def _launch(self, directory: Path) -> DaemonRecord:
        """Run the daemon; it returns once every export is ready (its parent exits then).

        :raise UsageError: the private directory's path is too long for a unix socket
        :raise TransferError: the daemon refused to start (its error in the message)
        """
        if len(str(self.qmp_socket)) > _SOCKET_MAX or len(str(self.nbd_socket)) > _SOCKET_MAX:
            raise UsageError(
                f"{directory} is too deep for a unix socket path (at most {_SOCKET_MAX} bytes)",
                hint="use a shorter parent directory",
            )
        for path in self._fuse_files(directory):
            path.touch(mode=FILE_MODE)
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
        pid = read_pid(directory / PID_FILE)
        if pid is None:
            raise TransferError(f"{PROGRAM} wrote no pid file in {directory}")
        return self._recorded(
            directory,
            pid,
            qmp_socket=self.qmp_socket,
            nbd_socket=self.nbd_socket if self.nbd_exports else None,
            exports=[e.name for e in self.nbd_exports],
        )

    def monitor(self) -> QMPMonitor:
        """A new connected QMP monitor of the daemon (close it when done)."""
        return QMPMonitor(self.qmp_socket).connect()


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


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
