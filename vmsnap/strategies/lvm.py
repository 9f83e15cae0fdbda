"""The lvm strategy: an LVM snapshot of the logical volume under a VM's disk (the LV, or its filesystem).

Classic snapshots get a copy-on-write area sized by a rule the caller can override and are watched for
overflow; thin snapshots need no size. Every command runs through a Runner (host, SSH, or a guest's agent).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import ClassVar

import attrs

from vmsnap.errors import (
    CommandError,
    NotFoundError,
    SnapshotError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.runner import Runner
from vmsnap.strategies.base import Capabilities
from vmsnap.strategies.lvm_tool import LogicalVolume, Lvm, LvmLocation, lvm_location
from vmsnap.strategies.storage import StorageScopeWarning, mounted_read_only
from vmsnap.strategies.volume_snapshots import (
    VolumePlan,
    VolumeSnapshotStrategy,
    naming_disk,
    users_by_volume,
)
from vmsnap.vm.machine import Machine

#: every LV this strategy creates carries this tag (``lvs @vmsnap`` lists them)
SNAPSHOT_TAG = "vmsnap"
#: the part of a snapshot LV's name between the origin's name and the snapshot's name
NAME_MARKER = ".vmsnap."
#: how the filesystem of a file disk's snapshot is mounted for its export (xfs adds ``nouuid``: the
#: snapshot has its origin's UUID, which is mounted)
EXPORT_MOUNT_OPTIONS = "ro,nodev,nosuid,noexec"

MiB = 1 << 20
DEFAULT_FRACTION = 0.2
DEFAULT_MINIMUM = 64 * MiB

SizeRule = int | float | str | None
"""How big a classic snapshot's copy-on-write area is: bytes (int), a fraction of the origin (float, or a
string like ``"25%"``), a size string (``"512M"``, ``"2G"``), or None for the default (20 % of the origin,
at least 64 MiB, never more than the origin needs)."""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def cow_size(rule: SizeRule, origin_size: int) -> int:
    """The copy-on-write size in bytes that ``rule`` asks for, for an origin of ``origin_size`` bytes.

    A snapshot never needs more than its origin (plus LVM's small exception-store overhead), so the
    result is capped at ``origin_size + origin_size // 64 + 1 MiB``; LVM rounds it up to whole extents.

    :raise UsageError: the rule is malformed, zero or negative
    """
    cap = origin_size + origin_size // 64 + MiB
    if rule is None:
        wanted = max(int(origin_size * DEFAULT_FRACTION), DEFAULT_MINIMUM)
    elif isinstance(rule, bool):
        raise UsageError(f"snapshot_size {rule!r} is not a size", hint="pass bytes, '512M', '25%' or 0.25")
    elif isinstance(rule, int):
        wanted = rule
    elif isinstance(rule, float):
        wanted = math.ceil(origin_size * rule)
    else:
        text = rule.strip()
        if text.endswith("%"):
            try:
                wanted = math.ceil(origin_size * float(text[:-1]) / 100.0)
            except ValueError as err:
                raise UsageError(f"snapshot_size {rule!r} is not a percentage", hint="e.g. '25%'") from err
        else:
            match = _SIZE_RE.match(text)
            if match is None:
                raise UsageError(
                    f"snapshot_size {rule!r} is not a size", hint="e.g. 512M, 2G, 1073741824 or 25%"
                )
            wanted = math.ceil(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if wanted <= 0:
        raise UsageError(f"snapshot_size {rule!r} is not positive", hint="e.g. 512M or 25%")
    return min(wanted, cap)


#: the tag that marks a disk as a user of a snapshot LV (one LV may hold several disks' images)
USER_TAG_PREFIX = "vmsnap.disk="
_TAG_RE = re.compile(r"^[A-Za-z0-9_+.\-/=!:&#]{1,100}$")


def user_tag(disk_name: str) -> str | None:
    """The LV tag that says ``disk_name`` uses a snapshot, or None when the name has characters LVM tags
    cannot hold (then the first delete of any of its disks removes the snapshot)."""
    tag = f"{USER_TAG_PREFIX}{disk_name}"
    return tag if _TAG_RE.match(tag) else None


def snapshot_lv_name(origin: str, name: str) -> str:
    """The snapshot LV's name: ``<origin>.vmsnap.<name>`` (LVM allows at most 127 characters).

    :raise UsageError: the name is invalid or the result too long
    """
    lv_name = f"{origin}{NAME_MARKER}{validate_name(name, 'snapshot name')}"
    if len(lv_name) > 127:
        raise UsageError(
            f"snapshot LV name {lv_name!r} is longer than LVM's 127 characters", hint="use a shorter name"
        )
    return lv_name


@attrs.frozen
class _LvSnapshot:
    """One origin LV, the snapshot to make of it, and the disks that use it."""

    origin: LogicalVolume
    lv_name: str
    size: int | None  # None: thin
    users: tuple[str, ...] = ()

    @property
    def full_name(self) -> str:
        """The snapshot LV as ``vg/lv``."""
        return f"{self.origin.vg}/{self.lv_name}"

    @property
    def tags(self) -> list[str]:
        """``vmsnap``, then one user tag per disk whose name a tag can hold."""
        return [SNAPSHOT_TAG, *(tag for tag in map(user_tag, self.users) if tag is not None)]


class LvmSnapshotStrategy(VolumeSnapshotStrategy[_LvSnapshot, LvmLocation]):
    """Snapshot the LVM logical volume under each disk: works for raw or qcow2 on an LV and for image files
    on a filesystem on an LV.

    Pick it when VM storage is on LVM already and you want a block-level snapshot QEMU knows nothing about.
    A classic snapshot slows every first write to a block of the origin (copy-on-write: measured 62-67 MB/s
    against 614-723 MB/s without one, under TCG in the lab guest) and becomes *invalid* when its
    copy-on-write area fills, so size it for the writes expected while it exists (``snapshot_size``) and
    keep it short-lived; thin snapshots (thin-pool LVs) have neither a size nor that cliff. Its scope is
    *all storage*: every file on the LV's filesystem, other VMs' included, is in the snapshot and goes back
    on rollback (``lvconvert --merge``).

    :param machine: the VM (running: paused around the snapshot; offline: not)
    :param runner: where ``lvm``/``mount`` run (default: the machine's runner)
    :param snapshot_size: copy-on-write size of classic snapshots (see :data:`SizeRule`)
    :param mount_base: directory in which exports of image files mount the snapshot read-only
    """

    name: ClassVar[str] = "lvm"
    traits: ClassVar[Traits] = Traits(
        qemu_command="stop / cont around it",
        libvirt_command="virsh suspend / resume (no native command)",
        os_command="lvcreate -s",
        snapshot_is="block device (copy-on-write LV)",
        scope="all storage",
        technology="device-mapper snapshot / thin pool",
        copy_out="read the device, or mount read-only and copy",
        write_cost="high: first write copies the old block (~10x slower)",
        delete_cost="none (lvremove drops the CoW area)",
        rollback_cost="merge copies every changed block back",
    )
    capabilities: ClassVar[Capabilities] = Capabilities(instant="pause", online=True, offline=True)

    def __init__(
        self,
        machine: Machine,
        *,
        runner: Runner | None = None,
        snapshot_size: SizeRule = None,
        mount_base: str = "/tmp",
    ) -> None:
        super().__init__(machine, runner)
        self.lvm = Lvm(self.runner)
        self.snapshot_size = snapshot_size
        cow_size(snapshot_size, 1 << 30)  # a malformed rule fails here, not halfway through a backup
        self.mount_base = mount_base
        self._merged: set[str] = set()  # snapshot LVs this instance merged (disks sharing one LV)

    # -- helpers ------------------------------------------------------------------------------------

    def _locate(self, disk: Disk, volumes: Sequence[LogicalVolume]) -> LvmLocation:
        with naming_disk(disk):
            return lvm_location(self.runner, disk.file, volumes)

    def _snapshot_lv(self, snap: SnapshotRef) -> str:
        full = snap.details.get("snapshot_lv", "")
        if not full:
            raise SnapshotError(f"snapshot {snap.name} has no LV recorded", hint="is it an lvm one?")
        return full

    @staticmethod
    def _details(
        origin: LogicalVolume, snapshot_lv: str, thin: bool, location: LvmLocation
    ) -> dict[str, str]:
        """What a ref records (the same for create and list; create adds the pause and the size)."""
        details = {
            "origin": origin.full_name,
            "snapshot_lv": snapshot_lv,
            "thin": "1" if thin else "0",
            "kind": "file" if location.is_file else "device",
        }
        if location.is_file and location.mount is not None:
            details["relative"] = str(location.relative)
            details["fstype"] = location.mount.fstype
        return details

    # -- the contract -------------------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True when the disk is an LV or a file on a filesystem on an LV."""
        try:
            lvm_location(self.runner, disk.file)
        except (UnsupportedError, NotFoundError, CommandError):
            return False
        return True

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Snapshot the LV under every disk (each LV once), inside ``stop``/``cont`` when the VM runs
        (:meth:`VolumeSnapshotStrategy.create`).

        :raise UnsupportedError: a disk is not on LVM (naming what it is on)
        :raise SnapshotError: the volume group lacks space, or lvcreate failed; nothing is left behind
        """
        return super().create(disks, name=name)

    def _plan(self, disks: Sequence[Disk], name: str) -> VolumePlan[_LvSnapshot, LvmLocation]:
        volumes = self.lvm.volumes()
        placements = tuple((disk, self._locate(disk, volumes)) for disk in disks)
        origins = {location.volume.full_name: location.volume for _, location in placements}
        for origin in origins.values():
            if origin.is_snapshot and not origin.is_thin:
                raise UnsupportedError(
                    f"{origin.full_name} is itself a classic snapshot", hint="snapshot its origin instead"
                )
        users = users_by_volume((disk.name, location.volume.full_name) for disk, location in placements)
        targets = []
        for full_name, disk_names in users.items():
            origin = origins[full_name]
            size = None if origin.is_thin else cow_size(self.snapshot_size, origin.size)
            targets.append(_LvSnapshot(origin, snapshot_lv_name(origin.name, name), size, disk_names))
        existing = {v.full_name for v in volumes}
        for target in targets:
            if target.full_name in existing:
                raise SnapshotError(f"snapshot {target.full_name} exists already", hint="use another name")
        return VolumePlan(name, tuple(targets), placements)

    def _prepare(self, plan: VolumePlan[_LvSnapshot, LvmLocation], undo: contextlib.ExitStack) -> None:
        """Refuse, before anything is made, snapshots the volume groups have no room for."""
        classic = [t for t in plan.targets if t.size is not None]
        for vg in sorted({t.origin.vg for t in classic}):
            space = self.lvm.group_space(vg)
            extents = sum(-(-(t.size or 0) // space.extent_size) for t in classic if t.origin.vg == vg)
            if extents * space.extent_size > space.free:
                raise SnapshotError(
                    f"volume group {vg} has {space.free // MiB} MiB free; the snapshot(s) need "
                    f"{extents * space.extent_size // MiB} MiB",
                    hint="free space in the volume group (vgextend) or pass a smaller snapshot_size; "
                    "nothing was created",
                )

    def _snapshot(self, target: _LvSnapshot) -> None:
        self.lvm.create_snapshot(target.origin.full_name, target.lv_name, size=target.size, tags=target.tags)

    def _discard(self, target: _LvSnapshot) -> None:
        with contextlib.suppress(VmsnapError):  # also when it was never made: lvremove fails, quietly
            self.lvm.remove(target.full_name)

    def _snapshot_failed(self, target: _LvSnapshot, err: VmsnapError) -> SnapshotError:
        return SnapshotError(
            f"lvcreate of a snapshot of {target.origin.full_name} failed: {err.message}",
            hint="check free space in the volume group (vgs); nothing was left behind",
        )

    def _refs(self, plan: VolumePlan[_LvSnapshot, LvmLocation], paused_ms: float) -> list[SnapshotRef]:
        on_filesystems = {loc.mount.mount_point: loc.volume for _, loc in plan.placements if loc.mount}
        for mount_point, volume in on_filesystems.items():
            self._warn(
                f"the snapshot of {volume.full_name} holds every file under {mount_point}, not only this "
                "VM's disks, and a rollback turns all of them back",
                StorageScopeWarning,
            )
        targets = {t.origin.full_name: t for t in plan.targets}
        refs = []
        for disk, location in plan.placements:
            target = targets[location.volume.full_name]
            details = self._details(target.origin, target.full_name, target.size is None, location)
            details["paused_ms"] = f"{paused_ms:.1f}"
            if target.size is not None:
                details["cow_size"] = str(target.size)
            if location.is_file and location.mount is not None:
                details["warning"] = (
                    f"the snapshot holds all of {location.mount.mount_point} ({target.origin.full_name}), "
                    "not only this disk; rollback turns all of it back (scope: all storage)"
                )
            refs.append(SnapshotRef(self.name, plan.name, disk, f"/dev/{target.full_name}", details))
        return refs

    def fill(self, snap: SnapshotRef) -> float | None:
        """How full the snapshot's copy-on-write area is, in percent (``lvs -o snap_percent``).

        :raise NotFoundError: the snapshot LV is gone
        """
        return self.lvm.volume(self._snapshot_lv(snap)).snap_percent

    def _check_valid(self, snap: SnapshotRef, volume: LogicalVolume) -> None:
        """:raise SnapshotError: the snapshot overflowed (its content is lost)."""
        if volume.is_invalid:
            raise SnapshotError(
                f"snapshot {volume.full_name} of disk {snap.disk.name} is invalid: its copy-on-write area "
                f"({volume.size // MiB} MiB) ran full, so its content is lost and no backup was made of it",
                hint="delete it and snapshot again with a larger snapshot_size, or keep the snapshot shorter",
            )

    @contextlib.contextmanager
    def _failing_on_overflow(self, snap: SnapshotRef, full: str) -> Iterator[None]:
        """After the body, also when it raised: an overflow during the copy makes whatever was read
        worthless, so say so, loudly (the body's own error becomes the cause)."""
        failed: BaseException | None = None
        try:
            yield
        except BaseException as err:
            failed = err
            raise
        finally:
            try:
                self._check_valid(snap, self.lvm.volume(full))
            except SnapshotError as err:
                raise err from failed

    @contextlib.contextmanager
    def _export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        full = self._snapshot_lv(snap)
        volume = self.lvm.volume(full)
        self._check_valid(snap, volume)
        disk = snap.disk
        with contextlib.ExitStack() as cleanup:
            if snap.details.get("thin") == "1":
                self.lvm.activate(full, ignore_skip=True)
                cleanup.callback(self._deactivate_quietly, full)
            if snap.details.get("kind") == "file":
                options = EXPORT_MOUNT_OPTIONS + (",nouuid" if snap.details.get("fstype") == "xfs" else "")
                mount_dir = cleanup.enter_context(
                    mounted_read_only(
                        self.runner, volume.device, base=self.mount_base, prefix="vmsnap-lvm", options=options
                    )
                )
                location = str(mount_dir / snap.details["relative"])
                source = ExportSource("file", location, disk.format, disk, disk.virtual_size)
            else:
                source = ExportSource("block", volume.device, disk.format, disk, disk.virtual_size)
            with self._failing_on_overflow(snap, full):
                yield source

    def _deactivate_quietly(self, full: str) -> None:
        with contextlib.suppress(VmsnapError):
            self.lvm.deactivate(full)

    def export(self, snap: SnapshotRef) -> contextlib.AbstractContextManager[ExportSource]:
        """The snapshot device (disk is the LV), or the image file on the snapshot mounted read-only.

        The fill level is checked before and after the body: a snapshot that is or became invalid
        (overflowed) raises :class:`SnapshotError` so no silently broken backup is kept.

        :raise NotFoundError: the snapshot LV is gone
        :raise SnapshotError: the snapshot is invalid (full)
        """
        return self._export(snap)

    def delete(self, snap: SnapshotRef) -> None:
        """Drop this disk's use of the snapshot LV; ``lvremove -y`` it with its last user (several disks'
        images on one LV share one snapshot). A no-op when it is gone.

        :raise SnapshotError: lvremove failed (e.g. the snapshot is mounted)
        """
        full = self._snapshot_lv(snap)
        volume = self.lvm.find(full)
        if volume is None:
            return
        users = [t for t in volume.tags if t.startswith(USER_TAG_PREFIX)]
        mine = user_tag(snap.disk.name)
        if mine is not None and mine in users and len(users) > 1:
            self.lvm.delete_tag(full, mine)
            return
        if users and mine is not None and mine not in users:
            return  # this disk let go of it already; others still use it
        try:
            self.lvm.remove(full)
        except CommandError as err:
            raise SnapshotError(
                f"cannot remove snapshot {full}: {err.message}",
                hint="check that nothing has it mounted (umount), then `lvremove -y` it",
            ) from err

    def rollback(self, snap: SnapshotRef) -> None:
        """Merge the snapshot back into its origin (``lvconvert --merge``); the snapshot is consumed.

        When the origin is open (mounted, or held by a process), LVM defers the merge to the origin's next
        activation: the method returns, and :attr:`warnings` says how to finish it
        (``umount``, ``lvchange -an``, ``lvchange -ay``). Every file of the LV goes back, not only this disk.

        :raise SnapshotError: the VM runs, the snapshot is invalid, or lvconvert failed
        """
        self._refuse_while_running("merging a snapshot changes the blocks under it")
        full = self._snapshot_lv(snap)
        try:
            volume = self.lvm.volume(full)
        except NotFoundError:
            if full in self._merged:
                return  # another disk on the same LV rolled it back already
            raise
        if full in self._merged or volume.attr[:1] == "S":
            return  # its merge is under way (or waits for the origin's next activation)
        self._check_valid(snap, volume)
        self._merged.add(full)
        try:
            printed = self.lvm.merge(full)
        except CommandError as err:
            raise SnapshotError(
                f"cannot merge {full} into {snap.details.get('origin', '?')}: {err.message}",
                hint="see `lvs -a`; the origin is unchanged unless lvs shows it merging",
            ) from err
        if not self.lvm.exists(full):
            return  # merged
        origin = snap.details.get("origin", "the origin")
        self._warn(
            f"the merge of {full} into {origin} starts on its next activation because {origin} "
            f"is open now ({printed.strip() or 'in use'}): unmount it / stop its users, then "
            f"`lvchange -an {origin}` and `lvchange -ay {origin}`"
        )

    def merge_pending(self, snap: SnapshotRef) -> bool:
        """True while a rollback's merge has not finished (the snapshot LV still exists)."""
        return self.lvm.exists(self._snapshot_lv(snap))

    def list(self) -> Sequence[SnapshotRef]:
        """The snapshots this strategy made of the machine's disks' LVs, oldest first (LV creation time)."""
        refs: list[tuple[str, SnapshotRef]] = []
        disks = self.machine.disks()
        volumes = self.lvm.volumes() if disks else []
        for disk in disks:
            try:
                location = lvm_location(self.runner, disk.file, volumes)
            except (UnsupportedError, NotFoundError):
                continue
            origin = location.volume
            prefix = f"{origin.name}{NAME_MARKER}"
            for volume in volumes:
                if (
                    volume.vg != origin.vg
                    or volume.origin != origin.name
                    or SNAPSHOT_TAG not in volume.tags
                    or not volume.name.startswith(prefix)
                ):
                    continue
                details = self._details(origin, volume.full_name, volume.is_thin, location)
                name = volume.name[len(prefix) :]
                refs.append((volume.created, SnapshotRef(self.name, name, disk, volume.device, details)))
        return [ref for _, ref in sorted(refs, key=lambda item: item[0])]
