"""A strategy that vmsnap does not ship: it lives in another distribution and registers itself through the
``vmsnap.strategies`` entry point. It backs up powered-off qcow2 images and takes incrementals from a
persistent dirty bitmap that QEMU tools (qemu-io, qemu-img, a VM that ran on the image) keep up to date:

- create: with a checkpoint and an intact bitmap, the bitmap's bits move to ``<bitmap>.pending`` and the
  bitmap counts on from zero; without (a full backup), the bitmap is made if missing;
- export: qemu-nbd serves the image read-only, with ``<bitmap>.pending`` as ``qemu:dirty-bitmap:`` context;
- delete: the pending bits are dropped; abandon gives them back first.

It proves that the orchestrator asks capabilities and never names a strategy: this one gets incremental
backups through ``vmsnap backup --strategy offline-bitmap --incremental`` without vmsnap knowing it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from vmsnap.errors import UnsupportedError
from vmsnap.image.nbd import QemuNbdServer, dirty_context
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits
from vmsnap.strategies.base import BackupContext, Capabilities, IncrementalFallbackWarning
from vmsnap.vm.machine import Machine

PENDING = ".pending"


class OfflineBitmapStrategy:
    """Full and incremental backups of powered-off qcow2 images from their persistent dirty bitmap."""

    name: ClassVar[str] = "offline-bitmap"
    traits: ClassVar[Traits] = Traits(
        qemu_command="qemu-img bitmap; qemu-nbd --bitmap",
        libvirt_command="-",
        os_command="-",
        snapshot_is="the image itself (the VM is off)",
        scope="one VM",
        technology="persistent dirty bitmap in the qcow2",
        copy_out="NBD export with a dirty-bitmap context",
        write_cost="none",
        delete_cost="drop a bitmap",
        rollback_cost="unsupported",
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        instant="pause", online=False, offline=True, incremental=True, tracks_changes=True
    )
    last_pause_ms: float | None = None  # the VM is off: nothing to pause

    def __init__(self, machine: Machine, *, bitmap: str = "vmsnap", since: str | None = None) -> None:
        self.machine = machine
        self.runner = machine.runner
        self.bitmap = bitmap
        self.since = since

    @classmethod
    def for_backup(cls, machine: Machine, context: BackupContext) -> OfflineBitmapStrategy:
        return cls(machine, bitmap=context.tracking, since=context.since.backup_id if context.since else None)

    def probe(self, disk: Disk) -> bool:
        return disk.format == "qcow2" and not self.machine.is_running

    def _bitmaps(self, disk: Disk) -> dict[str, dict[str, Any]]:
        out = self.runner.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(disk.file)]).stdout
        data = json.loads(out).get("format-specific", {}).get("data", {})
        return {b["name"]: b for b in data.get("bitmaps", [])}

    def _qemu_img_bitmap(self, disk: Disk, *operations: str, bitmap: str) -> None:
        self.runner.run(["qemu-img", "bitmap", *operations, "-f", "qcow2", str(disk.file), bitmap])

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        refs = []
        for disk in disks:
            bitmaps = self._bitmaps(disk)
            pending = self.bitmap + PENDING
            if pending in bitmaps:  # left by a dead run: its bits go back first
                self._qemu_img_bitmap(disk, "--merge", pending, bitmap=self.bitmap)
                self._qemu_img_bitmap(disk, "--remove", bitmap=pending)
            current = bitmaps.get(self.bitmap)
            intact = current is not None and "in-use" not in current.get("flags", [])
            incremental = self.since is not None and intact
            if self.since is not None and not incremental:
                import warnings

                warnings.warn(
                    f"disk {disk.name}: bitmap {self.bitmap} is missing or in use; taking a full backup",
                    IncrementalFallbackWarning,
                    stacklevel=2,
                )
            if current is None:
                self._qemu_img_bitmap(disk, "--add", bitmap=self.bitmap)
            self._qemu_img_bitmap(disk, "--add", "--disable", "--merge", self.bitmap, bitmap=pending)
            self._qemu_img_bitmap(disk, "--clear", bitmap=self.bitmap)
            details = {"since": self.since or "" if incremental else "", "pending": pending}
            refs.append(SnapshotRef(self.name, name, disk, str(disk.file), details))
        return refs

    @contextlib.contextmanager
    def export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        pending = snap.details["pending"]
        since = snap.details.get("since") or None
        server = QemuNbdServer(snap.disk.file, "qcow2", bitmap=pending, persistent=True, runner=self.runner)
        with server:
            yield ExportSource(
                kind="nbd",
                location=server.uri,
                format="raw",
                disk=snap.disk,
                virtual_size=snap.disk.virtual_size,
                dirty_bitmap=dirty_context(pending) if since else None,
                since=since,
            )

    def abandon(self, snaps: Sequence[SnapshotRef]) -> None:
        for snap in snaps:
            if snap.details["pending"] in self._bitmaps(snap.disk):
                self._qemu_img_bitmap(snap.disk, "--merge", snap.details["pending"], bitmap=self.bitmap)

    def delete(self, snap: SnapshotRef) -> None:
        if snap.details["pending"] in self._bitmaps(snap.disk):
            self._qemu_img_bitmap(snap.disk, "--remove", bitmap=snap.details["pending"])

    def rollback(self, snap: SnapshotRef) -> None:
        raise UnsupportedError("offline-bitmap snapshots cannot be rolled back", hint="restore a backup")

    def rollback_many(self, snaps: Sequence[SnapshotRef]) -> None:
        for snap in snaps:
            self.rollback(snap)

    def list(self) -> Sequence[SnapshotRef]:
        return []

    def find(self, name: str) -> Sequence[SnapshotRef]:
        return [ref for ref in self.list() if ref.name == name]
