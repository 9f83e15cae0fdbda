"""A repository of layout ``chunks`` over any :class:`~vmsnap.repo.stores.base.Store`: every backup a complete
index per disk over deduplicated, compressed (optionally encrypted) chunks. The keys and the manifest's
authentication are in :mod:`vmsnap.repo.chunks.records`; leases in :mod:`vmsnap.repo.chunks.leases`; the
writer in :mod:`vmsnap.repo.chunks.writer`; gc in :mod:`vmsnap.repo.chunks.gc`; verify in
:mod:`vmsnap.repo.chunks.check`.

Every stored byte is checked before it is trusted: the manifest (its MAC, when encrypted) names each
index's sha256, each index carries its own checksum or MAC, and each chunk is checked against its id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from vmsnap.errors import (
    ChecksumMismatchError,
    DamagedChunkError,
    KeyFileError,
    NotFoundError,
    RepositoryError,
    StoreError,
    UsageError,
    VmsnapError,
)
from vmsnap.files import make_private_dir
from vmsnap.image.sources import BackupSource, ReaderSource
from vmsnap.model import validate_name
from vmsnap.repo.chunks.blob import ChunkCodec, ChunkId, chunk_key
from vmsnap.repo.chunks.check import verify_chunks
from vmsnap.repo.chunks.gc import collect
from vmsnap.repo.chunks.index import ChunkIndex, decode_index
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.chunks.known import drop_known_caches, list_chunk_ids, read_generation
from vmsnap.repo.chunks.leases import GC_KEY, LEASE_SECONDS, READERS, Lease, Leases, writer_key
from vmsnap.repo.chunks.pipeline import DEFAULT_WORKERS
from vmsnap.repo.chunks.records import (
    VMS,
    backup_prefix,
    decode_manifest,
    definition_key,
    index_key,
    manifest_key,
    needs_full_key,
    split_backup_key,
    vm_prefix,
)
from vmsnap.repo.chunks.restore import MAX_RESTORE_WORKERS, restore_disk
from vmsnap.repo.chunks.writer import ChunksWriter
from vmsnap.repo.layout import RepositoryLayout, RestoreFormat, VerifyReader, disk_filter
from vmsnap.repo.manifest import MANIFEST, Damaged, Manifest, next_backup_id, utc_now_iso
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.reports import GcReport, RestoredDisk, VerifyReport
from vmsnap.repo.state import RepositoryState
from vmsnap.repo.stores import is_url
from vmsnap.repo.stores.base import Store
from vmsnap.runner import LocalRunner, Runner

BLOCK_READER = "vmsnap.repo.chunks.blockreader:open_reader"
"""What nbdkit's plugin builds to serve a disk of this layout (:mod:`vmsnap.repo.chunks.blockreader`)."""

_CHUNK_HEX = re.compile(r"chunk ([0-9a-f]{64})")
log = logging.getLogger(__name__)


