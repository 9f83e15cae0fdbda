"""A repository of layout ``chunks`` over any :class:`~vmsnap.repo.stores.base.Store`: every backup a complete
index per disk over deduplicated, compressed (optionally encrypted) chunks. The keys and the manifest's
authentication are in :mod:`vmsnap.repo.chunks.records`; leases in :mod:`vmsnap.repo.chunks.leases`; the
writer in :mod:`vmsnap.repo.chunks.writer`; gc in :mod:`vmsnap.repo.chunks.gc`; verify in
:mod:`vmsnap.repo.chunks.check`; the chunk id hash and its marker rules in :mod:`vmsnap.repo.chunks.ids`.

Every stored byte is checked before it is trusted: the manifest (its MAC, when encrypted) names each
index's sha256, each index carries its own checksum or MAC, and each chunk is checked against its id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import attrs

from vmsnap.errors import (
    ChecksumMismatchError,
    DamagedChunkError,
    KeyFileError,
    LeaseError,
    NotFoundError,
    RepositoryError,
    StoreError,
    UsageError,
    VmsnapError,
)
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.image.sources import BackupSource, ReaderSource
from vmsnap.model import validate_name
from vmsnap.processes import crash_point
from vmsnap.repo import attachments
from vmsnap.repo.chunks.blob import ID_SIZE, ChunkCodec, ChunkId, chunk_key
from vmsnap.repo.chunks.check import verify_chunks
from vmsnap.repo.chunks.copy import copy_into
from vmsnap.repo.chunks.gc import collect
from vmsnap.repo.chunks.heal import clear_healed, damaged_chunk_error, heal, users_of
from vmsnap.repo.chunks.ids import ChunkIdRules, id_hash_of
from vmsnap.repo.chunks.index import ChunkIndex, decode_index
from vmsnap.repo.chunks.keys import RepositoryKey, open_key
from vmsnap.repo.chunks.known import bump_generation, list_chunk_ids, read_generation
from vmsnap.repo.chunks.leases import GC_SERIES, LEASE_SECONDS, Lease, LeaseRecord, Leases, writer_series
from vmsnap.repo.chunks.leases import lease_seconds as default_lease_seconds
from vmsnap.repo.chunks.pipeline import DEFAULT_WORKERS
from vmsnap.repo.chunks.records import (
    ATTACHED,
    VMS,
    attachment_key,
    backup_prefix,
    decode_manifest,
    definition_key,
    index_key,
    is_tombstone,
    manifest_key,
    needs_full_key,
    needs_full_reason,
    split_backup_key,
    tombstone_reason,
    vm_prefix,
    writer_marker_key,
)
from vmsnap.repo.chunks.restore import restore_backup
from vmsnap.repo.chunks.retain import lock_store, locked_backups
from vmsnap.repo.chunks.sealed import SealedStore
from vmsnap.repo.chunks.writer import ChunksWriter
from vmsnap.repo.layout import RepositoryLayout, RestoreFormat, VerifyReader, disk_filter
from vmsnap.repo.manifest import MANIFEST, Damaged, Manifest, next_backup_id, utc_now_iso
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.reports import CopiedBackup, GcReport, RestoredDisk, VerifyReport
from vmsnap.repo.state import RepositoryState
from vmsnap.repo.stores import is_url
from vmsnap.repo.stores.base import Store
from vmsnap.runner import LocalRunner, Runner

BLOCK_READER = "vmsnap.repo.chunks.blockreader:open_reader"
"""What nbdkit's plugin builds to serve a disk of this layout (:mod:`vmsnap.repo.chunks.blockreader`)."""

log = logging.getLogger(__name__)


