"""A repository of layout ``qcow2``: a directory of per-backup qcow2 images (the tree is specified in
:mod:`vmsnap.repo.qcow2_layout`), behind the :class:`~vmsnap.repo.layout.RepositoryLayout` interface, and
its :class:`Qcow2Writer` (a push strategy's image adopted, or a transport's copy on the parent's image).

Per VM, next to the backups: ``.lock`` (flock: one backup, prune or recover of a VM at a time),
``.read-lock`` (flock, shared by restores, verifies and copies; prune waits for none of them and refuses
instead), ``.journal.json`` (see :mod:`vmsnap.repo.journal`), ``.needs-full`` (the next backup must be
full), and the ``.partial-<id>`` (staging) and ``.deleting-<id>`` (being pruned) directories a dead run
leaves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from vmsnap.errors import (
    LeaseError,
    NotFoundError,
    RepositoryError,
    SnapshotError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.files import (
    DIR_MODE,
    FILE_MODE,
    fsync_dir,
    fsync_file,
    make_private_dir,
    write_atomic,
    write_json_atomic,
)
from vmsnap.image.digest import ChunkDigests
from vmsnap.image.sources import BackupSource, ImageSource
from vmsnap.model import Disk, ExportSource, Progress, validate_name
from vmsnap.repo import attachments
from vmsnap.repo.layout import (
    DEFINITION_FILE,
    RepositoryLayout,
    RestoreFormat,
    VerifyReader,
)
from vmsnap.repo.manifest import (
    MANIFEST,
    Damaged,
    DiskRecord,
    Kind,
    Manifest,
    next_backup_id,
    read_manifest,
    utc_now_iso,
)
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.progress import DiskProgress, Transfer, no_progress
from vmsnap.repo.qcow2_layout import DELETING_PREFIX, PARTIAL_PREFIX, Qcow2Layout
from vmsnap.repo.reports import (
    PUSH_TRANSPORT,
    CopiedBackup,
    GcReport,
    RestoredDisk,
    VerifyReport,
    WrittenDisk,
)
from vmsnap.repo.stores.base import Store
from vmsnap.repo.verify import choose_reader, verify_backups
from vmsnap.runner import LocalRunner, Runner
from vmsnap.transports.base import Transport

NEEDS_FULL = ".needs-full"
LOCK = ".lock"
READ_LOCK = ".read-lock"
LOCK_PATIENCE = 5.0
"""Seconds :meth:`Qcow2Repository.lock` tries again while the VM's lock looks held (see there)."""
JOURNAL = ".journal.json"
ATTACHMENTS = "attachments"
"""In a backup's directory: the objects kept beside it, one file each (see :func:`write_attachment`)."""


