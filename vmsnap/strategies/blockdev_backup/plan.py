"""What one backup of the ``backup`` strategy is, before and after it starts: a plan per disk (full or
incremental, and why), the QEMU names of its nodes and jobs, the details of its snapshot references, and
the small record file that lets another process find it again."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import SnapshotError, UsageError, VmsnapError
from vmsnap.image import qemu_img
from vmsnap.image.nbd import dirty_context
from vmsnap.image.qcow2 import read_header
from vmsnap.model import Disk, ExportSource, SnapshotRef, validate_name
from vmsnap.runner import Runner
from vmsnap.strategies.blockdev_backup.bitmaps import BitmapState, bitmap_state, pending_name

Mode = Literal["push", "pull"]

STRATEGY = "backup"
"""The strategy's registered name (its snapshot references carry it)."""

SIDECAR_SUFFIX = ".vmsnap-backup.json"
"""``target_dir/.<disk>.vmsnap-backup.json`` records a backup's name and details until it is deleted."""


# -- QEMU names -------------------------------------------------------------------------------------------


def _short_id(prefix: str, disk_name: str) -> str:
    """A QEMU node / job id for ``disk_name`` (node names must stay under 32 characters)."""
    digest = hashlib.sha1(disk_name.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{prefix}-{digest}"


def target_node(disk_name: str) -> str:
    """The node name of the push target of ``disk_name`` (one backup per disk at a time)."""
    return _short_id("vbk", disk_name)


def fleece_nodes(disk_name: str) -> dict[str, str]:
    """Pull-mode node names of ``disk_name``: fleecing file, copy-before-write filter, snapshot-access."""
    base = _short_id("vfl", disk_name)
    return {"fleece": f"{base}-tmp", "cbw": f"{base}-cbw", "access": f"{base}-acc"}


def device_node(snap: SnapshotRef) -> str:
    """The disk's own node (below any fleecing filter), where its bitmaps live."""
    return snap.details.get("device_node") or snap.disk.node_name


# -- plans ------------------------------------------------------------------------------------------------


@attrs.frozen
class DiskPlan:
    """What create does for one disk.

    :param target: the push target ``target_dir/<disk>.qcow2``
    :param parent: for an incremental, the previous backup's image of the disk
    :param bitmap_state: the disk's dirty bitmap before the backup (see :func:`bitmap_state`)
    """

    disk: Disk
    target: Path
    parent: Path | None
    bitmap_state: BitmapState
    incremental: bool = False


def parent_problem(disk: Disk, parent: Path | None) -> str:
    """Why ``parent`` cannot carry an incremental backup of ``disk`` ("" when it can)."""
    if parent is None:
        return f"no parent backup was given for disk {disk.name!r}"
    if not parent.exists():
        return f"the parent backup {parent} of disk {disk.name!r} does not exist"
    try:
        size = read_header(parent).virtual_size
    except (OSError, ValueError) as err:
        return f"the parent backup {parent} of disk {disk.name!r} cannot be used: {err}"
    if size != disk.virtual_size:
        return f"the parent backup {parent} has another size than disk {disk.name!r} (resized?)"
    return ""


@attrs.frozen
class Planner:
    """Plans the disks of one backup.

    :param target_dir: where the targets go
    :param bitmap: the persistent dirty bitmap's name
    :param incremental: an incremental backup was asked for
    :param parents: disk name → the previous backup's image of that disk
    :param need_parents: the parents must be usable (push mode writes its targets on top of them)
    """

    target_dir: Path
    bitmap: str
    incremental: bool
    parents: Mapping[str, Path]
    need_parents: bool

    def target(self, disk: Disk) -> Path:
        """``target_dir/<disk>.qcow2``.

        :raise UsageError: the disk's name cannot be a file name
        """
        return self.target_dir / f"{validate_name(disk.name, 'disk name')}.qcow2"

    def plan(
        self, bitmaps: Mapping[str, Sequence[Mapping[str, Any]]], disks: Sequence[Disk]
    ) -> tuple[list[DiskPlan], str]:
        """Per-disk plans and, when an incremental backup must become full, the reason ("" otherwise).

        :param bitmaps: disk name → that disk's dirty bitmaps (QMP's ``dirty-bitmaps`` shape)
        """
        states = {d.name: bitmap_state(bitmaps.get(d.name, []), self.bitmap) for d in disks}
        reason = ""
        if self.incremental:
            for disk in disks:
                state, why = states[disk.name]
                if state != "ok":
                    reason = f"{disk.name}: {why}"
                    break
                if self.need_parents or self.parents:
                    reason = parent_problem(disk, self.parents.get(disk.name))
                    if reason:
                        break
        incremental = self.incremental and not reason
        plans = [
            DiskPlan(
                disk=disk,
                target=self.target(disk),
                parent=self.parents.get(disk.name) if incremental else None,
                bitmap_state=states[disk.name][0],
                incremental=incremental,
            )
            for disk in disks
        ]
        return plans, reason


def create_target(runner: Runner, plan: DiskPlan) -> None:
    """Create ``plan.target`` (0600): an empty qcow2 of the disk's size, on its parent for an incremental.

    :raise CommandError: qemu-img failed
    """
    backing = None
    if plan.parent is not None:
        # relative, so the chain can be moved as a whole (repository directories)
        backing = Path(os.path.relpath(plan.parent.resolve(), plan.target.parent.resolve()))
    qemu_img.create(runner, plan.target, "qcow2", plan.disk.virtual_size, backing=backing)
    os.chmod(plan.target, 0o600)


# -- the backup's references --------------------------------------------------------------------------------


@attrs.frozen
class BackupSet:
    """One backup of several disks at one instant, as its snapshot references describe it.

    :param name: the snapshot name create was given
    :param set_id: unique per backup (``name-<8 hex>``): the disks whose outcome settles the bitmaps together
    :param mode: push or pull
    :param bitmap: the persistent dirty bitmap's name
    :param since: the backup id an incremental is relative to ("" if unknown)
    :param fallback: why an incremental became a full backup ("" if it did not)
    :param disks: the names of all disks of the backup
    :param offline: taken of powered-off images (with qemu-img and qemu-nbd, not QMP)
    """

    name: str
    set_id: str
    mode: Mode
    bitmap: str
    since: str
    fallback: str
    disks: tuple[str, ...]
    offline: bool = False

    @property
    def suffix(self) -> str:
        """The random part of :attr:`set_id`: it makes job ids unique per backup."""
        return self.set_id.rsplit("-", 1)[-1]

    def details(self, plan: DiskPlan) -> dict[str, str]:
        """The details every reference of this backup carries."""
        fresh = plan.bitmap_state != "ok"
        return {
            "kind": "incremental" if plan.incremental else "full",
            "bitmap": self.bitmap,
            "pending": "" if fresh else pending_name(self.bitmap),
            "bitmap_new": "1" if fresh else "",
            "target": str(plan.target) if self.mode == "push" else "",
            "parent": str(plan.parent) if plan.parent is not None else "",
            "since": self.since if plan.incremental else "",
            "fallback": self.fallback,
            "mode": self.mode,
            "device_node": plan.disk.node_name,
            "set": self.set_id,
            "disks": ",".join(self.disks),
            **({"offline": "1"} if self.offline else {}),
        }

    def ref(self, plan: DiskPlan, location: Path, extra: Mapping[str, str] | None = None) -> SnapshotRef:
        """The snapshot reference of ``plan``'s disk, at ``location``, with ``extra`` details."""
        details = {**self.details(plan), **(extra or {})}
        return SnapshotRef(STRATEGY, self.name, plan.disk, location=str(location), details=details)


def since_of(snap: SnapshotRef) -> str | None:
    """The backup id ``snap``'s content is relative to (None: it is a full backup)."""
    if snap.details.get("kind") != "incremental":
        return None
    return snap.details.get("since") or None


def nbd_source(snap: SnapshotRef, uri: str) -> ExportSource:
    """The NBD :class:`ExportSource` of ``snap`` served at ``uri``: for an incremental, with the pending
    bitmap's ``qemu:dirty-bitmap:`` context that marks what changed since the parent."""
    incremental = snap.details.get("kind") == "incremental"
    return ExportSource(
        kind="nbd",
        location=uri,
        format="raw",
        disk=snap.disk,
        virtual_size=snap.disk.virtual_size,
        dirty_bitmap=dirty_context(snap.details.get("pending", "")) if incremental else None,
        since=since_of(snap),
    )


@attrs.frozen
class Records:
    """The record files of the backups in ``target_dir``: one 0600 JSON file per disk, so that ``list``,
    ``delete`` and ``rollback`` work from another process."""

    target_dir: Path

    def path(self, disk_name: str) -> Path:
        """``target_dir/.<disk>.vmsnap-backup.json``."""
        return self.target_dir / f".{disk_name}{SIDECAR_SUFFIX}"

    def write(self, ref: SnapshotRef) -> None:
        """Record ``ref``'s name and details (0600)."""
        fd = os.open(self.path(ref.disk.name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"name": ref.name, "details": dict(ref.details)}, out)

    def read(self, disk_name: str) -> dict[str, Any] | None:
        """The record of ``disk_name``'s backup, or None (none, or unreadable)."""
        try:
            data = json.loads(self.path(disk_name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("details"), dict) else None

    def ref(self, disk: Disk) -> SnapshotRef | None:
        """The recorded backup of ``disk`` as a reference, or None."""
        record = self.read(disk.name)
        if record is None:
            return None
        details = {str(k): str(v) for k, v in record["details"].items()}
        return SnapshotRef(
            STRATEGY, str(record["name"]), disk, location=details.get("target", ""), details=details
        )

    def remove(self, disk_name: str) -> None:
        """Forget ``disk_name``'s backup (no error when there is no record)."""
        self.path(disk_name).unlink(missing_ok=True)

    def refuse_existing(self, disk: Disk, target: Path | None) -> None:
        """:raise UsageError: a backup of ``disk`` is recorded here, or ``target`` exists already."""
        existing = self.read(disk.name)
        if existing is not None or (target is not None and target.exists()):
            what = f"backup {existing['name']!r}" if existing else "a backup"
            raise UsageError(
                f"{what} of disk {disk.name!r} exists already in {self.target_dir}",
                hint="delete it, move it away, or choose an empty target directory",
            )


# -- failing cleanly ----------------------------------------------------------------------------------------


def backup_failed(
    what: str, disks: Sequence[str], err: VmsnapError | OSError, *, hint: str, verb: str = "could not start"
) -> SnapshotError:
    """The one-line error of a backup of ``disks`` that failed because of ``err``."""
    reason = err.message if isinstance(err, VmsnapError) else f"{err.strerror or err} ({err.filename})"
    return SnapshotError(f"{what} of {', '.join(disks)} {verb}: {reason}", hint=hint)
