"""The btrfs strategy: a read-only snapshot of every Btrfs subvolume that holds the VM's disk images.

QEMU is paused (``stop`` flushes its cached qcow2 metadata) for the few milliseconds the snapshots take, then
resumed; the snapshots live in a hidden ``.vmsnap`` directory at the top of the Btrfs mount.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import ClassVar

import attrs

from vmsnap.errors import CommandError, NotFoundError, SnapshotError, UnsupportedError, VmsnapError
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.runner import Runner
from vmsnap.strategies.base import Capabilities
from vmsnap.strategies.btrfs_tool import Btrfs, BtrfsLocation, btrfs_location, is_btrfs_subvolume
from vmsnap.strategies.storage import StorageScopeWarning, existing_paths, quietly
from vmsnap.strategies.volume_snapshots import (
    VolumePlan,
    VolumeSnapshotStrategy,
    naming_disk,
    users_by_volume,
)
from vmsnap.vm.machine import Machine

SNAPSHOT_DIR_NAME = ".vmsnap"
#: the name, inside a snapshot set, of the snapshot of the subvolume mounted at the mount point itself
MOUNTED_SUBVOLUME_TAG = "@"
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"


def snapshot_set_id(name: str, when: datetime | None = None) -> str:
    """The directory name of one snapshot set: a UTC time stamp, then the user's name (sorts by time)."""
    stamp = (when or datetime.now(UTC)).strftime(_STAMP_FORMAT)
    return f"{stamp}-{validate_name(name, 'snapshot name')}"


def name_of_set(set_id: str) -> str:
    """The user's snapshot name inside a snapshot set id (inverse of :func:`snapshot_set_id`)."""
    return set_id.split("-", 1)[1] if "-" in set_id else set_id


@attrs.frozen
class _Placement:
    """Where one disk lives: the subvolume of its image, and those of its backing files (outermost first)."""

    top: BtrfsLocation
    backing: tuple[BtrfsLocation, ...] = ()

    @property
    def locations(self) -> tuple[BtrfsLocation, ...]:
        return (self.top, *self.backing)


@attrs.frozen
class _SubvolumeSnapshot:
    """One live subvolume, where its read-only snapshot goes, and the disks that use it."""

    live: PurePosixPath
    target: PurePosixPath
    location: BtrfsLocation
    set_id: str
    users: tuple[str, ...]