class ChunksRepository(ChunkIdRules):
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
    :param workers: threads of the backup and restore pipelines (at least the store's
        :attr:`~vmsnap.repo.stores.base.StoreCapabilities.transfer_threads`)
    """

    name: ClassVar[str] = "chunks"
    reads_exports: ClassVar[bool] = True
    accepts_push: ClassVar[bool] = False
    chains: ClassVar[bool] = False
    needs_directory: ClassVar[bool] = False
    encrypts: ClassVar[bool] = True
    chunk_size: ClassVar[int | None] = CHUNK_SIZE
    collects: ClassVar[bool] = True
    locks: ClassVar[bool] = True

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
        store, self.chunk_locks = lock_store(store, marker)  # a locked repository's puts lock
        self._store: Store = SealedStore(store, lambda: self.key) if marker.sealed else store  # never both
        self.marker = marker
        self._key = key
        self._key_file = key_file
        self._key_problem = key_problem
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self._state = RepositoryState(marker.id, state_root)
        self.leases = Leases(self._store, ttl=lease_seconds)
        # a store whose requests wait on a network (S3) says how many chunks to keep in flight
        self._workers = max(workers, store.capabilities.transfer_threads)
        self._held: dict[str, Lease] = {}

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
    ) -> ChunksRepository:
        """The repository in ``store``; an encrypted one's key file is read and checked against the marker
        now (a missing one is refused only when something must be decrypted or authenticated).

        :raise KeyFileError: the key file is not this repository's key, or cannot be read
        """
        key, problem = open_key(marker.key_id, key_file, location)
        return cls(
            store,
            marker,
            key=key,
            key_file=key_file if key is not None else None,
            key_problem=problem,
            runner=runner,
            state_root=state_root,
            lease_seconds=lease_seconds if lease_seconds is not None else default_lease_seconds(),
        )

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
        return ChunkCodec(
            self.key, compress=self.marker.compression != "none", id_hash=id_hash_of(self.marker)
        )

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

        :raise NotFoundError: it has none (or a tombstone: gc fenced its unfinished run)
        :raise RepositoryError: it is damaged, foreign or not authenticated
        """
        key = manifest_key(vm, backup_id)
        raw = self._store.get(key)
        if is_tombstone(raw):
            raise NotFoundError(
                f"backup {vm}/{backup_id} was never finished ({tombstone_reason(raw)})",
                hint="restore another backup",
            )
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

    def put_attachment(self, vm: str, backup_id: str, name: str, data: bytes) -> None:
        """Store an object beside a backup (complete or being written): its id, then its envelope
        as a chunk blob."""
        envelope = attachments.seal(vm, backup_id, name, data)
        chunk_id = self.codec.chunk_id(envelope)
        self._store.put(attachment_key(vm, backup_id, name), chunk_id + self.codec.encode(envelope, chunk_id))

    def attach(self, manifest: Manifest, name: str, data: bytes) -> None:
        attachments.check_unsealed(manifest, name)
        self.put_attachment(manifest.vm, manifest.backup_id, name, data)
        if not self._store.exists(manifest_key(manifest.vm, manifest.backup_id)):  # pruned meanwhile
            self._store.delete(attachment_key(manifest.vm, manifest.backup_id, name))
            raise NotFoundError(
                f"backup {manifest.vm}/{manifest.backup_id} is gone: it was removed meanwhile"
            )

    def attachment(self, manifest: Manifest, name: str) -> bytes:
        key = attachment_key(manifest.vm, manifest.backup_id, name)
        where = f"{self.location}/{key}"
        try:
            raw = self._store.get(key)
        except NotFoundError as err:
            raise NotFoundError(
                f"backup {manifest.vm}/{manifest.backup_id} keeps no {name}",
                hint=f"it keeps: {', '.join(self.attachments(manifest)) or 'nothing'}",
            ) from err
        try:
            envelope = self.codec.decode(raw[ID_SIZE:], raw[:ID_SIZE])
        except DamagedChunkError as err:
            raise RepositoryError(f"{where} is damaged: {err.message}", hint="remove it") from err
        return attachments.unseal(envelope, manifest.vm, manifest.backup_id, name, where=where)

    def attachments(self, manifest: Manifest) -> list[str]:
        prefix = backup_prefix(manifest.vm, manifest.backup_id) + ATTACHED
        return sorted(s.key[len(prefix) :] for s in self._store.list(prefix))

    def chunk_users(self, chunk_id: bytes) -> list[str]:
        """``vm/backup/disk`` of every backup disk whose index names ``chunk_id`` (damaged ones skipped)."""
        wanted = ChunkId(chunk_id)
        found = users_of(self, [wanted])[wanted]
        return list(dict.fromkeys(f"{vm}/{backup}/{disk}" for vm, backup, disk, _ in found))

    def name_users(self, err: DamagedChunkError) -> DamagedChunkError:
        """``err`` with the backups and disks that use its chunk, and a true hint (see
        :func:`~vmsnap.repo.chunks.heal.damaged_chunk_error`)."""
        return damaged_chunk_error(self, err)

    # -- leases, journal, change tracking -------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, vm: str) -> Iterator[None]:
        """Hold the VM's writer lease (``locks/writers/<vm>``, renewed while held) for the body.

        :raise LeaseError: another run holds it, or gc is running
        """
        what = f"a backup, prune or recover of {vm}"
        with self.leases.holding(writer_series(vm), "writer", what) as lease:
            crash_point("writer-leased")
            self._held[vm] = lease
            try:
                yield
            finally:
                self._held.pop(vm, None)

    @contextlib.contextmanager
    def reading(self, vm: str | None = None) -> Iterator[None]:
        """Hold a reader lease for the body: gc waits for (or refuses while) it is held."""
        lease = self.leases.holding(None, "reader", "a restore, verify or copy")
        with lease if self._store.capabilities.writable else contextlib.nullcontext():  # --as-of: none needed
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
        for key, record in self.leases.dead_readers_of_this_host():
            self._store.delete(key)
            actions.append(f"removed the dead lease {key} of {record.what} (pid {record.pid})")
        head = self.leases.head(GC_SERIES)
        mine = head is not None and head.record is not None and head.record.host == socket.gethostname()
        if mine and (fenced := self._fence_gc()) is not None:
            actions.append(f"released the dead gc lock of {fenced.what} (pid {fenced.pid})")
        return actions

    def _fence_gc(self) -> LeaseRecord | None:
        """Take over and release a gc lock whose holder is not live (dead, or stopped past its lease), and
        replace the gc generation: that gc deletes nothing more (it checks its lock before every group of
        deletes), and no host keeps a cache made while it deleted. The fenced holder, or None."""
        fenced = self.leases.fence(GC_SERIES)
        if fenced is not None:
            bump_generation(self._store)
        return fenced

    def discard_backup(self, vm: str, backup_id: str) -> bool:
        prefix = backup_prefix(vm, backup_id)
        keys = [stored.key for stored in self._store.list(prefix)]
        if prefix + MANIFEST in keys:
            try:
                fenced = is_tombstone(self._store.get(prefix + MANIFEST))
            except NotFoundError:
                fenced = False  # deleted meanwhile (a prune): whatever is left goes
            if fenced:
                keys.remove(prefix + MANIFEST)  # the tombstone stays: the id is never used again
            elif self._store.exists(prefix + MANIFEST):
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
        return needs_full_reason(self._store, vm)

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
        """Open a new backup of ``vm`` (under its writer lease): its directory's ``writer.json`` first, then
        the gc lock is read again (a live gc: refused; one that is not live is taken over, see
        :meth:`_fence_gc`), and only then the gc generation the writer's known chunks are checked against —
        the order :mod:`vmsnap.repo.chunks.gc` relies on.

        :raise LeaseError: gc started meanwhile
        """
        lease = self._held.get(vm)
        if lease is None:
            raise UsageError(f"begin_backup of {vm} without its lease", hint="a bug: call it inside lock(vm)")
        _ = self.key  # an encrypted repository without its key fails here, before anything is written
        for _attempt in range(5):
            backup_id = self.new_backup_id(vm)
            if self._store.put(writer_marker_key(vm, backup_id), self._marker(lease), if_absent=True):
                break
        else:
            raise RepositoryError(f"could not open a new backup of {vm}", hint="try again")
        generation = self._opened(vm, backup_id)
        runner = runner or self.runner
        return ChunksWriter(self, vm, backup_id, parent, lease, generation, runner, locks=self.chunk_locks)

    def open_backup(self, vm: str, backup_id: str) -> str:
        """Open the backup ``backup_id`` of ``vm`` for writing it under that id (``copy``), in the order
        :meth:`begin_backup` keeps; the gc generation to check known chunks against. A dead run's
        ``writer.json`` is replaced.

        :raise RepositoryError: the id is taken: a backup, or the tombstone of a run a gc fenced
        :raise LeaseError: gc started meanwhile
        """
        lease = self._held.get(vm)
        if lease is None:
            raise UsageError(f"open_backup of {vm} without its lease", hint="a bug: call it inside lock(vm)")
        if self._store.exists(manifest_key(vm, backup_id)):
            raise RepositoryError(
                f"backup {vm}/{backup_id} cannot be written here: the id is taken (by the backup, or by a "
                "run of it that a gc fenced because it was stopped longer than its lease)",
                hint="the other backups copy; this one cannot under its id",
            )
        self._store.put(writer_marker_key(vm, backup_id), self._marker(lease))
        return self._opened(vm, backup_id)

    @staticmethod
    def _marker(lease: Lease) -> bytes:
        record = lease.record
        return json.dumps(
            {"token": record.token, "host": record.host, "pid": record.pid}, sort_keys=True
        ).encode()

    def _opened(self, vm: str, backup_id: str) -> str:
        """After ``writer.json`` was written: read the gc lock again (a live gc refuses the backup; one that
        is not live is taken over, see :meth:`_fence_gc`), then the gc generation."""
        crash_point("writer-opened")
        try:
            self.leases.refuse_while_gc_runs()
            self._fence_gc()
            generation = read_generation(self._store)
        except BaseException:
            with contextlib.suppress(VmsnapError):
                self.discard_backup(vm, backup_id)
            raise
        crash_point("writer-ready")
        return generation

    def sealed(self, vm: str, backup_id: str, written: bool) -> None:
        """After the manifest's ``put(if_absent)`` of a backup being written: remove its ``writer.json``, or
        (``written`` False) raise why it was not written.

        :raise LeaseError: a gc fenced the backup (its run was stopped longer than its lease)
        :raise RepositoryError: a manifest was there already
        """
        key = manifest_key(vm, backup_id)
        if written:
            with contextlib.suppress(StoreError):
                self._store.delete(writer_marker_key(vm, backup_id))
            return
        try:
            fenced = is_tombstone(self._store.get(key))
        except NotFoundError:
            fenced = False
        if fenced:
            raise LeaseError(
                "a gc ran while this backup was stopped for longer than its lease, and fenced it",
                hint="take the backup again",
            )
        raise RepositoryError(f"{key} exists already", hint="a bug: backup ids are never reused")

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
        """Restore with every chunk checked (see :func:`~vmsnap.repo.chunks.restore.restore_backup`); a
        device is written only once every chunk it needs is known to exist."""
        with self.reading(vm):
            manifest = self.get(vm, backup_id)
            names = list(disk_filter(manifest, disks))
            indexes = {name: self.index(manifest, name) for name in names}  # all checked before any write
            try:
                return manifest, restore_backup(
                    manifest,
                    indexes,
                    self._store,
                    self.codec,
                    Path(to),
                    devices=dict(devices or {}),
                    format=format,
                    workers=self._workers,
                    progress=progress,
                    runner=self.runner,
                    location=self.location,
                )
            except DamagedChunkError as err:
                raise self.name_users(err) from err

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
        """Check every backup's manifest and indexes, and every chunk they name: fetched, decoded and
        checked against its id (``fast``: only that it exists, from one listing). ``reader`` is ignored.

        A chunk found damaged is moved aside and a missing one recorded, so that the next backup stores it
        again; with ``repair_from`` (other ``chunks`` repositories) each is looked for there and stored again
        at once (see :mod:`vmsnap.repo.chunks.heal`). The report's ``chunks`` say what was done.
        """
        sources = [source for source in repair_from if isinstance(source, ChunksRepository)]
        if len(sources) != len(repair_from):
            raise UsageError(
                "verify repairs only from repositories of the chunks layout",
                hint="copy the backups into a chunks repository first (`vmsnap copy`)",
            )
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
            found = verify_chunks(self, targets, damaged, fast=fast, progress=progress)
            try:
                repairs = heal(self, found, sources=sources)
                clear_healed(self._store, found)
            except StoreError as err:  # read-only credentials: the report says what was found, nothing more
                log.warning("verify could not move the damaged chunks aside: %s", err.message)
                repairs = ()
        return attrs.evolve(found.report, chunks=repairs)

    def delete_backup(self, vm: str, backup_id: str) -> None:
        """Delete the manifest first (the backup is gone at once), then its other objects; its chunks stay
        until gc finds no index naming them."""
        self._store.delete(manifest_key(vm, backup_id))
        self.discard_backup(vm, backup_id)

    def held_back(self, vm: str, backup_ids: Sequence[str]) -> dict[str, str]:  # (retain.locked_backups)
        return locked_backups(self._store, vm, backup_ids) if self.marker.lock is not None else {}

    def gc(self, *, wait: float = 0.0, dry_run: bool = False) -> GcReport:
        return collect(self, wait=wait, dry_run=dry_run)

    def copy_in(
        self, source: RepositoryLayout, manifest: Manifest, *, progress: DiskProgress = no_progress
    ) -> CopiedBackup:
        """Copy a backup of ``source`` in (see :mod:`vmsnap.repo.chunks.copy`): from another chunks
        repository only the chunks this one lacks, checked; from any other layout its disks read through
        the pipeline, each chunk checked."""
        chunks_source = source if isinstance(source, ChunksRepository) else None
        return copy_into(self, source, manifest, progress, chunks_source=chunks_source)

    def present_chunks(self) -> set[ChunkId]:
        """The ids of every chunk in the store (one listing)."""
        return list_chunk_ids(self._store)

    def chunk_blob(self, chunk_id: bytes) -> bytes:
        """The stored blob of a chunk (unchecked: decode it with :attr:`codec`)."""
        return self._store.get(chunk_key(chunk_id))
