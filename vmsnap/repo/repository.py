"""The repository: a directory of backups, opened by its marker; lists, locks, names and prunes them, and
hands the work on backup contents to its layout (format 1: :mod:`vmsnap.repo.qcow2_layout`, which specifies
the tree on disk).

The marker ``REPO/vmsnap-repo.json`` says ``{"format": 1}``; a repository of another format is refused, and
a repository is created only in a missing or empty directory. Per VM the repository keeps, next to the
backups: ``.lock`` (flock: one backup, prune or recover of a VM at a time), ``.journal.json`` (see
:mod:`vmsnap.repo.journal`), ``.needs-full`` (the next backup must be full), and the ``.partial-<id>``
(staging) and ``.deleting-<id>`` (being pruned) directories a dead run leaves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.files import DIR_MODE, FILE_MODE, fsync_dir, make_private_dir, write_json_atomic
from vmsnap.image.digest import ChunkDigests
from vmsnap.model import validate_name

# __all__ re-exports the names backup/, cli.py and jobs/ still import from here (DiskRecord and Kind are here
# only for them); new code imports them from their homes: repo.manifest, repo.progress, repo.qcow2_layout.
from vmsnap.repo.manifest import (
    MANIFEST,
    REPO_FORMAT,
    Damaged,
    DiskRecord,
    Kind,
    Manifest,
    next_backup_id,
    read_manifest,
    utc_now_iso,
)
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.prune import PruneResult, plan_retention
from vmsnap.repo.qcow2_layout import DELETING_PREFIX, PARTIAL_PREFIX, Qcow2Layout, RestoredDisk
from vmsnap.repo.verify import Reader, VerifyReport, choose_reader, verify_backups
from vmsnap.runner import LocalRunner, Runner

__all__ = [
    "DELETING_PREFIX",
    "Damaged",
    "DiskProgress",
    "DiskRecord",
    "Kind",
    "Manifest",
    "Repository",
    "utc_now_iso",
]

MARKER = "vmsnap-repo.json"
NEEDS_FULL = ".needs-full"
LOCK = ".lock"
JOURNAL = ".journal.json"


class Repository:
    """A directory of backups in format 1 (see the module docstring).

    Use :meth:`open` (or :meth:`create`): the constructor does no I/O.

    :param root: the repository directory
    :param runner: runs qemu-img (default: this host)
    """

    def __init__(self, root: Path, *, runner: Runner | None = None) -> None:
        self.root = Path(root)
        self.runner: Runner = runner if runner is not None else LocalRunner()

    @property
    def layout(self) -> Qcow2Layout:
        """The format-1 tree of backups under :attr:`root` (reads and writes backup contents)."""
        return Qcow2Layout(self.root, self.runner)

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, create: bool = False, runner: Runner | None = None) -> Repository:
        """Open the repository at ``root``; with ``create``, make one in a missing or empty directory.

        :raise RepositoryError: no repository there, a non-empty directory that is not one, or another format
        """
        repo = cls(Path(root), runner=runner)
        marker = repo.root / MARKER
        if not marker.exists():
            if not create:
                raise RepositoryError(
                    f"no vmsnap repository at {repo.root} (no {MARKER})",
                    hint="check --repo; `vmsnap backup --repo DIR` creates one in a new or empty directory",
                )
            if repo.root.exists() and (not repo.root.is_dir() or any(repo.root.iterdir())):
                raise RepositoryError(
                    f"{repo.root} is not empty and not a vmsnap repository",
                    hint="choose a new or empty directory for --repo",
                )
            make_private_dir(repo.root)
            write_json_atomic(marker, {"format": REPO_FORMAT})
            return repo
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
            version = data["format"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RepositoryError(
                f"{marker} is unreadable or damaged: {err}", hint="check the path and its permissions"
            ) from err
        if version != REPO_FORMAT:
            raise RepositoryError(
                f"repository {repo.root} has format {version!r}; this vmsnap reads format {REPO_FORMAT}",
                hint="use the vmsnap version that wrote it",
            )
        return repo

    # -- paths ---------------------------------------------------------------------------------------

    def vm_dir(self, vm: str) -> Path:
        """``REPO/<vm>`` (the name is validated first)."""
        return self.layout.vm_dir(vm)

    def backup_dir(self, vm: str, backup_id: str) -> Path:
        """``REPO/<vm>/<backup-id>``."""
        return self.layout.backup_dir(vm, backup_id)

    def staging_dir(self, vm: str, backup_id: str) -> Path:
        """``REPO/<vm>/.partial-<backup-id>``."""
        return self.layout.staging_dir(vm, backup_id)

    def journal_path(self, vm: str) -> Path:
        """``REPO/<vm>/.journal.json``."""
        return self.vm_dir(vm) / JOURNAL

    # -- reading -------------------------------------------------------------------------------------

    def vms(self) -> list[str]:
        """The VMs that have a directory here, sorted."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _valid(p.name)
        )

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]:
        """Complete backups (those with a manifest) of ``vm``, or of every VM; oldest first per VM.

        :param damaged: collect backups whose manifest is damaged here instead of raising
        :raise RepositoryError: a manifest is damaged (without ``damaged``)
        """
        vms = [validate_name(vm, "VM name")] if vm is not None else self.vms()
        found: list[Manifest] = []
        for name in vms:
            vm_dir = self.root / name
            if not vm_dir.is_dir():
                continue
            for entry in sorted(vm_dir.iterdir()):
                if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                    continue
                try:
                    found.append(read_manifest(entry / MANIFEST, name, entry.name))
                except RepositoryError as err:
                    if damaged is None:
                        raise
                    damaged.append(Damaged(name, entry.name, err))
        return found

    def get(self, vm: str, backup_id: str | None = None) -> Manifest:
        """The backup ``backup_id`` of ``vm`` (the latest when None).

        :raise NotFoundError: no such VM or backup (with the ids that exist)
        :raise RepositoryError: the manifest of that backup (or of one newer than the latest good one, when
            ``backup_id`` is None) is damaged
        """
        if backup_id is not None:
            validate_name(backup_id, "backup id")
        damaged: list[Damaged] = []
        backups = self.backups(vm, damaged=damaged)
        for bad in damaged:  # the one asked for, or a newer one than the latest good
            if bad.backup_id == backup_id or (
                backup_id is None and (not backups or bad.backup_id > backups[-1].backup_id)
            ):
                raise bad.error
        if not backups:
            raise NotFoundError(
                f"no backups of VM {vm!r} in {self.root}",
                hint=f"VMs in this repository: {', '.join(self.vms()) or 'none'}",
            )
        if backup_id is None:
            return backups[-1]
        for manifest in backups:
            if manifest.backup_id == backup_id:
                return manifest
        raise NotFoundError(
            f"no backup {backup_id!r} of VM {vm!r}",
            hint=f"`vmsnap list --repo {self.root} --vm {vm}` shows them; latest is {backups[-1].backup_id}",
        )

    def latest(self, vm: str) -> Manifest | None:
        """The newest backup of ``vm``, or None.

        :raise RepositoryError: the newest backup's manifest is damaged
        """
        try:
            return self.get(vm)
        except NotFoundError:
            return None

    def chain(self, manifest: Manifest) -> list[Manifest]:
        """``manifest`` and its ancestors, oldest (the full backup) first.

        :raise ChainError: a parent is missing, or the links loop
        """
        return self.layout.chain(manifest)

    def chunk_digests(self, manifest: Manifest, disk: str) -> ChunkDigests:
        """The stored chunk digests of ``disk`` in a backup, checked against the manifest's sha256.

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: the file is missing or unreadable
        :raise ChecksumMismatchError: its content does not match the manifest's sha256
        """
        return self.layout.chunk_digests(manifest, disk)

    # -- writing -------------------------------------------------------------------------------------

    def new_backup_id(self, vm: str) -> str:
        """A fresh id for ``vm`` that sorts after every id it has (backups, staging, or being pruned)."""
        vm_dir = self.vm_dir(vm)
        return next_backup_id(
            p.name.removeprefix(PARTIAL_PREFIX).removeprefix(DELETING_PREFIX)
            for p in (vm_dir.iterdir() if vm_dir.is_dir() else [])
        )

    @contextlib.contextmanager
    def lock(self, vm: str) -> Iterator[None]:
        """Hold ``REPO/<vm>/.lock`` (flock) for the body: one backup, prune or recover of a VM at a time.

        The kernel drops the lock when the holder dies, so a killed run never leaves it held.

        :raise RepositoryError: another process holds it
        """
        vm_dir = make_private_dir(self.vm_dir(vm))
        fd = os.open(vm_dir / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise RepositoryError(
                    f"another vmsnap run holds {vm_dir / LOCK} (a backup, prune or recover of {vm})",
                    hint="wait for it to finish; a killed run releases the lock by itself",
                ) from err
            yield
        finally:
            os.close(fd)

    def stage(self, vm: str, backup_id: str) -> Path:
        """Create the staging directory of a new backup (0700) and return it."""
        make_private_dir(self.vm_dir(vm))
        staging = self.staging_dir(vm, backup_id)
        staging.mkdir(mode=DIR_MODE)
        fsync_dir(staging.parent)
        return staging

    def digest_staged(
        self, staging: Path, disk: str, virtual_size: int, *, parent: Manifest | None = None
    ) -> str:
        """Compute the chunk digests of the staged ``<disk>.qcow2``, write them to ``<disk>.chunks`` and
        return the disk's digest (the manifest's ``sha256``); with ``parent``, an incremental reads only the
        chunks its own image holds clusters of (see :class:`~vmsnap.repo.qcow2_layout.Qcow2Layout`).

        :raise RepositoryError: the staged image is missing
        :raise VmsnapError: the image cannot be read (qemu-img or a read failed)
        """
        return self.layout.digest_staged(staging, disk, virtual_size, parent=parent)

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Seal a staged backup: files 0600 and fsync'd, manifest written last, staging renamed into place.

        :raise RepositoryError: a disk image or chunk digests file named in the manifest is missing from the
            staging directory, or the digests do not match the manifest's sha256
        """
        return self.layout.commit(staging, manifest)

    def discard(self, path: Path) -> None:
        """Remove a staging (or half-deleted) directory of this repository.

        :raise RepositoryError: ``path`` is not one
        """
        if path.parent.parent != self.root or not path.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)):
            raise RepositoryError(f"refusing to remove {path}: not a staging directory of {self.root}")
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(path.parent)

    def leftovers(self, vm: str) -> list[Path]:
        """Staging and half-deleted directories of ``vm`` (left by a run that died)."""
        vm_dir = self.vm_dir(vm)
        if not vm_dir.is_dir():
            return []
        return sorted(p for p in vm_dir.iterdir() if p.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)))

    def require_full(self, vm: str, reason: str) -> None:
        """Make the next backup of ``vm`` a full one (its dirty bitmap can no longer be trusted)."""
        make_private_dir(self.vm_dir(vm))
        write_json_atomic(self.vm_dir(vm) / NEEDS_FULL, {"reason": reason, "since": utc_now_iso()})

    def full_required(self, vm: str) -> str | None:
        """Why the next backup of ``vm`` must be full, or None."""
        path = self.vm_dir(vm) / NEEDS_FULL
        try:
            return str(json.loads(path.read_text(encoding="utf-8")).get("reason", "a dead run"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError):
            return "the marker file is damaged"

    def clear_full_required(self, vm: str) -> None:
        """A full backup was committed: incrementals may follow it again."""
        with contextlib.suppress(FileNotFoundError):
            (self.vm_dir(vm) / NEEDS_FULL).unlink()

    # -- restore and verify --------------------------------------------------------------------------

    def restore(
        self,
        vm: str,
        backup_id: str | None,
        to: Path,
        *,
        disks: Sequence[str] = (),
        progress: DiskProgress = no_progress,
    ) -> tuple[Manifest, list[RestoredDisk]]:
        """Write standalone ``to/<disk>.qcow2`` images of a backup (the latest when ``backup_id`` is None)
        and check each against its sha256; nothing in ``to`` is overwritten, and an image gets its final
        name only once its content matches (see :class:`~vmsnap.repo.qcow2_layout.Qcow2Layout`).

        :param disks: restore only these disks (default: all)
        :raise NotFoundError: no such VM, backup or disk
        :raise ChainError: a parent of the backup is missing or a backing link points elsewhere
        :raise ChecksumMismatchError: the restored content differs from what was backed up (image removed),
            or a chunk digests file does not match the manifest (before anything is written)
        :raise VmsnapError: ``to/<disk>.qcow2`` exists already
        """
        manifest = self.get(vm, backup_id)
        return manifest, self.layout.restore(manifest, to, disks=disks, progress=progress)

    def verify(
        self,
        vm: str | None = None,
        backup_id: str | None = None,
        *,
        reader: Reader = "auto",
        progress: DiskProgress = no_progress,
    ) -> VerifyReport:
        """Re-read backups and check every checksum and chain link; collect problems, never raise for them.

        :param reader: "qemu" (qemu-img), "libqcow" (pyqcow, an independent qcow2 reader), or "auto"
            (libqcow when the optional ``qcow`` extra is installed)
        :raise NotFoundError: the named VM or backup does not exist
        :raise UsageError: reader "libqcow" without pyqcow installed, or ``backup_id`` without ``vm``
        """
        chosen = choose_reader(reader)
        damaged: list[Damaged] = []
        if backup_id is not None:
            if vm is None:
                raise UsageError("--backup needs --vm", hint="name the VM the backup belongs to")
            targets = [self.get(vm, backup_id)]
        else:
            if vm is not None and not self.vm_dir(vm).is_dir():
                self.get(vm)  # raises NotFoundError naming the VMs there are
            targets = self.backups(vm, damaged=damaged)
        return verify_backups(self.layout, targets, reader=chosen, progress=progress, damaged=damaged)

    # -- prune ---------------------------------------------------------------------------------------

    def plan_prune(self, vm: str, keep_last: int) -> PruneResult:
        """Which backups of ``vm`` ``prune`` would remove: all but the last ``keep_last`` and their ancestors.

        :raise UsageError: ``keep_last`` below 1
        """
        return plan_retention(vm, self.backups(vm), keep_last)

    def prune(self, vm: str, keep_last: int, *, dry_run: bool = False) -> PruneResult:
        """Remove all but the last ``keep_last`` backups of ``vm``, keeping every parent a kept one needs.

        Each backup is first renamed to ``.deleting-<id>`` (so it is never listed half removed), then deleted.

        :raise UsageError: ``keep_last`` below 1
        :raise RepositoryError: another run holds the VM's lock, or a manifest of the VM is damaged
        """
        with self.lock(vm):
            plan = self.plan_prune(vm, keep_last)
            if dry_run:
                return plan
            vm_dir = self.vm_dir(vm)
            for backup_id in plan.removed:
                doomed = vm_dir / f"{DELETING_PREFIX}{backup_id}"
                os.rename(vm_dir / backup_id, doomed)
                fsync_dir(vm_dir)
                self.discard(doomed)
            return plan


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return True
