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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, UsageError
from vmsnap.image.daemon import DaemonRecord
from vmsnap.image.nbdkit import NbdkitServer
from vmsnap.image.readers import reader_options
from vmsnap.image.storage_daemon import (
    FuseExport,
    NbdExport,
    QemuStorageDaemon,
    nbd_client_node,
    qcow2_chain_node,
)
from vmsnap.model import validate_name
from vmsnap.runner import LocalRunner, Runner


def _as_dict(mapping: Mapping[str, Any]) -> dict[str, str]:
    return reader_options(dict(mapping))


@attrs.frozen
class ImageSource:
    """A backup disk that is an image file: the top of a qcow2 chain (format-1 repositories) or a raw file.

    :param path: the image (its backing links, relative or absolute, are followed by QEMU)
    :param format: "qcow2" or "raw"
    :param identity: what makes two mounts "the same backup disk" (default: the image's real path)
    """

    path: Path
    format: str = "qcow2"
    identity: str = ""

    def __attrs_post_init__(self) -> None:
        if self.format not in ("qcow2", "raw"):
            raise UsageError(f"unsupported image format {self.format!r}", hint="use 'qcow2' or 'raw'")
        if not self.path.exists():
            raise NotFoundError(
                f"backup image {self.path} does not exist", hint="check the backup id and disk"
            )
        if not self.identity:
            object.__setattr__(self, "identity", f"image:{os.path.realpath(self.path)}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "image", "path": str(self.path), "format": self.format, "identity": self.identity}


@attrs.frozen
class ReaderSource:
    """A backup disk read by a :class:`~vmsnap.image.readers.BlockReader` built in nbdkit's Python plugin.

    :param reader: the factory's import string, e.g. ``vmsnap.image.readers:VerifiedRawReader``
    :param options: its keyword arguments (strings; visible in ``ps``, so never a secret)
    :param identity: what makes two mounts "the same backup disk", e.g. ``chunks:REPO/vm/ID/disk``
        (default: the reader and its options)
    """

    reader: str
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_as_dict)
    identity: str = ""

    def __attrs_post_init__(self) -> None:
        if ":" not in self.reader:
            raise UsageError(f"reader {self.reader!r} is not module:callable")
        if not self.identity:
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            object.__setattr__(self, "identity", f"reader:{self.reader}?{opts}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "reader",
            "reader": self.reader,
            "options": dict(self.options),
            "identity": self.identity,
        }


BackupSource = ImageSource | ReaderSource


def source_from_json(data: Mapping[str, Any]) -> BackupSource:
    """The inverse of ``to_json`` (for state files).

    :raise UsageError: an unknown kind
    """
    if data.get("kind") == "image":
        return ImageSource(Path(data["path"]), str(data["format"]), str(data["identity"]))
    if data.get("kind") == "reader":
        return ReaderSource(str(data["reader"]), dict(data["options"]), str(data["identity"]))
    raise UsageError(f"unknown backup source kind {data.get('kind')!r}")


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