class Qcow2Repository(RepositoryLayout):
    """A repository of layout ``qcow2`` in the directory ``root`` (see the module docstring).

    Open it with :meth:`vmsnap.repo.repository.Repository.open`; the constructor does no I/O.

    :param root: the repository directory
    :param runner: runs qemu-img (default: this host)
    """

    name: ClassVar[str] = "qcow2"
    reads_exports: ClassVar[bool] = False
    accepts_push: ClassVar[bool] = True
    chains: ClassVar[bool] = True
    needs_directory: ClassVar[bool] = True
    encrypts: ClassVar[bool] = False
    chunk_size: ClassVar[int | None] = None
    collects: ClassVar[bool] = False

    def __init__(self, root: Path, *, runner: Runner | None = None) -> None:
        self._root = Path(root)
        self.runner: Runner = runner if runner is not None else LocalRunner()

    @classmethod
    def open_layout(
        cls,
        store: Store,
        marker: RepoMarker,
        *,
        directory: Path | None,
        location: Path | str,
        key_file: Path | None,
        runner: Runner | None,
        state_root: Path | None,
        lease_seconds: float | None,
    ) -> Qcow2Repository:
        """The repository in the directory ``directory`` (its files are used directly, not through
        ``store``).

        :raise RepositoryError: the store is no directory (an object store)
        """
        if directory is None:
            raise RepositoryError(f"{location}: a qcow2-layout repository in an object store cannot be read")
        return cls(directory, runner=runner)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def location(self) -> str:
        return str(self._root)

    @property
    def layout(self) -> Qcow2Layout:
        """The tree of backups under :attr:`root` (reads and writes backup contents)."""
        return Qcow2Layout(self._root, self.runner)

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
        return sorted(
            p.name
            for p in self._root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _valid(p.name)
        )

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]:
        vms = [validate_name(vm, "VM name")] if vm is not None else self.vms()
        found: list[Manifest] = []
        for name in vms:
            vm_dir = self._root / name
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

    def chain(self, manifest: Manifest) -> list[Manifest]:
        """``manifest`` and its ancestors, oldest (the full backup) first.

        :raise ChainError: a parent is missing, or the links loop
        """
        return self.layout.chain(manifest)

    def chunk_digests(self, manifest: Manifest, disk: str) -> ChunkDigests:
        """The stored chunk digests of ``disk`` in a backup, checked against the manifest's sha256."""
        return self.layout.chunk_digests(manifest, disk)

    def definition(self, manifest: Manifest) -> str | None:
        path = self.backup_dir(manifest.vm, manifest.backup_id) / DEFINITION_FILE
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise RepositoryError(f"cannot read {path}: {err}", hint="check its permissions") from err

    def attach(self, manifest: Manifest, name: str, data: bytes) -> None:
        attachments.check_unsealed(manifest, name)
        write_attachment(
            self.backup_dir(manifest.vm, manifest.backup_id), manifest.vm, manifest.backup_id, name, data
        )

    def attachment(self, manifest: Manifest, name: str) -> bytes:
        directory = self.backup_dir(manifest.vm, manifest.backup_id) / ATTACHMENTS
        path = directory / validate_name(name, "attachment name")
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise NotFoundError(
                f"backup {manifest.vm}/{manifest.backup_id} keeps no {name}",
                hint=f"it keeps: {', '.join(self.attachments(manifest)) or 'nothing'}",
            ) from err
        except OSError as err:
            raise RepositoryError(f"cannot read {path}: {err}", hint="check its permissions") from err
        digest, _, envelope = raw.partition(b"\n")
        if hashlib.sha256(envelope).hexdigest().encode() != digest:
            raise RepositoryError(
                f"{path} is damaged: its content does not match its sha256", hint="remove it"
            )
        return attachments.unseal(envelope, manifest.vm, manifest.backup_id, name, where=str(path))

    def attachments(self, manifest: Manifest) -> list[str]:
        directory = self.backup_dir(manifest.vm, manifest.backup_id) / ATTACHMENTS
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".") and _valid(p.name))

    def disk_source(self, manifest: Manifest, disk: str) -> BackupSource:
        """The top of the disk's qcow2 chain in the backup's directory (QEMU follows its relative backing
        links), after checking that no parent is missing.

        :raise NotFoundError: the backup has no such disk
        :raise ChainError: a parent the backup needs is missing
        """
        record = manifest.disk(disk)
        self.chain(manifest)  # a missing parent fails here, not later inside QEMU
        root = os.path.realpath(self.root)
        identity = f"qcow2:{root}/{manifest.vm}/{manifest.backup_id}/{record.name}"
        return ImageSource(self.backup_dir(manifest.vm, manifest.backup_id) / record.file, "qcow2", identity)

    # -- locks ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, vm: str) -> Iterator[None]:
        """Hold ``REPO/<vm>/.lock`` (flock) for the body: one backup, prune or recover of a VM at a time.

        The kernel drops the lock when the holder dies, so a killed run never leaves it held.

        Held elsewhere, it is tried again for :data:`LOCK_PATIENCE` seconds: a child that another thread
        of this process forks holds a copy of the lock's descriptor until it execs, so a lock just released
        (a job's retention right after the VM's backup) can look held for a moment.

        :raise RepositoryError: another process holds it
        """
        vm_dir = make_private_dir(self.vm_dir(vm))
        with _flock(vm_dir / LOCK, fcntl.LOCK_EX, patience=LOCK_PATIENCE) as held:
            if not held:
                raise RepositoryError(
                    f"another vmsnap run holds {vm_dir / LOCK} (a backup, prune or recover of {vm})",
                    hint="wait for it to finish; a killed run releases the lock by itself",
                )
            yield

    @contextlib.contextmanager
    def reading(self, vm: str | None = None) -> Iterator[None]:
        """Hold the shared ``.read-lock`` of ``vm`` (of every VM when None) for the body: prune refuses to
        remove a backup meanwhile."""
        with contextlib.ExitStack() as stack:
            for name in [vm] if vm is not None else self.vms():
                vm_dir = self.vm_dir(name)
                if vm_dir.is_dir():
                    stack.enter_context(_flock(vm_dir / READ_LOCK, fcntl.LOCK_SH, wait=True))
            yield

    # -- writing -------------------------------------------------------------------------------------

    def new_backup_id(self, vm: str) -> str:
        """A fresh id for ``vm`` that sorts after every id it has (backups, staging, or being pruned)."""
        vm_dir = self.vm_dir(vm)
        return next_backup_id(
            p.name.removeprefix(PARTIAL_PREFIX).removeprefix(DELETING_PREFIX)
            for p in (vm_dir.iterdir() if vm_dir.is_dir() else [])
        )

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
        """Compute the chunk digests of the staged ``<disk>.qcow2`` (see
        :meth:`~vmsnap.repo.qcow2_layout.Qcow2Layout.digest_staged`) and return the disk's digest."""
        return self.layout.digest_staged(staging, disk, virtual_size, parent=parent)

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Seal a staged backup: files 0600 and fsync'd, manifest written last, staging renamed into place."""
        return self.layout.commit(staging, manifest)

    def discard(self, path: Path) -> None:
        """Remove a staging (or half-deleted) directory of this repository.

        :raise RepositoryError: ``path`` is not one
        """
        if path.parent.parent != self._root or not path.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)):
            raise RepositoryError(f"refusing to remove {path}: not a staging directory of {self._root}")
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(path.parent)

    def leftovers(self, vm: str) -> list[Path]:
        """Staging and half-deleted directories of ``vm`` (left by a run that died)."""
        vm_dir = self.vm_dir(vm)
        if not vm_dir.is_dir():
            return []
        return sorted(p for p in vm_dir.iterdir() if p.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)))

    def recover_leftovers(self, vm: str) -> list[str]:
        actions = []
        for leftover in self.leftovers(vm):
            self.discard(leftover)
            actions.append(f"removed leftover {leftover.name}")
        return actions

    def discard_backup(self, vm: str, backup_id: str) -> bool:
        staging = self.staging_dir(vm, backup_id)
        if not staging.exists():
            return False
        self.discard(staging)
        return True

    def require_full(self, vm: str, reason: str) -> None:
        make_private_dir(self.vm_dir(vm))
        write_json_atomic(self.vm_dir(vm) / NEEDS_FULL, {"reason": reason, "since": utc_now_iso()})

    def full_required(self, vm: str) -> str | None:
        path = self.vm_dir(vm) / NEEDS_FULL
        try:
            return str(json.loads(path.read_text(encoding="utf-8")).get("reason", "a dead run"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError):
            return "the marker file is damaged"

    def clear_full_required(self, vm: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.vm_dir(vm) / NEEDS_FULL).unlink()

    def usable_parent(self, manifest: Manifest) -> str | None:
        try:
            self.chain(manifest)
        except VmsnapError as err:
            return f"the chain of {manifest.backup_id} is broken ({err.message})"
        return None

    def begin_backup(self, vm: str, parent: Manifest | None, *, runner: Runner | None = None) -> Qcow2Writer:
        backup_id = self.new_backup_id(vm)
        return Qcow2Writer(self, vm, backup_id, self.stage(vm, backup_id), parent)

    # -- restore and verify --------------------------------------------------------------------------

    def restore(
        self,
        vm: str,
        backup_id: str | None,
        to: Path,
        *,
        disks: Sequence[str] = (),
        progress: DiskProgress = no_progress,
        format: RestoreFormat = "qcow2",
        devices: Mapping[str, Path] | None = None,
    ) -> tuple[Manifest, list[RestoredDisk]]:
        if devices:
            raise UnsupportedError(
                "restoring a qcow2-layout backup onto a block device is not supported",
                hint="restore a raw file and copy it onto the device, or copy the backup to a chunks repo",
            )
        with self.reading(vm):
            manifest = self.get(vm, backup_id)
            return manifest, self.layout.restore(manifest, to, disks=disks, progress=progress, format=format)

    def verify(
        self,
        vm: str | None = None,
        backup_id: str | None = None,
        *,
        reader: VerifyReader = "auto",
        fast: bool = False,
        progress: DiskProgress = no_progress,
        repair_from: Sequence[RepositoryLayout] = (),
    ) -> VerifyReport:
        """Re-read backups and check every checksum and chain link (see :mod:`vmsnap.repo.verify`).

        :param reader: "qemu" (qemu-img), "libqcow" (pyqcow, an independent qcow2 reader), or "auto"
            (libqcow when the optional ``qcow`` extra is installed)
        :raise UsageError: ``repair_from`` given (only the chunks layout repairs)
        """
        if repair_from:
            raise UsageError(
                "verify repairs only repositories of the chunks layout",
                hint="verify this qcow2 repository without --repair; restore from a backup that verifies",
            )
        chosen = choose_reader(reader)
        damaged: list[Damaged] = []
        with self.reading(vm):
            if backup_id is not None:
                if vm is None:
                    raise UsageError("--backup needs --vm", hint="name the VM the backup belongs to")
                targets = [self.get(vm, backup_id)]
            else:
                if vm is not None and not self.vm_dir(vm).is_dir():
                    self.get(vm)  # raises NotFoundError naming the VMs there are
                targets = self.backups(vm, damaged=damaged)
            return verify_backups(self.layout, targets, reader=chosen, progress=progress, damaged=damaged)

    # -- prune and gc --------------------------------------------------------------------------------

    def delete_backup(self, vm: str, backup_id: str) -> None:
        """Rename the backup to ``.deleting-<id>`` (never listed half removed), then delete it.

        :raise LeaseError: a restore, verify or copy of the VM is reading it
        """
        vm_dir = self.vm_dir(vm)
        with _flock(vm_dir / READ_LOCK, fcntl.LOCK_EX) as free:
            if not free:
                raise LeaseError(
                    f"a restore, verify or copy of {vm} is reading its backups; not removing {backup_id}",
                    hint="run prune again once it has finished",
                )
            doomed = vm_dir / f"{DELETING_PREFIX}{validate_name(backup_id, 'backup id')}"
            os.rename(self.backup_dir(vm, backup_id), doomed)
            fsync_dir(vm_dir)
            self.discard(doomed)

    def gc(self, *, wait: float = 0.0, dry_run: bool = False) -> GcReport:
        """Nothing to collect: a qcow2 backup's files go with the backup. Returns an empty report."""
        return GcReport(0, 0, 0, dry_run=dry_run)

    # -- copy ----------------------------------------------------------------------------------------

    def copy_in(
        self, source: RepositoryLayout, manifest: Manifest, *, progress: DiskProgress = no_progress
    ) -> CopiedBackup:
        """A standalone full backup of ``manifest``: each disk restored from ``source`` (whatever its
        layout: its restore checks every byte) into this repository's staging, then digested and sealed
        like any backup here."""
        vm, backup_id = manifest.vm, manifest.backup_id
        self.discard_backup(vm, backup_id)  # what a copy that died left
        staging = self.stage(vm, backup_id)
        try:
            records = []
            for record in manifest.disks:
                _, (restored,) = source.restore(
                    vm, backup_id, staging, disks=[record.name], progress=progress
                )
                image = Path(restored.path)
                digest = self.digest_staged(staging, record.name, record.virtual_size)
                written = image.stat().st_blocks * 512
                records.append(DiskRecord(record.name, image.name, record.virtual_size, written, digest))
            definition = source.definition(manifest)
            if definition is not None:
                write_atomic(staging / DEFINITION_FILE, definition.encode("utf-8"))
            for name in source.attachments(manifest):  # checked when read
                write_attachment(staging, vm, backup_id, name, source.attachment(manifest, name))
            copied = Manifest(
                vm=vm,
                backup_id=backup_id,
                kind="full",
                parent=None,
                strategy=manifest.strategy,
                transport=manifest.transport,
                created=manifest.created,
                quiesced=manifest.quiesced,
                bitmap=None,
                disks=tuple(records),
                objects=dict(manifest.objects),
            )
            self.commit(staging, copied)
        except BaseException:
            self.discard(staging)
            raise
        return CopiedBackup(vm, backup_id, True, 0, sum(r.bytes_written for r in records))


class Qcow2Writer:
    """One backup being written into a qcow2 repository: a staging directory of ``<disk>.qcow2`` images,
    sealed by computing their chunk digests and committing the manifest last."""

    accepts_push = True

    def __init__(
        self, repo: Qcow2Repository, vm: str, backup_id: str, staging: Path, parent: Manifest | None
    ) -> None:
        self.repo = repo
        self.vm = vm
        self.backup_id = backup_id
        self.workdir = staging
        self.parent = parent
        self.location = str(repo.backup_dir(vm, backup_id))
        self._written: dict[str, tuple[Disk, WrittenDisk]] = {}
        self._objects: dict[str, str] = {}

    def checkpoint_images(self, parent: Manifest, disks: Sequence[Disk]) -> dict[str, Path]:
        directory = self.repo.backup_dir(self.vm, parent.backup_id)
        return {d.name: directory / f"{d.name}.qcow2" for d in disks}

    def write(
        self,
        disk: Disk,
        source: ExportSource,
        *,
        transport: Transport | None,
        progress: Progress,
        transfer: Callable[[Transfer], None] | None = None,
    ) -> WrittenDisk:
        """Adopt the image a push strategy wrote (``transport`` None), or copy ``source`` with
        ``transport`` — on the parent's image when the source holds only the changes since it."""
        target = self.workdir / f"{validate_name(disk.name, 'disk name')}.qcow2"
        if transport is None:  # the strategy wrote the image; export waited for it
            if not target.is_file() or Path(source.location).resolve() != target.resolve():
                raise SnapshotError(f"the strategy wrote {source.location}, not {target}")
            written = WrittenDisk(target.stat().st_blocks * 512, PUSH_TRANSPORT, source.since)
        else:
            backing = None
            since = source.since
            if since is not None and self.parent is not None and transport.incremental:
                backing = self.checkpoint_images(self.parent, [disk])[disk.name]
            if backing is None:
                since = None  # the transport copies the whole content: a full image
            stats = transport.send(source, target, progress=progress, backing=backing)
            written = WrittenDisk(int(stats.bytes_written), transport.name, since)
        self._written[disk.name] = (disk, written)
        return written

    def seal(
        self,
        *,
        kind: Kind,
        parent: Manifest | None,
        strategy: str,
        quiesced: bool,
        bitmap: str | None,
        definition: str | None,
    ) -> Manifest:
        records = []
        for disk, written in self._written.values():
            target = self.workdir / f"{disk.name}.qcow2"
            os.chmod(target, FILE_MODE)
            fsync_file(target)
            digest = self.repo.digest_staged(
                self.workdir, disk.name, disk.virtual_size, parent=parent if kind == "incremental" else None
            )
            records.append(
                DiskRecord(disk.name, target.name, disk.virtual_size, written.bytes_written, digest)
            )
        if definition is not None:
            fd = os.open(self.workdir / DEFINITION_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "w") as out:
                out.write(definition)
                out.flush()
                os.fsync(out.fileno())
        manifest = Manifest(
            vm=self.vm,
            backup_id=self.backup_id,
            kind=kind,
            parent=parent.backup_id if kind == "incremental" and parent is not None else None,
            strategy=strategy,
            transport=",".join(sorted({w.transport for _, w in self._written.values()})),
            created=utc_now_iso(),
            quiesced=quiesced,
            bitmap=bitmap,
            disks=tuple(records),
            objects=dict(self._objects),
        )
        self.repo.commit(self.workdir, manifest)
        return manifest

    def attach(self, name: str, data: bytes) -> None:
        """Keep an object in the staging directory (renamed into place with the backup), its sha256 named by
        the manifest."""
        write_attachment(self.workdir, self.vm, self.backup_id, name, data)
        self._objects[name] = attachments.digest(data)

    def discard(self) -> None:
        if self.workdir.exists():
            self.repo.discard(self.workdir)


def write_attachment(backup_dir: Path, vm: str, backup_id: str, name: str, data: bytes) -> None:
    """Write ``backup_dir/attachments/<name>``: the sha256 of the envelope (hex), a newline, the envelope
    (:mod:`vmsnap.repo.attachments`); 0600, durable, replaced atomically. ``backup_dir`` is never made:
    a backup pruned meanwhile stays gone.

    :raise NotFoundError: ``backup_dir`` does not exist (the backup was removed)
    """
    envelope = attachments.seal(vm, backup_id, name, data)
    directory = backup_dir / ATTACHMENTS
    try:
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
    except FileNotFoundError as err:
        raise NotFoundError(f"backup {vm}/{backup_id} is gone: {backup_dir} no longer exists") from err
    digest = hashlib.sha256(envelope).hexdigest().encode()
    write_atomic(directory / name, digest + b"\n" + envelope)


@contextlib.contextmanager
def _flock(path: Path, operation: int, *, wait: bool = False, patience: float = 0.0) -> Iterator[bool]:
    """Hold an flock on ``path`` (made 0600) for the body; yields False when it is held elsewhere (never
    with ``wait``; after trying for ``patience`` seconds otherwise)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, operation | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return True
