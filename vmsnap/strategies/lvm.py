"""The lvm strategy: an LVM snapshot of the logical volume under a VM's disk (the LV, or its filesystem).

Classic snapshots get a copy-on-write area sized by a rule the caller can override and are watched for
overflow; thin snapshots need no size. Every command runs through a Runner (host, SSH, or a guest's agent).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
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
from vmsnap.strategies.base import Capabilities, StrategyBase, paused
from vmsnap.strategies.storage import (
    LogicalVolume,
    LvmLocation,
    StorageNoteWarning,
    StorageScopeWarning,
    list_logical_volumes,
    logical_volume,
    lvm_location,
    volume_group_space,
)
from vmsnap.vm.machine import Machine

#: every LV this strategy creates carries this tag (``lvs @vmsnap`` lists them)
SNAPSHOT_TAG = "vmsnap"
#: the part of a snapshot LV's name between the origin's name and the snapshot's name
NAME_MARKER = ".vmsnap."

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
class _Plan:
    """One origin LV and the snapshot to make of it."""

    origin: LogicalVolume
    lv_name: str
    size: int | None  # None: thin
    users: tuple[str, ...] = ()  # the disks that use this snapshot


class LvmSnapshotStrategy(StrategyBase):
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
        self.machine = machine
        self.runner: Runner = runner if runner is not None else machine.runner
        self.snapshot_size = snapshot_size
        cow_size(snapshot_size, 1 << 30)  # a malformed rule fails here, not halfway through a backup
        self.mount_base = mount_base
        #: human-readable notes from the last calls (a deferred merge, …); never raised
        self.warnings: list[str] = []
        #: how long the VM was paused by the last create, in ms (None: it was not running)
        self.last_pause_ms: float | None = None
        self._merged: set[str] = set()  # snapshot LVs this instance merged (disks sharing one LV)

    # -- helpers ------------------------------------------------------------------------------------

    def _warn(self, message: str, category: type[UserWarning] = StorageNoteWarning) -> None:
        """Keep ``message`` in :attr:`warnings` and issue it with :func:`warnings.warn` for callers."""
        self.warnings.append(message)
        warnings.warn(message, category, stacklevel=3)

    def _lvm(self, *args: str, timeout: float = 600) -> str:
        return self.runner.run(["lvm", *args], timeout=timeout).stdout

    def _locate(self, disk: Disk, volumes: Sequence[LogicalVolume]) -> LvmLocation:
        try:
            return lvm_location(self.runner, disk.file, volumes)
        except UnsupportedError as err:
            raise UnsupportedError(f"disk {disk.name}: {err.message}", hint=err.hint) from err

    def _snapshot_lv(self, snap: SnapshotRef) -> str:
        full = snap.details.get("snapshot_lv", "")
        if not full:
            raise SnapshotError(f"snapshot {snap.name} has no LV recorded", hint="is it an lvm one?")
        return full

    def _remove_quietly(self, full_name: str, *, if_exists: bool = False) -> None:
        with contextlib.suppress(VmsnapError):
            if if_exists:
                try:
                    logical_volume(self.runner, full_name)
                except NotFoundError:
                    return
            self.runner.run(["lvm", "lvremove", "-y", full_name], timeout=600)

    # -- the contract -------------------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True when the disk is an LV or a file on a filesystem on an LV."""
        try:
            lvm_location(self.runner, disk.file)
        except (UnsupportedError, NotFoundError, CommandError):
            return False
        return True

    def create_argv(self, plan: _Plan) -> list[str]:
        """The ``lvcreate`` command for one snapshot (``-L`` only for classic snapshots)."""
        argv = ["lvm", "lvcreate", "-s", "-n", plan.lv_name]
        if plan.size is not None:
            argv += ["-L", f"{plan.size}b"]
        argv += ["--addtag", SNAPSHOT_TAG]
        for user in plan.users:
            tag = user_tag(user)
            if tag is not None:
                argv += ["--addtag", tag]
        return [*argv, plan.origin.full_name]

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Snapshot the LV under every disk (each LV once), inside ``stop``/``cont`` when the VM runs.

        :raise UnsupportedError: a disk is not on LVM (naming what it is on)
        :raise SnapshotError: the volume group lacks space, or lvcreate failed; nothing is left behind
        """
        if not disks:
            raise SnapshotError("no disks to snapshot", hint="pass at least one disk")
        validate_name(name, "snapshot name")
        self.warnings = []
        volumes = list_logical_volumes(self.runner)
        where = [(disk, self._locate(disk, volumes)) for disk in disks]
        plans: dict[str, _Plan] = {}
        for disk, location in where:
            origin = location.volume
            if origin.is_snapshot and not origin.is_thin:
                raise UnsupportedError(
                    f"{origin.full_name} is itself a classic snapshot", hint="snapshot its origin instead"
                )
            if origin.full_name not in plans:
                size = None if origin.is_thin else cow_size(self.snapshot_size, origin.size)
                plans[origin.full_name] = _Plan(origin, snapshot_lv_name(origin.name, name), size)
            plan = plans[origin.full_name]
            plans[origin.full_name] = attrs.evolve(plan, users=(*plan.users, disk.name))
        existing = {v.full_name for v in volumes}
        for plan in plans.values():
            if f"{plan.origin.vg}/{plan.lv_name}" in existing:
                raise SnapshotError(
                    f"snapshot {plan.origin.vg}/{plan.lv_name} exists already", hint="use another name"
                )
        self._check_space(list(plans.values()))
        made: list[str] = []
        failure: tuple[str, VmsnapError] | None = None
        with paused(self.machine) as pause:
            for plan in plans.values():
                try:
                    self.runner.run(self.create_argv(plan), timeout=600)
                except VmsnapError as err:  # also a timeout: never leave some snapshots behind
                    failure = (plan.origin.full_name, err)
                    break
                made.append(f"{plan.origin.vg}/{plan.lv_name}")
        if failure is not None:
            for full_name in made:
                self._remove_quietly(full_name)
            # a timed-out lvcreate may still have made its LV
            self._remove_quietly(f"{plans[failure[0]].origin.vg}/{plans[failure[0]].lv_name}", if_exists=True)
            raise SnapshotError(
                f"lvcreate of a snapshot of {failure[0]} failed: {failure[1].message}",
                hint="check free space in the volume group (vgs); nothing was left behind",
            ) from failure[1]
        self.last_pause_ms = pause["paused_ms"] if self.machine.is_running else None
        on_filesystems = {loc.mount.mount_point: loc.volume for _, loc in where if loc.mount is not None}
        for mount_point, volume in on_filesystems.items():
            self._warn(
                f"the snapshot of {volume.full_name} holds every file under {mount_point}, not only this "
                "VM's disks, and a rollback turns all of them back",
                StorageScopeWarning,
            )
        refs = []
        for disk, location in where:
            plan = plans[location.volume.full_name]
            details = {
                "origin": plan.origin.full_name,
                "snapshot_lv": f"{plan.origin.vg}/{plan.lv_name}",
                "thin": "1" if plan.size is None else "0",
                "paused_ms": f"{pause['paused_ms']:.1f}",
                "kind": "file" if location.is_file else "device",
            }
            if plan.size is not None:
                details["cow_size"] = str(plan.size)
            if location.is_file and location.mount is not None:
                details["relative"] = str(location.relative)
                details["fstype"] = location.mount.fstype
                details["warning"] = (
                    f"the snapshot holds all of {location.mount.mount_point} ({plan.origin.full_name}), "
                    "not only this disk; rollback turns all of it back (scope: all storage)"
                )
            refs.append(SnapshotRef(self.name, name, disk, f"/dev/{plan.origin.vg}/{plan.lv_name}", details))
        return refs

    def _check_space(self, plans: Sequence[_Plan]) -> None:
        for vg in sorted({p.origin.vg for p in plans if p.size is not None}):
            space = volume_group_space(self.runner, vg)
            extents = sum(
                -(-p.size // space.extent_size) for p in plans if p.origin.vg == vg and p.size is not None
            )
            if extents * space.extent_size > space.free:
                raise SnapshotError(
                    f"volume group {vg} has {space.free // MiB} MiB free; the snapshot(s) need "
                    f"{extents * space.extent_size // MiB} MiB",
                    hint="free space in the volume group (vgextend) or pass a smaller snapshot_size; "
                    "nothing was created",
                )

    def fill(self, snap: SnapshotRef) -> float | None:
        """How full the snapshot's copy-on-write area is, in percent (``lvs -o snap_percent``).

        :raise NotFoundError: the snapshot LV is gone
        """
        return logical_volume(self.runner, self._snapshot_lv(snap)).snap_percent

    def _check_valid(self, snap: SnapshotRef, volume: LogicalVolume) -> None:
        if volume.is_invalid:
            raise SnapshotError(
                f"snapshot {volume.full_name} of disk {snap.disk.name} is invalid: its copy-on-write area "
                f"({volume.size // MiB} MiB) ran full, so its content is lost and no backup was made of it",
                hint="delete it and snapshot again with a larger snapshot_size, or keep the snapshot shorter",
            )

    @contextlib.contextmanager
    def _export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        full = self._snapshot_lv(snap)
        volume = logical_volume(self.runner, full)
        self._check_valid(snap, volume)
        thin = snap.details.get("thin") == "1"
        if thin:
            self.runner.run(["lvm", "lvchange", "-ay", "-K", full], timeout=600)
        mount_dir = ""
        try:
            if snap.details.get("kind") == "file":
                mount_dir = self.runner.run(
                    ["mktemp", "-d", "-p", self.mount_base, "vmsnap-lvm.XXXXXX"], timeout=60
                ).stdout.strip()
                options = "ro,nouuid" if snap.details.get("fstype") == "xfs" else "ro"
                self.runner.run(["mount", "-o", options, volume.device, mount_dir], timeout=600)
                location = str(PurePosixPath(mount_dir) / snap.details["relative"])
                source = ExportSource("file", location, snap.disk.format, snap.disk, snap.disk.virtual_size)
            else:
                source = ExportSource(
                    "block", volume.device, snap.disk.format, snap.disk, snap.disk.virtual_size
                )
            failed: BaseException | None = None
            try:
                yield source
            except BaseException as err:
                failed = err
                raise
            finally:
                # an overflow during the copy makes whatever was read worthless: say so, loudly
                after = logical_volume(self.runner, full)
                if after.is_invalid:
                    try:
                        self._check_valid(snap, after)
                    except SnapshotError as err:
                        raise err from failed
        finally:
            if mount_dir:
                with contextlib.suppress(VmsnapError):
                    self.runner.run(["umount", mount_dir], timeout=600)
                with contextlib.suppress(VmsnapError):
                    self.runner.run(["rmdir", mount_dir], timeout=60)
            if thin:
                with contextlib.suppress(VmsnapError):
                    self.runner.run(["lvm", "lvchange", "-an", full], timeout=600)

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
        try:
            volume = logical_volume(self.runner, full)
        except NotFoundError:
            return
        users = [t for t in volume.tags if t.startswith(USER_TAG_PREFIX)]
        mine = user_tag(snap.disk.name)
        if mine is not None and mine in users and len(users) > 1:
            self.runner.run(["lvm", "lvchange", "--deltag", mine, full], timeout=600)
            return
        if users and mine is not None and mine not in users:
            return  # this disk let go of it already; others still use it
        try:
            self.runner.run(["lvm", "lvremove", "-y", full], timeout=600)
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
        if self.machine.is_running:
            raise SnapshotError(
                f"{self.machine.name} is running: merging a snapshot changes the blocks under it",
                hint="shut the VM down, then roll back",
            )
        full = self._snapshot_lv(snap)
        try:
            volume = logical_volume(self.runner, full)
        except NotFoundError:
            if full in self._merged:
                return  # another disk on the same LV rolled it back already
            raise
        if full in self._merged or volume.attr[:1] == "S":
            return  # its merge is under way (or waits for the origin's next activation)
        self._check_valid(snap, volume)
        self._merged.add(full)
        try:
            result = self.runner.run(["lvm", "lvconvert", "--merge", "-i", "1", full], timeout=3600)
        except CommandError as err:
            raise SnapshotError(
                f"cannot merge {full} into {snap.details.get('origin', '?')}: {err.message}",
                hint="see `lvs -a`; the origin is unchanged unless lvs shows it merging",
            ) from err
        try:
            still = logical_volume(self.runner, full)
        except NotFoundError:
            return  # merged
        origin = snap.details.get("origin", "the origin")
        self._warn(
            f"the merge of {still.full_name} into {origin} starts on its next activation because {origin} "
            f"is open now ({result.stdout.strip() or 'in use'}): unmount it / stop its users, then "
            f"`lvchange -an {origin}` and `lvchange -ay {origin}`"
        )

    def merge_pending(self, snap: SnapshotRef) -> bool:
        """True while a rollback's merge has not finished (the snapshot LV still exists)."""
        try:
            logical_volume(self.runner, self._snapshot_lv(snap))
        except NotFoundError:
            return False
        return True

    def list(self) -> Sequence[SnapshotRef]:
        """The snapshots this strategy made of the machine's disks' LVs, oldest first (LV creation time)."""
        refs: list[tuple[str, SnapshotRef]] = []
        disks = self.machine.disks()
        volumes = list_logical_volumes(self.runner) if disks else []
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
                details = {
                    "origin": origin.full_name,
                    "snapshot_lv": volume.full_name,
                    "thin": "1" if volume.is_thin else "0",
                    "kind": "file" if location.is_file else "device",
                }
                if location.is_file and location.mount is not None:
                    details["relative"] = str(location.relative)
                    details["fstype"] = location.mount.fstype
                name = volume.name[len(prefix) :]
                refs.append((volume.created, SnapshotRef(self.name, name, disk, volume.device, details)))
        return [ref for _, ref in sorted(refs, key=lambda item: item[0])]
