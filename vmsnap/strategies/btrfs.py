"""The btrfs strategy: a read-only snapshot of every Btrfs subvolume that holds the VM's disk images.

QEMU is paused (``stop`` flushes its cached qcow2 metadata) for the few milliseconds the snapshots take, then
resumed; the snapshots live in a hidden ``.vmsnap`` directory at the top of the Btrfs mount.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import ClassVar

import attrs

from vmsnap.errors import CommandError, NotFoundError, SnapshotError, UnsupportedError, VmsnapError
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.runner import Runner
from vmsnap.strategies.base import Capabilities, StrategyBase, paused
from vmsnap.strategies.storage import (
    BtrfsLocation,
    StorageNoteWarning,
    StorageScopeWarning,
    btrfs_location,
    is_btrfs_subvolume,
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
class _SubvolumePlan:
    """One live subvolume and where its read-only snapshot goes."""

    live: PurePosixPath
    target: PurePosixPath
    location: BtrfsLocation


class BtrfsSnapshotStrategy(StrategyBase):
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
        self.machine = machine
        self.runner: Runner = runner if runner is not None else machine.runner
        self.snapshot_dir = PurePosixPath(snapshot_dir) if snapshot_dir is not None else None
        self.commit_on_delete = commit_on_delete
        self.report_other_files = report_other_files
        #: human-readable notes from the last calls (other files captured, leftovers); never raised
        self.warnings: list[str] = []
        #: how long the VM was paused by the last create, in ms (None: it was not running)
        self.last_pause_ms: float | None = None

    # -- helpers ------------------------------------------------------------------------------------

    def _warn(self, message: str, category: type[UserWarning] = StorageNoteWarning) -> None:
        """Keep ``message`` in :attr:`warnings` and issue it with :func:`warnings.warn` for callers."""
        self.warnings.append(message)
        warnings.warn(message, category, stacklevel=3)

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

    def _locate(self, disk: Disk) -> BtrfsLocation:
        try:
            return btrfs_location(self.runner, disk.file)
        except UnsupportedError as err:
            raise UnsupportedError(f"disk {disk.name}: {err.message}", hint=err.hint) from err

    def _existing(self, paths: Sequence[PurePosixPath]) -> set[str]:
        """Which of ``paths`` exist (one ``stat`` call)."""
        if not paths:
            return set()
        result = self.runner.run(["stat", "-c", "%n", "--", *map(str, paths)], ok_codes=(0, 1), timeout=120)
        return set(result.stdout.splitlines())

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
        the VM is paused.

        :raise UnsupportedError: a disk is not on Btrfs (naming the filesystem found)
        :raise SnapshotError: a snapshot failed; those already made are deleted again, the VM runs
        """
        if not disks:
            raise SnapshotError("no disks to snapshot", hint="pass at least one disk")
        set_id = snapshot_set_id(name)
        self.warnings = []
        plans: dict[PurePosixPath, _SubvolumePlan] = {}
        where: list[tuple[Disk, BtrfsLocation, list[BtrfsLocation]]] = []
        for disk in disks:
            top = self._locate(disk)
            backing = [self._locate(attrs.evolve(disk, file=Path(b))) for b in disk.backing_chain]
            where.append((disk, top, backing))
            for location in (top, *backing):
                if location.subvolume not in plans:
                    target = self._target(location, set_id)
                    plans[location.subvolume] = _SubvolumePlan(location.subvolume, target, location)
        self._refuse_existing_name(name, list(plans.values()))
        try:
            for plan in plans.values():
                root = self._snapshot_root(plan.location)
                mkdir_root = ["mkdir", "-p", "-m", "0700", "--", str(root)]
                self._run(mkdir_root, f"cannot create {root}", "check permissions and free space")
                self._run(
                    ["mkdir", "-p", "-m", "0700", "--", str(plan.target.parent)],
                    f"cannot create {plan.target.parent}",
                    "check permissions and free space on the Btrfs filesystem",
                )
        except SnapshotError:
            self._undo([], plans, set_id)
            raise
        made: list[PurePosixPath] = []
        failure: tuple[PurePosixPath, VmsnapError] | None = None
        with paused(self.machine) as pause:
            for plan in plans.values():
                try:
                    self.runner.run(
                        ["btrfs", "subvolume", "snapshot", "-r", "--", str(plan.live), str(plan.target)],
                        timeout=600,
                    )
                except VmsnapError as err:  # also a timeout: never leave a half-made set behind
                    failure = (plan.live, err)
                    break
                made.append(plan.target)
        if failure is not None:
            self._undo(made, plans, set_id)
            raise SnapshotError(
                f"btrfs snapshot of {failure[0]} failed: {failure[1].message}",
                hint="check free space (btrfs filesystem usage) and that the snapshot directory is on the "
                "same Btrfs filesystem; nothing was left behind",
            ) from failure[1]
        self.last_pause_ms = pause["paused_ms"] if self.machine.is_running else None
        paused_ms = f"{pause['paused_ms']:.1f}"
        try:
            for live, plan in plans.items():
                users = {d.name for d, t, b in where if live in {loc.subvolume for loc in (t, *b)}}
                self._write_users(plan.target, sorted(users))
        except VmsnapError as err:
            self._undo(made, plans, set_id)
            raise SnapshotError(
                f"cannot record which disks use snapshot {set_id}: {err.message}",
                hint="check the snapshot directory's permissions and free space; nothing was left behind",
            ) from err
        images = {str(loc.file) for _, top, backing in where for loc in (top, *backing)}
        try:
            others = self._other_files(plans, images) if self.report_other_files else {}
        except VmsnapError as err:  # only a report: the snapshots are good
            self._warn(f"could not list the other files captured with this VM's disks: {err.message}")
            others = {}
        refs = []
        for disk, top, backing in where:
            plan = plans[top.subvolume]
            details = {
                "set": set_id,
                "snapshot_subvolume": str(plan.target),
                "live_subvolume": str(top.subvolume),
                "relative": str(top.relative),
                "paused_ms": paused_ms,
            }
            for depth, location in enumerate(backing):
                details[f"backing.{depth}"] = str(plans[location.subvolume].target / location.relative)
                details[f"backing_subvolume.{depth}"] = str(plans[location.subvolume].target)
            captured = others.get(top.subvolume, [])
            if captured:
                details["other_files"] = str(len(captured))
                details["warning"] = (
                    f"the snapshot of {top.subvolume} also holds {len(captured)} other file(s), e.g. "
                    f"{', '.join(captured[:3])}; rollback turns them back too (scope: all storage)"
                )
            refs.append(SnapshotRef(self.name, name, disk, str(plan.target / top.relative), details))
        return refs

    def _undo(
        self, made: Sequence[PurePosixPath], plans: Mapping[PurePosixPath, _SubvolumePlan], set_id: str
    ) -> None:
        """Delete the snapshots a failed create made, and the directories it made for them."""
        for target in made:
            with contextlib.suppress(VmsnapError):
                self.runner.run(["btrfs", "subvolume", "delete", "--", str(target)], timeout=600)
            with contextlib.suppress(VmsnapError):
                self.runner.run(["rm", "-f", "--", str(self._users_file(target))], timeout=60)
        for plan in plans.values():
            with contextlib.suppress(VmsnapError):
                self._remove_empty_dirs(plan.target.parent, set_id)

    def _set_ids(self, root: PurePosixPath) -> list[str]:
        """The snapshot sets in ``root``, oldest first (empty when it does not exist)."""
        listing = self.runner.run(["ls", "-1", "--", str(root)], ok_codes=(0, 1, 2), timeout=60)
        return sorted(s for s in listing.stdout.splitlines() if s) if listing.exit_code == 0 else []

    def _refuse_existing_name(self, name: str, plans: Sequence[_SubvolumePlan]) -> None:
        """Refuse a name that a snapshot of one of these subvolumes carries already."""
        candidates = []
        for plan in plans:
            for set_id in self._set_ids(self._snapshot_root(plan.location)):
                if name_of_set(set_id) == name:
                    candidates.append(self._target(plan.location, set_id))
        clash = self._existing(candidates)
        if clash:
            raise SnapshotError(
                f"a snapshot named {name} of this storage exists already ({sorted(clash)[0]})",
                hint="use another name, or delete the old snapshot first",
            )

    def _other_files(
        self, plans: Mapping[PurePosixPath, _SubvolumePlan], images: set[str]
    ) -> dict[PurePosixPath, list[str]]:
        """Files in each snapshot that are not the VM's images (``find -xdev`` stays inside one subvolume)."""
        found: dict[PurePosixPath, list[str]] = {}
        for live, plan in plans.items():
            result = self.runner.run(
                ["find", str(plan.target), "-xdev", "-type", "f"], ok_codes=(0, 1), timeout=600
            )
            others = []
            for line in result.stdout.splitlines():
                original = live / PurePosixPath(line).relative_to(plan.target)
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
        missing = set(map(str, [image, *map(PurePosixPath, backing)])) - self._existing(
            [image, *map(PurePosixPath, backing)]
        )
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
            argv = ["btrfs", "subvolume", "delete", *(["-c"] if self.commit_on_delete else []), "--"]
            self._run(
                [*argv, str(target)],
                f"cannot delete snapshot {target}",
                "check that nothing has it mounted or open; `btrfs subvolume delete` it by hand",
            )
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
        if self.machine.is_running:
            raise SnapshotError(
                f"{self.machine.name} is running: a btrfs rollback replaces the files under it",
                hint="shut the VM down, then roll back",
            )
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
        nested = self.runner.run(["btrfs", "subvolume", "list", "-o", "--", str(live)], timeout=120)
        if nested.stdout.strip():
            first = nested.stdout.strip().splitlines()[0].split()[-1]
            raise UnsupportedError(
                f"{live} holds nested subvolumes (e.g. {first}) that a rollback would orphan",
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
            self.runner.run(["btrfs", "subvolume", "snapshot", "--", str(source), str(live)], timeout=600)
        except CommandError as err:
            with contextlib.suppress(VmsnapError):
                self.runner.run(["mv", "-T", "--", str(aside), str(live)], timeout=60)
            raise SnapshotError(
                f"cannot restore {live} from {source}: {err.message}",
                hint="the live subvolume was put back unchanged; check free space",
            ) from err
        try:
            self.runner.run(["btrfs", "subvolume", "delete", "--", str(aside)], timeout=600)
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
                top = btrfs_location(self.runner, disk.file)
            except (UnsupportedError, NotFoundError):
                continue
            try:
                backing = [btrfs_location(self.runner, b) for b in disk.backing_chain]
            except (UnsupportedError, NotFoundError):
                backing = []
            set_ids = self._set_ids(self._snapshot_root(top))
            candidates = {s: self._target(top, s) for s in set_ids}
            images = {s: t / top.relative for s, t in candidates.items()}
            present = self._existing(list(images.values()))
            for set_id in set_ids:
                if str(images[set_id]) not in present:
                    continue
                details = {
                    "set": set_id,
                    "snapshot_subvolume": str(candidates[set_id]),
                    "live_subvolume": str(top.subvolume),
                    "relative": str(top.relative),
                }
                for depth, location in enumerate(backing):
                    details[f"backing.{depth}"] = str(self._target(location, set_id) / location.relative)
                    details[f"backing_subvolume.{depth}"] = str(self._target(location, set_id))
                refs.append(SnapshotRef(self.name, name_of_set(set_id), disk, str(images[set_id]), details))
        return sorted(refs, key=lambda ref: ref.details["set"])  # stable: disks stay in device order
