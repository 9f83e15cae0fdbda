"""What a restore serves: a backup disk as an image file (a qcow2 chain, opened by QEMU through its own
backing links) or as a block reader (the ``chunks`` layout: nbdkit's Python plugin), and the servers that
make it reachable — NBD for QEMU (instant restore), a FUSE file for loop devices (mount) — started as
daemons that outlive this process.

=============  ========================================  ==============================================
source         NBD (instant restore)                     FUSE file (mount)
=============  ========================================  ==============================================
ImageSource    qemu-storage-daemon, NBD export per disk  qemu-storage-daemon, FUSE export per disk
ReaderSource   nbdkit python (one per disk)              nbdkit → qemu-storage-daemon (nbd node) → FUSE
=============  ========================================  ==============================================

One FUSE implementation (qemu-storage-daemon's export) serves both kinds; the reader path costs one more hop.
The source values themselves live in :mod:`vmsnap.image.sources` (a repository layout builds them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import UsageError
from vmsnap.image.daemon import DaemonRecord
from vmsnap.image.nbdkit import NbdkitServer
from vmsnap.image.sources import BackupSource, ImageSource, ReaderSource, source_from_json
from vmsnap.image.storage_daemon import (
    FuseExport,
    NbdExport,
    QemuStorageDaemon,
    nbd_client_node,
    qcow2_chain_node,
)
from vmsnap.model import validate_name
from vmsnap.runner import LocalRunner, Runner

__all__ = ["BackupSource", "ImageSource", "ReaderSource", "Served", "serve", "source_from_json"]


@attrs.frozen
class Served:
    """The servers started for some disks, and how to reach each disk.

    :param daemons: their records, in start order (stop in reverse)
    :param uris: disk name → NBD URI (when NBD was asked for)
    :param fuse_files: disk name → FUSE file (when FUSE was asked for)
    """

    daemons: tuple[DaemonRecord, ...]
    uris: Mapping[str, str] = attrs.Factory(dict)
    fuse_files: Mapping[str, Path] = attrs.Factory(dict)


def serve(
    sources: Mapping[str, BackupSource],
    *,
    parent: Path,
    stack: contextlib.ExitStack,
    nbd: bool = False,
    fuse: bool = False,
    runner: Runner | None = None,
) -> Served:
    """Start read-only servers for ``sources`` (disk name → source) under ``parent``.

    Each server's ``stop`` goes on ``stack``; ``stack.pop_all()`` keeps them running past this process.
    Every server's private directory (with its record) is made in ``parent``, so whoever owns ``parent``
    finds them again after a crash.

    :param nbd: serve each disk over NBD (a unix socket)
    :param fuse: expose each disk as a FUSE file
    :raise UsageError: neither NBD nor FUSE asked for, or a bad disk name
    :raise TransferError: a server refused to start
    """
    if not (nbd or fuse):
        raise UsageError("serve what? ask for NBD, FUSE or both")
    run = runner or LocalRunner()
    for name in sources:
        validate_name(name, "disk name")
    records: list[DaemonRecord] = []
    uris: dict[str, str] = {}
    blockdevs: list[dict[str, Any]] = []
    nbd_exports: list[NbdExport] = []
    fuse_exports: list[FuseExport] = []
    for name, source in sources.items():
        node = f"disk-{name}"
        if isinstance(source, ReaderSource):
            server = NbdkitServer(source.reader, source.options, parent=parent, runner=run)
            server.start()
            stack.callback(server.stop)
            records.append(server.record)
            if nbd:
                uris[name] = server.uri
            if fuse:
                blockdevs.append(nbd_client_node(server.socket, "", node))
                fuse_exports.append(FuseExport(node, name))
            continue
        blockdevs.append(qcow2_chain_node(source.path, node, format=source.format))
        if nbd:
            nbd_exports.append(NbdExport(node, name))
        if fuse:
            fuse_exports.append(FuseExport(node, name))
    fuse_files: dict[str, Path] = {}
    if blockdevs:
        daemon = QemuStorageDaemon(
            blockdevs, nbd_exports=nbd_exports, fuse_exports=fuse_exports, parent=parent, runner=run
        )
        daemon.start()
        stack.callback(daemon.stop)
        records.append(daemon.record)
        for nbd_export in nbd_exports:
            uris[nbd_export.name] = daemon.uri(nbd_export.name)
        for fuse_export in fuse_exports:
            fuse_files[fuse_export.name] = daemon.fuse_file(fuse_export.name)
    return Served(tuple(records), uris, fuse_files)
