"""One backup being written into a ``chunks`` repository: each disk read from the strategy's export by the
pipeline (:func:`~vmsnap.repo.chunks.pipeline.backup_disk`), its index stored, the manifest written last.

Which reader: an NBD export is read over several connections; a raw file or block device directly; a qcow2
file (or a file whose persistent dirty bitmap is exported) through a qemu-nbd. An incremental reads only the
chunks the export's dirty bitmap marks when the export's changes are relative to the parent backup
(``ExportSource.since``) and the parent's index of the disk is there; otherwise it reads everything and says
why (the index is complete either way). Chunks the store holds are not stored again: the known ids are the
parent's and this host's cache (:mod:`vmsnap.repo.chunks.known`), or one listing for a full backup — less
the chunks ``verify`` moved aside that the store lacks (:mod:`vmsnap.repo.chunks.quarantine`): those are
stored again when the disk produces them, and an incremental reads again every chunk whose parent id is one
of them. A backup that would name such a chunk moved aside while it ran fails at its seal.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import attrs

from vmsnap.errors import (
    DamagedChunkError,
    RepositoryError,
    StoreError,
    TransferError,
    UsageError,
    VmsnapError,
)
from vmsnap.files import make_private_dir
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.model import Disk, ExportSource, Progress, validate_name
from vmsnap.processes import crash_point
from vmsnap.repo import attachments
from vmsnap.repo.chunks.blob import ChunkCodec, ChunkId, chunk_key
from vmsnap.repo.chunks.index import ChunkIndex, encode_index
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.chunks.known import KnownChunks, RecordingStore, read_epoch
from vmsnap.repo.chunks.leases import Lease
from vmsnap.repo.chunks.pipeline import BackupProgress, DiskBackup, backup_disk
from vmsnap.repo.chunks.quarantine import absent_quarantined
from vmsnap.repo.chunks.readers import NbdReader, open_source
from vmsnap.repo.chunks.records import (
    backup_prefix,
    encode_manifest,
    index_key,
    manifest_key,
)
from vmsnap.repo.chunks.retain import ChunkLocks, previous_backup
from vmsnap.repo.manifest import (
    CHUNKS_FORMAT,
    INDEX_DIGEST,
    ChunkStats,
    DiskRecord,
    Kind,
    Manifest,
    utc_now_iso,
)
from vmsnap.repo.progress import Transfer
from vmsnap.repo.reports import WrittenDisk
from vmsnap.repo.state import RepositoryState
from vmsnap.repo.stores.base import Store
from vmsnap.runner import Runner
from vmsnap.transports.base import Transport

KEPT_CHECKS = 4096
"""After a failed write, up to this many chunks the run stored are checked one by one (are they there?)."""


class WriterRepository(Protocol):
    """What a :class:`ChunksWriter` needs of its repository."""

    @property
    def store(self) -> Store: ...

    @property
    def codec(self) -> ChunkCodec: ...

    @property
    def key(self) -> RepositoryKey | None: ...

    @property
    def state(self) -> RepositoryState: ...

    @property
    def location(self) -> str: ...

    @property
    def workers(self) -> int: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...

    def put_definition(self, vm: str, backup_id: str, text: str) -> str: ...

    def put_attachment(self, vm: str, backup_id: str, name: str, data: bytes) -> None: ...

    def discard_backup(self, vm: str, backup_id: str) -> bool: ...

    def sealed(self, vm: str, backup_id: str, written: bool) -> None: ...

    def latest(self, vm: str) -> Manifest | None: ...


@attrs.frozen
class _Disk:
    disk: Disk
    record: DiskRecord
    written: WrittenDisk


class ChunksWriter:
    """A backup in a ``chunks`` repository (see the module docstring); made by
    :meth:`ChunksRepository.begin_backup` under the VM's writer lease.

    :param repo: the repository
    :param vm: the VM
    :param backup_id: the new backup's id
    :param parent: the parent backup of an incremental, or None
    :param lease: the VM's writer lease (checked before the manifest is written)
    :param generation: the gc generation read after the backup's directory was opened (what the known
        chunks are checked against)
    :param runner: where the machine's files are (qemu-nbd runs there)
    :param locks: keeps the chunks locked in a locked repository (None: not locked); then the VM's backup
        before this one (the parent, or the latest for a full backup) is read now: its ``chunk_lock`` says
        how long the chunks it names are locked
    """

    accepts_push = False

    def __init__(
        self,
        repo: WriterRepository,
        vm: str,
        backup_id: str,
        parent: Manifest | None,
        lease: Lease,
        generation: str,
        runner: Runner,
        *,
        locks: ChunkLocks | None = None,
    ) -> None:
        self.repo = repo
        self.vm = validate_name(vm, "VM name")
        self.backup_id = validate_name(backup_id, "backup id")
        self.parent = parent
        self.lease = lease
        self.generation = generation
        self.runner = runner
        self.workdir = make_private_dir(repo.state.work_dir(vm, backup_id))
        self.location = f"{repo.location.rstrip('/')}/{backup_prefix(vm, backup_id).rstrip('/')}"
        self._disks: dict[str, _Disk] = {}
        self._known_chunks = KnownChunks(repo.store, repo.state.known_chunks)
        self._known: set[ChunkId] | None = None
        self._store = RecordingStore(repo.store, self._known_chunks)
        self._parent_indexes: dict[str, ChunkIndex | VmsnapError] = {}
        self._set_aside: set[ChunkId] | None = None
        self._epoch = ""
        self._named: set[ChunkId] = set()
        self._objects: dict[str, str] = {}
        self.locks = locks
        self.previous = previous_backup(repo, self.vm, parent) if locks is not None else None
        self.started = time.time()

    def _parent_disk_index(self, disk: str) -> ChunkIndex:
        """The parent's index of ``disk``, read once per backup.

        :raise VmsnapError: the parent has no such disk, or its index cannot be used
        """
        assert self.parent is not None
        if disk not in self._parent_indexes:
            try:
                self._parent_indexes[disk] = self.repo.index(self.parent, disk)
            except VmsnapError as err:
                self._parent_indexes[disk] = err
        found = self._parent_indexes[disk]
        if isinstance(found, VmsnapError):
            raise found
        return found

    def checkpoint_images(self, parent: Manifest, disks: Sequence[Disk]) -> dict[str, Path]:
        """None: a chunks repository keeps no images a strategy could write on top of."""
        return {}

    def _quarantined(self) -> set[ChunkId]:
        """The chunks verify moved aside that the store lacks (read once, with the epoch they go with)."""
        if self._set_aside is None:
            self._epoch = read_epoch(self.repo.store)
            self._set_aside = absent_quarantined(self.repo.store)
        return self._set_aside

    def _known_ids(self) -> set[ChunkId]:
        if self._known is None:
            # an incremental knows its parent's chunks: it lists the store only through a valid cache
            known = self._known_chunks.load(self.generation, list_if_stale=self.parent is None)
            if self.parent is not None:
                for record in self.parent.disks:
                    try:
                        known |= self._parent_disk_index(record.name).referenced()
                    except VmsnapError:
                        continue  # that disk is read fully; its chunks are stored if absent
            self._known = known - self._quarantined()
        return self._known

    def _parent_index(self, disk: Disk, source: ExportSource) -> tuple[ChunkIndex | None, str | None]:
        """The parent's index of ``disk`` when the export holds only the changes since the parent, else
        (None, why the whole disk is read) — why is None when nothing incremental was asked for."""
        if source.since is None:
            return None, None
        if self.parent is None or source.since != self.parent.backup_id:
            return None, f"the export's changes are relative to {source.since}, not to the parent backup"
        if source.dirty_bitmap is None:
            return None, "the export names no dirty bitmap"
        try:
            record = self.parent.disk(disk.name)
            index = self._parent_disk_index(disk.name)
        except VmsnapError as err:
            return None, f"the parent's index of {disk.name} cannot be used ({err.message})"
        if record.virtual_size != disk.virtual_size:
            return None, f"disk {disk.name} was resized since the parent backup"
        return index, None

    def write(
        self,
        disk: Disk,
        source: ExportSource,
        *,
        transport: Transport | None,
        progress: Progress,
        transfer: Callable[[Transfer], None] | None = None,
    ) -> WrittenDisk:
        """Read ``source`` once through the pipeline and store the disk's chunks and index.

        :raise UsageError: a transport was given (the chunks layout reads exports itself)
        :raise TransferError: reading the export failed
        :raise StoreError: the store refused a write
        """
        if transport is not None:
            raise UsageError("the chunks layout reads the export itself; it takes no transport")
        name = validate_name(disk.name, "disk name")
        parent_index, note = self._parent_index(disk, source)
        with open_source(source, runner=self.runner) as reader:
            if reader.size != disk.virtual_size:
                raise RepositoryError(
                    f"the export of {name} has {reader.size} bytes, the disk {disk.virtual_size}",
                    hint="the disk changed size during the backup; take it again",
                )
            changed = None
            if parent_index is not None:
                changed, note = _dirty_chunks(reader)
                if changed is None:
                    parent_index = None
                else:  # the parent's chunks that verify moved aside are read again (and stored, if there)
                    moved = self._quarantined()
                    changed |= {n for n, chunk_id in parent_index.data_chunks() if chunk_id in moved}

            def report(state: BackupProgress) -> None:
                progress(state.done, state.total)
                if transfer is not None:
                    transfer(Transfer(state.read, state.stored, state.deduplicated, state.zero))

            try:
                result = backup_disk(
                    reader,
                    self._store,
                    self.repo.codec,
                    parent=parent_index,
                    changed=changed,
                    known=self._known_ids(),
                    workers=self.repo.workers,
                    progress=report,
                )
            except StoreError as err:
                raise self.kept(err) from err
            kind = "nbd" if isinstance(reader, NbdReader) else "file"
        if note is not None:
            note = f"disk {name}: read in full, {note}"
        written = self._put_index(disk, result, WrittenDisk(result.stats.new_bytes, kind, source.since, note))
        crash_point("writer-indexed")
        return written

    def _put_index(self, disk: Disk, result: DiskBackup, written: WrittenDisk) -> WrittenDisk:
        """Store the disk's index and remember its record for the manifest."""
        name = disk.name
        self._named |= result.index.referenced()
        data = encode_index(result.index, self.repo.key)
        try:
            self.repo.store.put(index_key(self.vm, self.backup_id, name), data)
        except StoreError as err:
            raise self.kept(err) from err
        stats = result.stats
        data_chunks = sum(1 for _ in result.index.data_chunks())
        chunk_stats = ChunkStats(
            logical_size=result.index.data_bytes(),
            bytes_read=stats.bytes_read,
            new_chunks=stats.new_chunks,
            new_bytes=stats.new_bytes,
            reused_chunks=data_chunks - stats.new_chunks,
            zero_chunks=len(result.index) - data_chunks,
            unchanged_chunks=stats.unchanged_chunks,
        )
        record = DiskRecord(
            name,
            f"{name}.index",
            disk.virtual_size,
            stats.new_bytes,
            hashlib.sha256(data).hexdigest(),
            chunk_stats,
        )
        self._disks[name] = _Disk(disk, record, written)
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
        """Write the definition, then the manifest (``put(if_absent)``), after checking that the lease is
        still this run's. A gc that found this backup unfinished put a tombstone at the manifest's key
        first (see :mod:`vmsnap.repo.chunks.gc`): then the put fails, and so does the backup.

        :raise LeaseError: the lease was lost, or a gc fenced this backup
        :raise DamagedChunkError: verify moved aside a chunk this backup names while it ran
        """
        self.lease.check()
        if self._set_aside is not None and read_epoch(self.repo.store) != self._epoch:
            lost = sorted(self._named & absent_quarantined(self.repo.store))
            if lost:
                raise DamagedChunkError(
                    f"verify moved aside chunk {lost[0].hex()} while this backup ran, and the backup names "
                    f"it ({len(lost)} such chunk(s))",
                    hint="take the backup again: it stores them again if the disk still holds that data",
                )
        sealed = None
        if self.locks is not None:
            sealed = self.locks.secure(
                named=self._named,
                stored=set(self._store.written),
                started=self.started,
                previous=self.previous,
                previous_ids=self._previous_ids(),
            )
        definition_id = None
        if definition is not None:
            try:
                definition_id = self.repo.put_definition(self.vm, self.backup_id, definition)
            except StoreError as err:
                raise self.kept(err) from err
        manifest = Manifest(
            vm=self.vm,
            backup_id=self.backup_id,
            kind=kind,
            parent=parent.backup_id if kind == "incremental" and parent is not None else None,
            strategy=strategy,
            transport=",".join(sorted({d.written.transport for d in self._disks.values()})),
            created=utc_now_iso(),
            quiesced=quiesced,
            bitmap=bitmap,
            disks=tuple(d.record for d in self._disks.values()),
            format=CHUNKS_FORMAT,
            digest=INDEX_DIGEST,
            definition=definition_id,
            chunk_lock=sealed.chunk_lock if sealed is not None else None,
            objects=dict(self._objects),
        )
        key = manifest_key(self.vm, self.backup_id)
        crash_point("writer-sealing")
        retention = sealed.manifest if sealed is not None else None  # no later than its chunks' locks
        try:
            written = self.repo.store.put(
                key, encode_manifest(manifest, self.repo.key), if_absent=True, retention=retention
            )
        except StoreError as err:
            raise self.kept(err) from err
        self.repo.sealed(self.vm, self.backup_id, written)
        self._known_chunks.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return manifest

    def _previous_ids(self) -> set[ChunkId] | None:
        """Every chunk the previous backup names (those of disks whose index cannot be read left out: they
        are extended), or None without a previous backup."""
        previous = self.previous
        if previous is None:
            return None
        ids: set[ChunkId] = set()
        for record in previous.disks:
            try:
                if previous is self.parent:
                    ids |= self._parent_disk_index(record.name).referenced()
                else:
                    ids |= self.repo.index(previous, record.name).referenced()
            except VmsnapError:
                continue
        return ids

    def kept(self, err: StoreError) -> StoreError:
        """``err``, saying how much of what this run stored stays in the store (no index names it: it is
        gc's) — counted exactly, one existence check per chunk, up to :data:`KEPT_CHECKS` chunks."""
        written = dict(self._store.written)
        if not written:
            return err
        if len(written) <= KEPT_CHECKS:
            with ThreadPoolExecutor(8, thread_name_prefix="vmsnap-kept") as pool:
                there = list(pool.map(lambda c: self.repo.store.exists(chunk_key(c)), written))
            stayed = [size for size, present in zip(written.values(), there, strict=True) if present]
            amount = f"{len(stayed)} chunk(s), {sum(stayed) / 2**20:.1f} MiB,"
        else:
            amount = f"up to {len(written)} chunk(s), {sum(written.values()) / 2**20:.1f} MiB,"
        return StoreError(
            f"{err.message}; {amount} that this run stored stay in the store",
            hint=f"{err.hint}; `vmsnap gc` deletes the chunks no backup uses",
        )

    def attach(self, name: str, data: bytes) -> None:
        """Keep an object with this backup (sealed by the manifest, which names its sha256; removed with a
        discarded run)."""
        self.repo.put_attachment(self.vm, self.backup_id, name, data)
        self._objects[name] = attachments.digest(data)

    def discard(self) -> None:
        """Remove this unfinished backup's objects and work directory (its chunks stay: gc's job)."""
        self._known_chunks.close()
        self.repo.discard_backup(self.vm, self.backup_id)


def _dirty_chunks(reader: object) -> tuple[frozenset[int] | None, str | None]:
    """The chunks the reader's dirty bitmap marks, or (None, why they cannot be had)."""
    if not isinstance(reader, NbdReader) or reader.dirty_bitmap_context is None:
        return None, "the export offers no dirty bitmap"
    try:
        return reader.dirty_chunks(CHUNK_SIZE), None
    except TransferError as err:
        return None, err.message
