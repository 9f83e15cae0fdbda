"""QEMU's own NBD server for a pull backup: one read-only export of the fleecing node (for an incremental
with the pending bitmap as ``qemu:dirty-bitmap:`` context), on a unix socket in a private directory.

The directory's path follows from the backup's target directory and disk (:func:`server_dir`) and is
recorded in the backup's details, so that ``delete`` — also in another process, ``vmsnap recover`` after a
run was killed mid-export — finds the socket again and stops the server the run started: QEMU runs one NBD
server, and something listening on our own private socket can only be the one we started there.

A QEMU on another host (the machine's runner is an SSH one) listens on that host: the directory is made and
removed there, through the runner; the machine forwards the socket to this host (``Machine.reachable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vmsnap.errors import QMPCommandError, SnapshotError, VmsnapError
from vmsnap.model import ExportSource, SnapshotRef
from vmsnap.runner import Runner
from vmsnap.sockets import unix_listening
from vmsnap.strategies.blockdev_backup.plan import device_node, nbd_source
from vmsnap.vm.qmp import QMPMonitor

SOCKET = "nbd.sock"

_MAKE_REMOTE_DIR = """umask 077
if mkdir -- "$1" 2>/dev/null; then exit 0; fi
if [ -d "$1" ] && [ ! -L "$1" ] && [ -O "$1" ] && [ "$(stat -c %a -- "$1")" = 700 ]; then
  rm -f -- "$1/nbd.sock"; exit 0
fi
exit 3"""
"""The private directory on another host, as :func:`_make_server_dir` makes it here (exit 3: not ours)."""
_REMOTE_SERVER = '[ -d "$1" ] && [ ! -L "$1" ] && [ -O "$1" ] && [ -S "$1/nbd.sock" ]'


def _on_other_host(runner: Runner | None) -> bool:
    return runner is not None and runner.host != "local"


def server_dir(target_dir: Path, disk_name: str) -> Path:
    """The private directory (0700, ours) of the socket QEMU's NBD server listens on while the backup of
    ``disk_name`` in ``target_dir`` is exported: the same path whenever it is asked for again."""
    key = f"{os.getuid()}\0{os.path.abspath(target_dir)}\0{disk_name}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vmsnap-nbd-{digest}"


def socket_dir(snap: SnapshotRef, target_dir: Path) -> Path:
    """The directory of ``snap``'s NBD socket: as its details recorded it when the backup was created (the
    temporary directory may differ in a later process), else derived again."""
    recorded = snap.details.get("nbd_dir")
    return Path(recorded) if recorded else server_dir(target_dir, snap.disk.name)


def _ours(directory: Path) -> bool:
    """True when ``directory`` is a real directory (no link), owned by us and private (0700)."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700


def _make_server_dir(directory: Path, runner: Runner | None = None) -> None:
    """:raise SnapshotError: the path exists and is not a private directory of ours"""
    if _on_other_host(runner):
        assert runner is not None
        script = ["sh", "-c", _MAKE_REMOTE_DIR, "sh", str(directory)]
        if runner.run(script, ok_codes=(0, 3), timeout=60).exit_code == 3:
            raise SnapshotError(
                f"{directory} on {runner.host} exists but is not a private directory of this user",
                hint="remove it there (someone else may have made it), then retry",
            )
        return
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not _ours(directory):
            raise SnapshotError(
                f"{directory} exists but is not a private directory of this user",
                hint="remove it (someone else may have made it), then retry",
            ) from None
        (directory / SOCKET).unlink(missing_ok=True)  # the socket of a server that is gone


def _remove_dir(directory: Path, runner: Runner | None) -> None:
    if _on_other_host(runner):
        assert runner is not None
        with contextlib.suppress(VmsnapError):
            runner.run(["rm", "-rf", "--", str(directory)], timeout=60)
        return
    shutil.rmtree(directory, ignore_errors=True)


def _stop_server(qmp: QMPMonitor, directory: Path, runner: Runner | None = None) -> None:
    with contextlib.suppress(QMPCommandError):
        qmp.nbd_server_stop()
    _remove_dir(directory, runner)


def del_export(qmp: QMPMonitor, export_id: str) -> None:
    """Remove block export ``export_id`` if it exists, disconnecting its clients, and wait until it is gone.

    :raise QMPCommandError: QEMU refused
    """
    if not export_id or export_id not in {e.get("id") for e in qmp.query_block_exports()}:
        return
    qmp.block_export_del(export_id)
    with contextlib.suppress(VmsnapError):  # libvirt passes no events: then the export goes unseen
        qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": export_id}, timeout=30)


@contextlib.contextmanager
def nbd_export(
    qmp: QMPMonitor, snap: SnapshotRef, target_dir: Path, runner: Runner | None = None
) -> Iterator[ExportSource]:
    """Serve ``snap``'s fleecing node on QEMU's NBD server for the body of the ``with``; the export and the
    server are gone afterwards.

    :param runner: the machine's runner: where QEMU runs (the socket's directory is made there)
    :raise SnapshotError: the server could not start (another one runs), or the export could not be added
    """
    directory = socket_dir(snap, target_dir)
    _make_server_dir(directory, runner)
    path = directory / SOCKET
    try:
        qmp.nbd_server_start(path)
    except QMPCommandError as err:
        _remove_dir(directory, runner)
        raise SnapshotError(
            f"cannot start QEMU's NBD server for disk {snap.disk.name!r}: {err.desc}",
            hint="export one disk at a time (QEMU runs one NBD server), or stop the other NBD server",
        ) from err
    export_id = snap.details["export"]
    incremental = snap.details.get("kind") == "incremental"
    pending = snap.details.get("pending", "")
    try:
        try:
            qmp.block_export_add_nbd(
                export_id,
                snap.details.get("export_node") or snap.details["access"],
                name=snap.disk.name,
                bitmaps=[(device_node(snap), pending)] if incremental else (),
            )
        except QMPCommandError as err:
            raise SnapshotError(
                f"cannot export the backup of disk {snap.disk.name!r} over NBD: {err.desc}",
                hint="is another export of this disk still open?",
            ) from err
        yield nbd_source(snap, f"nbd+unix:///{snap.disk.name}?socket={path}")
    finally:
        del_export(qmp, export_id)
        _stop_server(qmp, directory, runner)


def end_export(qmp: QMPMonitor, snap: SnapshotRef, target_dir: Path, runner: Runner | None = None) -> bool:
    """Remove ``snap``'s export and stop the NBD server its export started, when a run that died left them;
    True when a server was stopped.

    :param runner: the machine's runner: where QEMU runs
    :raise QMPCommandError: QEMU refused to remove the export
    """
    del_export(qmp, snap.details.get("export", ""))
    directory = socket_dir(snap, target_dir)
    if _on_other_host(runner):
        assert runner is not None
        check = ["sh", "-c", _REMOTE_SERVER, "sh", str(directory)]
        stopped = runner.run(check, ok_codes=(0, 1), timeout=60).exit_code == 0
        if stopped:
            _stop_server(qmp, directory, runner)
        return stopped
    if not _ours(directory):
        return False
    stopped = unix_listening(directory / SOCKET, timeout=2)
    if stopped:
        _stop_server(qmp, directory)
    shutil.rmtree(directory, ignore_errors=True)
    return stopped