class BtrfsSnapshotStrategy(VolumeSnapshotStrategy[_SubvolumeSnapshot, _Placement]):
    """Snapshot the Btrfs subvolumes under a VM's images: instant, any image format, any number of VMs.

    Pick it when the images live on Btrfs and you want near-zero pause and zero write amplification in QEMU
    (the copy-on-write is Btrfs's own, which it does anyway). Its scope is *all storage*: every file in the
    subvolume — other VMs' images included — is in the snapshot and goes back in time on rollback; keep each
    VM in its own subvolume. Rollback swaps subvolumes and needs the VM off.

    :param machine: the VM (running: paused around the snapshot; offline: not)
    :param runner: where ``btrfs``/``stat``/``mv`` run (default: the machine's runner)
    :param snapshot_dir: where snapshot sets go (default: ``.vmsnap`` at the top of each disk's Btrfs mount);
        must be on the same Btrfs filesystem as the disks
    :param commit_on_delete: wait for the deletion to be committed (``btrfs subvolume delete -c``)
    :param report_other_files: list the files that are captured besides the VM's images (a warning)
    """

    name: ClassVar[str] = "btrfs"
    traits: ClassVar[Traits] = Traits(
        qemu_command="stop / cont around it (flushes qcow2 metadata)",
        libvirt_command="virsh suspend / resume (no native command)",
        os_command="btrfs subvolume snapshot -r",
        snapshot_is="read-only subvolume (directory)",
        scope="all storage",
        technology="Btrfs copy-on-write trees",
        copy_out="copy / reflink / rsync of the file",
        write_cost="low: Btrfs is copy-on-write anyway; more fragmentation",
        delete_cost="background cleaner frees unshared extents",
        rollback_cost="instant subvolume swap (VM off)",
    )
    capabilities: ClassVar[Capabilities] = Capabilities(instant="pause", online=True, offline=True)

    def __init__(
        self,
        machine: Machine,
        *,
        runner: Runner | None = None,
        snapshot_dir: str | Path | None = None,
        commit_on_delete: bool = False,
        report_other_files: bool = True,
    ) -> None:
        super().__init__(machine, runner)
        self.btrfs = Btrfs(self.runner)
        self.snapshot_dir = PurePosixPath(snapshot_dir) if snapshot_dir is not None else None
        self.commit_on_delete = commit_on_delete
        self.report_other_files = report_other_files

    # -- helpers ------------------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], what: str, hint: str) -> None:
        try:
            self.runner.run(argv, timeout=600)
        except CommandError as err:
            raise SnapshotError(f"{what}: {err.message}", hint=hint) from err

    def _snapshot_root(self, location: BtrfsLocation) -> PurePosixPath:
        if self.snapshot_dir is not None:
            return self.snapshot_dir
        return location.mount.mount_point / SNAPSHOT_DIR_NAME

    def _target(self, location: BtrfsLocation, set_id: str) -> PurePosixPath:
        inside = location.subvolume_in_mount
        tag = MOUNTED_SUBVOLUME_TAG if inside == PurePosixPath(".") else inside
        return self._snapshot_root(location) / set_id / tag

    def _place(self, disk: Disk) -> _Placement:
        with naming_disk(disk):
            top = btrfs_location(self.runner, disk.file)
            return _Placement(top, tuple(btrfs_location(self.runner, b) for b in disk.backing_chain))

    def _details(self, set_id: str, place: _Placement, paused_ms: float | None = None) -> dict[str, str]:
        """What a ref of this disk in snapshot set ``set_id`` records (create adds the pause)."""
        details = {
            "set": set_id,
            "snapshot_subvolume": str(self._target(place.top, set_id)),
            "live_subvolume": str(place.top.subvolume),
            "relative": str(place.top.relative),
        }
        if paused_ms is not None:
            details["paused_ms"] = f"{paused_ms:.1f}"
        for depth, location in enumerate(place.backing):
            target = self._target(location, set_id)
            details[f"backing.{depth}"] = str(target / location.relative)
            details[f"backing_subvolume.{depth}"] = str(target)
        return details

    # -- the contract -------------------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True when the disk's image (and its backing files) are in Btrfs subvolumes."""
        try:
            for path in (disk.file, *disk.backing_chain):
                btrfs_location(self.runner, path)
        except (UnsupportedError, NotFoundError):
            return False
        return True

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Snapshot, read-only, every subvolume holding one of ``disks`` (or their backing files), while
        the VM is paused (:meth:`VolumeSnapshotStrategy.create`).

        :raise UnsupportedError: a disk is not on Btrfs (naming the filesystem found)
        :raise SnapshotError: a snapshot failed; those already made are deleted again, the VM runs
        """
        return super().create(disks, name=name)

    def _plan(self, disks: Sequence[Disk], name: str) -> VolumePlan[_SubvolumeSnapshot, _Placement]:
        set_id = snapshot_set_id(name)
        placements = tuple((disk, self._place(disk)) for disk in disks)
        first: dict[PurePosixPath, BtrfsLocation] = {}
        for _, place in placements:
            for location in place.locations:
                first.setdefault(location.subvolume, location)
        users = users_by_volume(
            (disk.name, location.subvolume) for disk, place in placements for location in place.locations
        )
        targets = tuple(
            _SubvolumeSnapshot(live, self._target(first[live], set_id), first[live], set_id, disk_names)
            for live, disk_names in users.items()
        )
        self._refuse_existing_name(name, targets)
        return VolumePlan(name, targets, placements)

    def _prepare(self, plan: VolumePlan[_SubvolumeSnapshot, _Placement], undo: contextlib.ExitStack) -> None:
        for target in plan.targets:
            undo.callback(self._tidy_set_directories, target.target.parent, target.set_id)
            root = self._snapshot_root(target.location)
            self._run(
                ["mkdir", "-p", "-m", "0700", "--", str(root)],
                f"cannot create {root}",
                "check permissions and free space",
            )
            self._run(
                ["mkdir", "-p", "-m", "0700", "--", str(target.target.parent)],
                f"cannot create {target.target.parent}",
                "check permissions and free space on the Btrfs filesystem",
            )

    def _snapshot(self, target: _SubvolumeSnapshot) -> None:
        self.btrfs.snapshot(target.live, target.target, read_only=True)

    def _discard(self, target: _SubvolumeSnapshot) -> None:
        with contextlib.suppress(VmsnapError):
            self.btrfs.delete(target.target)
        quietly(self.runner, ["rm", "-f", "--", str(self._users_file(target.target))], timeout=60)

    def _tidy_set_directories(self, start: PurePosixPath, set_id: str) -> None:
        with contextlib.suppress(VmsnapError):
            self._remove_empty_dirs(start, set_id)

    def _snapshot_failed(self, target: _SubvolumeSnapshot, err: VmsnapError) -> SnapshotError:
        return SnapshotError(
            f"btrfs snapshot of {target.live} failed: {err.message}",
            hint="check free space (btrfs filesystem usage) and that the snapshot directory is on the "
            "same Btrfs filesystem; nothing was left behind",
        )

    def _record_users(self, plan: VolumePlan[_SubvolumeSnapshot, _Placement]) -> None:
        try:
            for target in plan.targets:
                self._write_users(target.target, sorted(target.users))
        except VmsnapError as err:
            raise SnapshotError(
                f"cannot record which disks use snapshot {plan.targets[0].set_id}: {err.message}",
                hint="check the snapshot directory's permissions and free space; nothing was left behind",
            ) from err

    def _refs(self, plan: VolumePlan[_SubvolumeSnapshot, _Placement], paused_ms: float) -> list[SnapshotRef]:
        images = {str(loc.file) for _, place in plan.placements for loc in place.locations}
        try:
            others = self._other_files(plan.targets, images) if self.report_other_files else {}
        except VmsnapError as err:  # only a report: the snapshots are good
            self._warn(f"could not list the other files captured with this VM's disks: {err.message}")
            others = {}
        refs = []
        for disk, place in plan.placements:
            details = self._details(plan.targets[0].set_id, place, paused_ms)
            captured = others.get(place.top.subvolume, [])
            if captured:
                details["other_files"] = str(len(captured))
                details["warning"] = (
                    f"the snapshot of {place.top.subvolume} also holds {len(captured)} other file(s), e.g. "
                    f"{', '.join(captured[:3])}; rollback turns them back too (scope: all storage)"
                )
            location = PurePosixPath(details["snapshot_subvolume"]) / place.top.relative
            refs.append(SnapshotRef(self.name, plan.name, disk, str(location), details))
        return refs

    def _set_ids(self, root: PurePosixPath) -> list[str]:
        """The snapshot sets in ``root``, oldest first (empty when it does not exist)."""
        listing = self.runner.run(["ls", "-1", "--", str(root)], ok_codes=(0, 1, 2), timeout=60)
        return sorted(s for s in listing.stdout.splitlines() if s) if listing.exit_code == 0 else []

    def _refuse_existing_name(self, name: str, targets: Sequence[_SubvolumeSnapshot]) -> None:
        """Refuse a name that a snapshot of one of these subvolumes carries already."""
        candidates = []
        for target in targets:
            for set_id in self._set_ids(self._snapshot_root(target.location)):
                if name_of_set(set_id) == name:
                    candidates.append(self._target(target.location, set_id))
        clash = existing_paths(self.runner, candidates)
        if clash:
            raise SnapshotError(
                f"a snapshot named {name} of this storage exists already ({sorted(clash)[0]})",
                hint="use another name, or delete the old snapshot first",
            )

    def _other_files(
        self, targets: Sequence[_SubvolumeSnapshot], images: set[str]
    ) -> dict[PurePosixPath, list[str]]:
        """Files in each snapshot that are not the VM's images (``find -xdev`` stays inside one subvolume)."""
        found: dict[PurePosixPath, list[str]] = {}
        for target in targets:
            live = target.live
            result = self.runner.run(
                ["find", str(target.target), "-xdev", "-type", "f"], ok_codes=(0, 1), timeout=600
            )
            others = []
            for line in result.stdout.splitlines():
                original = live / PurePosixPath(line).relative_to(target.target)
                if str(original) not in images:
                    others.append(str(original))
            if others:
                found[live] = sorted(others)
                self._warn(
                    f"{live} holds {len(others)} file(s) besides this VM's disks (e.g. {others[0]}); "
                    "they are in the snapshot too, and a rollback turns them back",
                    StorageScopeWarning,
                )
        return found

    @contextlib.contextmanager
    def _export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        image = PurePosixPath(snap.location)
        backing = [snap.details[f"backing.{i}"] for i in range(len(snap.disk.backing_chain))]
        paths = [image, *map(PurePosixPath, backing)]
        missing = set(map(str, paths)) - existing_paths(self.runner, paths)
        if missing:
            raise NotFoundError(
                f"snapshot {snap.name} of disk {snap.disk.name}: {sorted(missing)[0]} does not exist",
                hint="list the snapshots with `vmsnap snapshot list`",
            )
        options = {"backing." * (i + 1) + "file.filename": path for i, path in enumerate(backing)}
        yield ExportSource(
            kind="file",
            location=str(image),
            format=snap.disk.format,
            disk=snap.disk,
            virtual_size=snap.disk.virtual_size,
            image_opts=options,
        )

    def export(self, snap: SnapshotRef) -> contextlib.AbstractContextManager[ExportSource]:
        """The image file inside the read-only snapshot (a plain file source, reflink-able on the same fs).

        When the disk has backing files, ``image_opts`` points the chain at their copies in the snapshot.

        :raise NotFoundError: the snapshot is gone
        """
        return self._export(snap)

    def _remove_empty_dirs(self, start: PurePosixPath, set_id: str) -> None:
        """rmdir ``start`` and its parents up to and including the snapshot set directory, while empty."""
        directory = start
        while True:
            result = self.runner.run(["rmdir", "--", str(directory)], ok_codes=(0, 1), timeout=60)
            if result.exit_code != 0 or directory.name == set_id or directory == directory.parent:
                return
            directory = directory.parent

    @staticmethod
    def _users_file(target: PurePosixPath) -> PurePosixPath:
        """Next to each snapshot subvolume: the names of the disks that still use it, one a line."""
        return target.parent / f"{target.name}.disks"

    def _write_users(self, target: PurePosixPath, users: Sequence[str]) -> None:
        path = str(self._users_file(target))
        self.runner.run(["tee", "--", path], input="".join(f"{u}\n" for u in users), timeout=60)
        self.runner.run(["chmod", "0600", "--", path], timeout=60)

    def _release(self, target: PurePosixPath, disk: str, set_id: str) -> None:
        """Drop ``disk`` from the users of one snapshot subvolume; delete the subvolume with its last user."""
        users_file = self._users_file(target)
        listing = self.runner.run(["cat", "--", str(users_file)], ok_codes=(0, 1), timeout=60)
        if listing.exit_code == 0:
            users = [u for u in listing.stdout.splitlines() if u]
            remaining = [u for u in users if u != disk]
            if remaining:
                if remaining != users:
                    self._write_users(target, remaining)
                return
        if is_btrfs_subvolume(self.runner, target):
            try:
                self.btrfs.delete(target, commit=self.commit_on_delete)
            except CommandError as err:
                raise SnapshotError(
                    f"cannot delete snapshot {target}: {err.message}",
                    hint="check that nothing has it mounted or open; `btrfs subvolume delete` it by hand",
                ) from err
        self.runner.run(["rm", "-f", "--", str(users_file)], timeout=60)
        if set_id and set_id in target.parts:
            self._remove_empty_dirs(target.parent, set_id)

    def delete(self, snap: SnapshotRef) -> None:
        """Delete this disk's share of the snapshot: a subvolume snapshot that holds several disks of the
        machine is deleted with the last of them. A no-op when it is gone already.

        :raise SnapshotError: ``btrfs subvolume delete`` failed
        """
        if not snap.details.get("snapshot_subvolume"):
            raise SnapshotError(f"snapshot {snap.name} has no subvolume recorded", hint="is it a btrfs one?")
        targets = [snap.details["snapshot_subvolume"]]
        targets += [v for k, v in sorted(snap.details.items()) if k.startswith("backing_subvolume.")]
        for target in dict.fromkeys(targets):
            self._release(PurePosixPath(target), snap.disk.name, snap.details.get("set", ""))

    def rollback(self, snap: SnapshotRef) -> None:
        """Put the snapshot's content back: rename the live subvolume aside, snapshot the read-only snapshot
        (writable) into its place, and delete the old one only after that worked. Every file of the
        subvolume goes back, not only this disk.

        :raise SnapshotError: the VM runs, a process has files open in the subvolume, or a step failed (the
            live subvolume is put back)
        :raise UnsupportedError: the live subvolume is a mount point or holds nested subvolumes
        """
        self._refuse_while_running("a btrfs rollback replaces the files under it")
        source = PurePosixPath(snap.details.get("snapshot_subvolume", ""))
        live = PurePosixPath(snap.details.get("live_subvolume", ""))
        if not is_btrfs_subvolume(self.runner, source):
            raise NotFoundError(
                f"snapshot {source} does not exist", hint="list them with `vmsnap snapshot list`"
            )
        location = btrfs_location(self.runner, live)
        if live == location.mount.mount_point:
            raise UnsupportedError(
                f"{live} is a mount point, which cannot be swapped for a snapshot",
                hint="keep VM images in a subvolume below the mount point (btrfs subvolume create)",
            )
        nested = self.btrfs.nested(live)
        if nested:
            raise UnsupportedError(
                f"{live} holds nested subvolumes (e.g. {nested[0]}) that a rollback would orphan",
                hint="move them out of the VM's subvolume first",
            )
        holders = self._processes_using(live)
        if holders:
            raise SnapshotError(
                f"{len(holders)} process(es) have files open in {live} (pid {', '.join(holders[:5])}): "
                "another VM on the same subvolume, or this one not yet stopped",
                hint="stop them first; a rollback would pull the files out from under them",
            )
        stamp = datetime.now(UTC).strftime(_STAMP_FORMAT)
        aside = live.parent / f".{live.name}.vmsnap-rollback-{stamp}"
        self._run(["mv", "-T", "--", str(live), str(aside)], f"cannot move {live} aside", "check permissions")
        try:
            self.btrfs.snapshot(source, live, read_only=False)
        except VmsnapError as err:
            quietly(self.runner, ["mv", "-T", "--", str(aside), str(live)], timeout=60)
            raise SnapshotError(
                f"cannot restore {live} from {source}: {err.message}",
                hint="the live subvolume was put back unchanged; check free space",
            ) from err
        try:
            self.btrfs.delete(aside)
        except CommandError as err:
            self._warn(f"rolled back, but the old {live} stays at {aside} (delete it by hand): {err.message}")

    def _processes_using(self, directory: PurePosixPath) -> list[str]:
        """Pids with a file descriptor open below ``directory`` (from /proc, so no lsof/fuser needed)."""
        walk = ["find", "/proc", "-mindepth", "3", "-maxdepth", "3", "-path", "/proc/*/fd/*"]
        result = self.runner.run(
            [*walk, "-lname", f"{directory}/*", "-print"],
            ok_codes=(0, 1),  # processes come and go while find walks /proc
            timeout=120,
        )
        pids = {line.split("/")[2] for line in result.stdout.splitlines() if line.count("/") >= 4}
        return sorted(pids, key=int)

    def list(self) -> Sequence[SnapshotRef]:
        """The snapshot sets that hold a copy of one of the machine's disks, oldest set first."""
        refs: list[SnapshotRef] = []
        for disk in self.machine.disks():
            try:
                place = self._place(disk)
            except (UnsupportedError, NotFoundError):
                try:  # its backing files are elsewhere: its own image may still have snapshots
                    place = _Placement(btrfs_location(self.runner, disk.file))
                except (UnsupportedError, NotFoundError):
                    continue
            top = place.top
            set_ids = self._set_ids(self._snapshot_root(top))
            images = {s: self._target(top, s) / top.relative for s in set_ids}
            present = existing_paths(self.runner, list(images.values()))
            for set_id in set_ids:
                if str(images[set_id]) in present:
                    details = self._details(set_id, place)
                    name = name_of_set(set_id)
                    refs.append(SnapshotRef(self.name, name, disk, str(images[set_id]), details))
        return sorted(refs, key=lambda ref: ref.details["set"])  # stable: disks stay in device order