class ChunksRepository(RepositoryLayout):
    """A ``chunks`` repository in ``store`` (see the module docstring); open it with
    :meth:`vmsnap.repo.repository.Repository.open`.

    :param store: where its objects are
    :param marker: its marker
    :param key: the key of an encrypted repository (checked against the marker's key id), or None
    :param key_file: the path of that key's file (handed to a mount's reader, never the key itself)
    :param key_problem: why an encrypted repository has no key (raised when one is needed)
    :param runner: runs qemu-img/qemu-nbd for restores
    :param state_root: the local state root (default ``$VMSNAP_STATE_DIR`` or /var/lib/vmsnap)
    :param lease_seconds: lifetime of the leases this process takes
    :param workers: threads of the backup and restore pipelines (at least the store's ``transfer_threads``,
        where it names them)
    """

    name: ClassVar[str] = "chunks"
    reads_exports: ClassVar[bool] = True
    accepts_push: ClassVar[bool] = False
    chains: ClassVar[bool] = False

    def __init__(
        self,
        store: Store,
        marker: RepoMarker,
        *,
        key: RepositoryKey | None = None,
        key_file: Path | None = None,
        key_problem: KeyFileError | None = None,
        runner: Runner | None = None,
        state_root: Path | None = None,
        lease_seconds: float = LEASE_SECONDS,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        self._store = store
        self.marker = marker
        self._key = key
        self._key_file = key_file
        self._key_problem = key_problem
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self._state = RepositoryState(marker.id, state_root)
        self.leases = Leases(store, ttl=lease_seconds)
        # a store whose requests wait on a network (S3) says how many chunks to keep in flight
        self._workers = max(workers, int(getattr(store, "transfer_threads", 0)))
        self._held: dict[str, tuple[Lease, str]] = {}

    # -- what the writer and the helpers use --------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._store

    @property
    def state(self) -> RepositoryState:
        return self._state

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def location(self) -> str:
        return self._store.url

    @property
    def root(self) -> Path | str:
        url = self._store.url
        return url if is_url(url) else Path(url)

    @property
    def key(self) -> RepositoryKey | None:
        """The repository key (None when not encrypted).

        :raise KeyFileError: the repository is encrypted and no key file was given
        """
        if self.marker.encrypted and self._key is None:
            raise self._key_problem or KeyFileError(
                f"repository {self.location} is encrypted and no key file was given",
                hint="pass its key file with --key-file or VMSNAP_KEY_FILE",
            )
        return self._key

    @property
    def codec(self) -> ChunkCodec:
        """The codec of this repository's chunks (its key, its compression, its chunk id hash)."""
        return ChunkCodec(self.key, compress=self.marker.compression != "none", id_hash=self.marker.chunk_id)

    # -- reading -------------------------------------------------------------------------------------

    def _backup_dirs(self, vm: str | None = None) -> dict[tuple[str, str], set[str]]:
        """(vm, backup id) → names of the objects in each backup directory (one listing)."""
        found: dict[tuple[str, str], set[str]] = {}
        for stored in self._store.list(vm_prefix(vm) if vm is not None else VMS):
            parts = split_backup_key(stored.key)
            if parts is not None:
                found.setdefault((parts[0], parts[1]), set()).add(parts[2])
        return found

    def vms(self) -> list[str]:
        names = set()
        for stored in self._store.list(VMS):
            name = stored.key.split("/")[1]
            with contextlib.suppress(UsageError):
                names.add(validate_name(name, "VM name"))
        return sorted(names)

    def load(self, vm: str, backup_id: str) -> Manifest:
        """The manifest of one backup, checked (MAC when encrypted).

        :raise NotFoundError: it has none
        :raise RepositoryError: it is damaged, foreign or not authenticated
        """
        key = manifest_key(vm, backup_id)
        raw = self._store.get(key)
        return decode_manifest(raw, vm, backup_id, self.key, where=f"{self.location}/{key}")

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]:
        if vm is not None:
            validate_name(vm, "VM name")
        found = []
        for (name, backup_id), names in sorted(self._backup_dirs(vm).items()):
            if MANIFEST not in names:
                continue
            try:
                found.append(self.load(name, backup_id))
            except NotFoundError:
                continue  # removed meanwhile (a prune)
            except KeyFileError:
                raise
            except RepositoryError as err:
                if damaged is None:
                    raise
                damaged.append(Damaged(name, backup_id, err))
        return found

    def latest(self, vm: str) -> Manifest | None:
        """The newest backup of ``vm``: one listing of its backups and one manifest read, however many.

        :raise RepositoryError: the newest backup's manifest is damaged
        """
        validate_name(vm, "VM name")
        dirs = self._backup_dirs(vm)
        for name, backup_id in sorted(dirs, reverse=True):
            if MANIFEST in dirs[(name, backup_id)]:
                with contextlib.suppress(NotFoundError):  # pruned meanwhile: the one before it
                    return self.load(name, backup_id)
        return None

    def get(self, vm: str, backup_id: str | None = None) -> Manifest:
        """The backup ``backup_id`` of ``vm`` (the latest when None), reading only its manifest.

        :raise NotFoundError: no such VM or backup (with the ids that exist)
        :raise RepositoryError: its manifest is damaged
        """
        if backup_id is None:
            found = self.latest(vm)
        else:
            validate_name(vm, "VM name")
            try:
                found = self.load(vm, validate_name(backup_id, "backup id"))
            except NotFoundError:
                found = None
        return found if found is not None else super().get(vm, backup_id)  # (raises, naming what exists)

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex:
        """One disk's index, checked against the manifest's sha256 and its own trailer (MAC).

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: the index is missing or damaged
        """
        record = manifest.disk(disk)
        key = index_key(manifest.vm, manifest.backup_id, disk)
        try:
            data = self._store.get(key)
        except NotFoundError as err:
            raise RepositoryError(
                f"index {self.location}/{key} is missing", hint="the backup is damaged: restore another one"
            ) from err
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise ChecksumMismatchError(
                f"index {self.location}/{key} does not match the manifest's sha256 {record.sha256[:16]}…",
                hint="the backup is damaged: run `vmsnap verify` and restore another backup",
            )
        index = decode_index(data, self.key, name=f"{self.location}/{key}")
        if index.virtual_size != record.virtual_size:
            raise RepositoryError(
                f"index {key} has virtual size {index.virtual_size}, not {record.virtual_size}"
            )
        return index

    def definition(self, manifest: Manifest) -> str | None:
        if manifest.definition is None:
            return None
        key = definition_key(manifest.vm, manifest.backup_id)
        try:
            blob = self._store.get(key)
        except NotFoundError as err:
            raise RepositoryError(
                f"{self.location}/{key} is missing", hint="restore without --define"
            ) from err
        try:
            return self.codec.decode(blob, bytes.fromhex(manifest.definition)).decode("utf-8")
        except (DamagedChunkError, ValueError) as err:
            raise RepositoryError(
                f"{self.location}/{key} is damaged: {err}", hint="restore without --define"
            ) from err

    def disk_source(self, manifest: Manifest, disk: str) -> BackupSource:
        """The disk as nbdkit serves it: :data:`BLOCK_READER` built from the repository's location, the
        backup and the key file's path (never the key; the reader checks every chunk it serves).

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: its index is missing or damaged (checked now, not inside nbdkit)
        """
        self.index(manifest, disk)
        options = {"repo": self.location, "vm": manifest.vm, "backup": manifest.backup_id, "disk": disk}
        if self._key_file is not None:
            options["key_file"] = str(self._key_file)
        identity = f"chunks:{self.location}/{manifest.vm}/{manifest.backup_id}/{disk}"
        return ReaderSource(BLOCK_READER, options, identity)

    def put_definition(self, vm: str, backup_id: str, text: str) -> str:
        """Store a machine definition with a backup (as a blob: encrypted with the repository); its id."""
        data = text.encode("utf-8")
        chunk_id = self.codec.chunk_id(data)
        self._store.put(definition_key(vm, backup_id), self.codec.encode(data, chunk_id))
        return chunk_id.hex()

    def chunk_users(self, chunk_id: bytes) -> list[str]:
        """``vm/backup/disk`` of every backup disk whose index names ``chunk_id`` (damaged ones skipped)."""
        users = []
        for manifest in self.backups(damaged=[]):
            for record in manifest.disks:
                with contextlib.suppress(VmsnapError):
                    if chunk_id in self.index(manifest, record.name).referenced():
                        users.append(f"{manifest.vm}/{manifest.backup_id}/{record.name}")
        return users

    def name_users(self, err: DamagedChunkError) -> DamagedChunkError:
        """``err`` with the backups and disks that use its chunk added to the message."""
        found = _CHUNK_HEX.search(err.message)
        if found is None:
            return err
        users = self.chunk_users(bytes.fromhex(found.group(1)))
        return DamagedChunkError(
            f"{err.message}; used by {', '.join(users) or 'no complete backup'}",
            hint="restore a backup that does not use it, or take a new full backup (it stores it again)",
        )

    # -- leases, journal, change tracking -------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, vm: str) -> Iterator[None]:
        """Hold the VM's writer lease (``locks/vms/<vm>``, renewed while held) for the body.

        :raise LeaseError: another run holds it, or gc is running
        """
        with self.leases.holding(writer_key(vm), "writer", f"a backup, prune or recover of {vm}") as lease:
            self._held[vm] = (lease, read_generation(self._store))
            try:
                yield
            finally:
                self._held.pop(vm, None)

    @contextlib.contextmanager
    def reading(self, vm: str | None = None) -> Iterator[None]:
        """Hold a reader lease for the body: gc waits for (or refuses while) it is held."""
        with self.leases.holding(self.leases.reader_key(), "reader", "a restore, verify or copy"):
            yield

    def journal_path(self, vm: str) -> Path:
        return self._state.journal_path(vm)

    def recover_leftovers(self, vm: str) -> list[str]:
        actions = []
        for (_, backup_id), names in sorted(self._backup_dirs(vm).items()):
            if MANIFEST not in names:
                self.discard_backup(vm, backup_id)
                actions.append(f"removed partial backup {backup_id}")
        for work in self._state.work_dirs(vm):
            shutil.rmtree(work, ignore_errors=True)
            actions.append(f"removed work directory {work}")
        for key, record in [*self.leases.dead_of_this_host(READERS), *self.leases.dead_of_this_host(GC_KEY)]:
            self._store.delete(key)
            actions.append(f"removed the dead lease {key} of {record.what} (pid {record.pid})")
        return actions

    def discard_backup(self, vm: str, backup_id: str) -> bool:
        prefix = backup_prefix(vm, backup_id)
        keys = [stored.key for stored in self._store.list(prefix)]
        if prefix + MANIFEST in keys:
            raise RepositoryError(f"backup {vm}/{backup_id} is complete; not discarding it")
        for key in keys:
            self._store.delete(key)
        work = self._state.work_dir(vm, backup_id)
        existed = bool(keys) or work.exists()
        shutil.rmtree(work, ignore_errors=True)
        return existed

    def require_full(self, vm: str, reason: str) -> None:
        data = json.dumps({"reason": reason, "since": utc_now_iso()}).encode()
        self._store.put(needs_full_key(vm), data)

    def full_required(self, vm: str) -> str | None:
        try:
            raw = self._store.get(needs_full_key(vm))
        except NotFoundError:
            return None
        try:
            return str(json.loads(raw).get("reason", "a dead run"))
        except (ValueError, AttributeError):
            return "the marker object is damaged"

    def clear_full_required(self, vm: str) -> None:
        self._store.delete(needs_full_key(vm))

    # -- writing -------------------------------------------------------------------------------------

    def usable_parent(self, manifest: Manifest) -> str | None:
        for record in manifest.disks:
            if not self._store.exists(index_key(manifest.vm, manifest.backup_id, record.name)):
                return f"the index of disk {record.name} of {manifest.backup_id} is missing"
        return None

    def new_backup_id(self, vm: str) -> str:
        """A fresh id for ``vm`` that sorts after every id it has (complete or not)."""
        return next_backup_id(backup_id for _, backup_id in self._backup_dirs(vm))

    def begin_backup(self, vm: str, parent: Manifest | None, *, runner: Runner | None = None) -> ChunksWriter:
        held = self._held.get(vm)
        if held is None:
            raise UsageError(f"begin_backup of {vm} without its lease", hint="a bug: call it inside lock(vm)")
        lease, generation = held
        _ = self.key  # an encrypted repository without its key fails here, before anything is written
        return ChunksWriter(
            self, vm, self.new_backup_id(vm), parent, lease, generation, runner or self.runner
        )

    # -- restore, verify, prune, gc ------------------------------------------------------------------

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
        """Restore with every chunk checked (see :func:`~vmsnap.repo.chunks.restore.restore_disk`); a device
        is written only once every chunk it needs is known to exist."""
        devices = dict(devices or {})
        with self.reading(vm):
            manifest = self.get(vm, backup_id)
            names = list(disk_filter(manifest, disks))
            indexes = {name: self.index(manifest, name) for name in names}  # all checked before any write
            targets = {name: devices.get(name) or Path(to) / f"{name}.{format}" for name in names}
            for name, target in targets.items():
                if name not in devices and target.exists():
                    raise VmsnapError(
                        f"{target} exists already; restore never overwrites",
                        hint="restore into an empty directory, or move that file away",
                    )
            if devices:
                self._check_present([indexes[n] for n in names if n in devices])
            if any(n not in devices for n in names):
                make_private_dir(Path(to))
            return manifest, [
                self._restore_one(
                    manifest, name, indexes[name], targets[name], name in devices, format, progress
                )
                for name in names
            ]

    def _restore_one(
        self,
        manifest: Manifest,
        name: str,
        index: ChunkIndex,
        target: Path,
        device: bool,
        format: RestoreFormat,
        progress: DiskProgress,
    ) -> RestoredDisk:
        record = manifest.disk(name)
        try:
            restore_disk(
                index,
                self._store,
                self.codec,
                target,
                format="raw" if device else format,
                # raw files and devices take twice the writers (pwrite, no qemu-nbd): 1.6-1.9x here
                workers=min(MAX_RESTORE_WORKERS, self._workers * (2 if device or format == "raw" else 1)),
                progress=lambda state: progress(name, state.done, state.total),
                name=f"{manifest.vm}/{manifest.backup_id}/{name}",
                runner=self.runner,
            )
        except DamagedChunkError as err:
            raise self.name_users(err) from err
        return RestoredDisk(name, target, record.virtual_size, record.sha256)

    def _check_present(self, indexes: Sequence[ChunkIndex]) -> None:
        """:raise DamagedChunkError: a chunk the indexes name is not in the store (who uses it named)."""
        present = list_chunk_ids(self._store)
        for index in indexes:
            for _, chunk_id in index.data_chunks():
                if chunk_id not in present:
                    raise self.name_users(
                        DamagedChunkError(f"chunk {chunk_id.hex()} is missing from the store {self.location}")
                    )

    def verify(
        self,
        vm: str | None = None,
        backup_id: str | None = None,
        *,
        reader: VerifyReader = "auto",
        fast: bool = False,
        progress: DiskProgress = no_progress,
    ) -> VerifyReport:
        """Check every backup's manifest and indexes, and every chunk they name: fetched, decoded and
        checked against its id (``fast``: only that it exists, from one listing). ``reader`` is ignored."""
        damaged: list[Damaged] = []
        with self.reading(vm):
            if backup_id is not None:
                if vm is None:
                    raise UsageError("--backup needs --vm", hint="name the VM the backup belongs to")
                targets = [self.get(vm, backup_id)]
            else:
                if vm is not None and vm not in self.vms():
                    self.get(vm)  # raises NotFoundError naming the VMs there are
                targets = self.backups(vm, damaged=damaged)
            missing: dict[str, set[ChunkId]] = {}
            report = verify_chunks(self, targets, damaged, fast=fast, progress=progress, missing=missing)
        if missing:
            self._store_missing_again(missing)
        return report

    def _store_missing_again(self, missing: Mapping[str, set[ChunkId]]) -> None:
        """Chunks went missing behind vmsnap's back: make every host forget them (its known-chunks cache) and
        the next backup of each VM that names one full, so that it stores them again (if the guest still has
        that data). Best effort: read-only credentials leave it to the report."""
        try:
            drop_known_caches(self._store)
            for vm, ids in sorted(missing.items()):
                first = min(ids).hex()
                reason = f"verify found {len(ids)} chunk(s) of its backups missing (first {first})"
                self.require_full(vm, reason)
        except StoreError as err:
            log.warning("verify could not mark the VMs whose chunks are missing: %s", err.message)

    def delete_backup(self, vm: str, backup_id: str) -> None:
        """Delete the manifest first (the backup is gone at once), then its other objects; its chunks stay
        until gc finds no index naming them."""
        self._store.delete(manifest_key(vm, backup_id))
        self.discard_backup(vm, backup_id)

    def gc(self, *, wait: float = 0.0, dry_run: bool = False) -> GcReport:
        return collect(self, wait=wait, dry_run=dry_run)

    def present_chunks(self) -> set[ChunkId]:
        """The ids of every chunk in the store (one listing)."""
        return list_chunk_ids(self._store)

    def chunk_blob(self, chunk_id: bytes) -> bytes:
        """The stored blob of a chunk (unchecked: decode it with :attr:`codec`)."""
        return self._store.get(chunk_key(chunk_id))
