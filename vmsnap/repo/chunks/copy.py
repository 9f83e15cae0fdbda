"""A backup of another repository written into a ``chunks`` repository (``vmsnap copy``): what
:meth:`ChunksRepository.copy_in <vmsnap.repo.chunks.repository.ChunksRepository.copy_in>` does.

- From a ``chunks`` repository (its own kind): only the chunks the target lacks are sent; each is checked
  (decoded against its id) first. The blob is sent as it is when both repositories name chunks alike (the
  same id hash, and both unencrypted or the same key); otherwise it is re-encoded with the target's key and
  named by the target's id hash (new ids, a rewritten index).
- From any other layout, through the :class:`~vmsnap.repo.layout.RepositoryLayout` interface: each disk is
  read from what the source serves it as (:meth:`~vmsnap.repo.layout.RepositoryLayout.disk_source`: an
  image read through qemu-nbd, or a block reader that checks what it reads) into the target's pipeline, and
  an image's every chunk is checked against the source's chunk digests as it passes.

The copy's manifest has no ``bitmap``: the VM's dirty bitmap belongs to the source repository's chain.
Into a locked repository, what the copy writes is locked by the target's own policy, and the chunks it
reuses from the target get their locks extended as a backup's are (:mod:`vmsnap.repo.chunks.retain`; a
chunk extended for one backup of a copy run is not extended again for the next).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import attrs

from vmsnap.errors import ChecksumMismatchError, DamagedChunkError, UnsupportedError
from vmsnap.image.digest import ChunkDigests, zero_digest
from vmsnap.image.readers import open_reader
from vmsnap.image.sources import BackupSource, ImageSource
from vmsnap.repo.chunks.blob import ID_SIZE, ChunkCodec, ChunkId, chunk_key
from vmsnap.repo.chunks.index import HOLE, ChunkIndex, encode_index
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.chunks.known import KnownChunks, RecordingStore
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.pipeline import backup_disk
from vmsnap.repo.chunks.readers import BlockSourceReader, SourceReader, open_image
from vmsnap.repo.chunks.records import encode_manifest, index_key, manifest_key
from vmsnap.repo.chunks.retain import ChunkLocks
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import CHUNKS_FORMAT, INDEX_DIGEST, ChunkStats, DiskRecord, Manifest
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.progress import DiskProgress
from vmsnap.repo.reports import CopiedBackup
from vmsnap.repo.stores.base import Store
from vmsnap.runner import Runner

WORKERS = 4


class CopyRepository(Protocol):
    """What a copy needs of a chunks repository: the target's and, for a copy between two of them, the
    source's."""

    @property
    def store(self) -> Store: ...

    @property
    def codec(self) -> ChunkCodec: ...

    @property
    def key(self) -> RepositoryKey | None: ...

    @property
    def marker(self) -> RepoMarker: ...

    @property
    def runner(self) -> Runner: ...

    @property
    def chunk_locks(self) -> ChunkLocks | None: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...

    def chunk_blob(self, chunk_id: bytes) -> bytes: ...

    def name_users(self, err: DamagedChunkError) -> DamagedChunkError: ...

    def present_chunks(self) -> set[ChunkId]: ...

    def put_definition(self, vm: str, backup_id: str, text: str) -> str: ...

    def put_attachment(self, vm: str, backup_id: str, name: str, data: bytes) -> None: ...

    def discard_backup(self, vm: str, backup_id: str) -> bool: ...

    def open_backup(self, vm: str, backup_id: str) -> str: ...

    def sealed(self, vm: str, backup_id: str, written: bool) -> None: ...


def copy_into(
    target: CopyRepository,
    source: RepositoryLayout,
    manifest: Manifest,
    progress: DiskProgress,
    *,
    chunks_source: CopyRepository | None = None,
) -> CopiedBackup:
    """Write the backup ``manifest`` of ``source`` into ``target`` (caller holds the target's lock on the VM
    and a reader lease on the source); nothing of it is kept when it fails.

    :param chunks_source: ``source`` again when it is a chunks repository too: its chunks move as blobs
    :raise ChecksumMismatchError: source content that does not check out
    :raise UnsupportedError: the source serves an image without digests to check it against
    """
    into = ChunksCopy(target, manifest)
    target.open_backup(manifest.vm, manifest.backup_id)  # before it learns which chunks the target has
    try:
        for record in manifest.disks:
            if chunks_source is not None:
                into.add_from_chunks(chunks_source, record, progress)
            else:
                into.add_from_source(source, record, progress)
        for name in source.attachments(manifest):  # machine state, boot and verify records: checked when read
            target.put_attachment(manifest.vm, manifest.backup_id, name, source.attachment(manifest, name))
        into.seal(source.definition(manifest))
    except BaseException:
        target.discard_backup(manifest.vm, manifest.backup_id)
        raise
    return CopiedBackup(manifest.vm, manifest.backup_id, True, into.sent_chunks, into.sent_bytes)


@attrs.define
class ChunksCopy:
    """One backup being copied into a chunks repository: its disks added one by one, then sealed."""

    repo: CopyRepository
    manifest: Manifest
    records: list[DiskRecord] = attrs.Factory(list)
    present: set[ChunkId] | None = None
    sent_chunks: int = 0
    sent_bytes: int = 0
    lock: threading.Lock = attrs.Factory(threading.Lock)
    named: set[ChunkId] = attrs.Factory(set)
    stored: set[ChunkId] = attrs.Factory(set)
    started: float = attrs.Factory(time.time)

    def _present(self) -> set[ChunkId]:
        if self.present is None:
            self.present = self.repo.present_chunks()
        return self.present

    def add_from_chunks(self, source: CopyRepository, record: DiskRecord, progress: DiskProgress) -> None:
        """Send the chunks of one disk the target lacks (checked first), then its index."""
        index = source.index(self.manifest, record.name)
        # the same key and the same id hash give the same ids; otherwise every chunk is renamed
        same_ids = (source.marker.key_id, source.marker.chunk_id) == (
            self.repo.marker.key_id,
            self.repo.marker.chunk_id,
        )
        present = self._present()
        mapping: dict[ChunkId, ChunkId] = {}
        lengths = {chunk_id: index.length(n) for n, chunk_id in index.data_chunks()}
        done = [0]

        def send(chunk_id: ChunkId) -> None:
            blob = source.chunk_blob(chunk_id)
            try:
                data = source.codec.decode(blob, chunk_id, length=lengths[chunk_id])
            except DamagedChunkError as err:
                raise source.name_users(err) from err
            new_id = chunk_id if same_ids else self.repo.codec.chunk_id(data)
            stored = 0
            if new_id not in present:
                out = blob if same_ids else self.repo.codec.encode(data, new_id)
                if self.repo.store.put(chunk_key(new_id), out, if_absent=True):
                    stored = len(out)
            with self.lock:
                mapping[chunk_id] = new_id
                present.add(new_id)
                if stored:
                    self.stored.add(new_id)
                    self.sent_chunks += 1
                    self.sent_bytes += stored
                done[0] += lengths[chunk_id]
                progress(record.name, done[0], record.virtual_size)

        if same_ids:  # nothing to rename: send only what is missing
            todo = [c for c in lengths if c not in present]
            mapping.update((c, c) for c in lengths)
        else:
            todo = list(lengths)
        BoundedPool(send, workers=WORKERS, depth=2 * WORKERS).run(todo)
        ids = bytearray(index.ids)
        for number, chunk_id in index.data_chunks():
            ids[number * ID_SIZE : (number + 1) * ID_SIZE] = mapping[chunk_id]
        self._put_index(record, ChunkIndex(index.virtual_size, bytes(ids)), bytes_read=0)

    def add_from_source(self, source: RepositoryLayout, record: DiskRecord, progress: DiskProgress) -> None:
        """Read one disk as ``source`` serves it through the pipeline: an image with each chunk checked
        against the source's chunk digests, or a block reader that checks what it reads.

        :raise UnsupportedError: the source serves an image and keeps no digests to check it against
        :raise ChecksumMismatchError: a chunk of the image does not match its digest
        """
        expected = source.chunk_digests(self.manifest, record.name)
        served = source.disk_source(self.manifest, record.name)
        if isinstance(served, ImageSource) and expected is None:
            raise UnsupportedError(
                f"{source.location}: {self.manifest.vm}/{self.manifest.backup_id}/{record.name} is an image "
                "without chunk digests, so its content cannot be checked while it is copied",
                hint="restore it and back the restored image up instead",
            )
        problems: list[int] = []

        def check(number: int, data: bytes | bytearray | memoryview) -> None:
            assert expected is not None
            if hashlib.sha256(data).digest() != expected.chunk(number):
                problems.append(number)

        recording = RecordingStore(self.repo.store, KnownChunks(self.repo.store, None))
        with self._reader(served) as reader:
            result = backup_disk(
                reader,
                recording,
                self.repo.codec,
                known=self._present(),
                inspect=check if expected is not None else None,
                progress=lambda state: progress(record.name, state.done, state.total),
            )
        if expected is not None:
            problems += _unread_problems(result.index, expected)
        if problems:
            raise ChecksumMismatchError(
                f"{self.manifest.vm}/{self.manifest.backup_id}/{record.name}: {len(problems)} chunk(s) of "
                f"the source image do not match its digests (first: chunk {min(problems)})",
                hint="run `vmsnap verify` on the source repository; copy another backup",
            )
        if result.index.virtual_size != record.virtual_size:
            raise ChecksumMismatchError(
                f"{self.manifest.vm}/{self.manifest.backup_id}/{record.name}: the source serves "
                f"{result.index.virtual_size} bytes, its manifest says {record.virtual_size}",
                hint="run `vmsnap verify` on the source repository; copy another backup",
            )
        self.sent_chunks += result.stats.new_chunks
        self.sent_bytes += result.stats.new_bytes
        self.stored |= recording.written.keys()
        self._present().update(result.index.referenced())
        self._put_index(record, result.index, bytes_read=result.stats.bytes_read)

    @contextlib.contextmanager
    def _reader(self, served: BackupSource) -> Iterator[SourceReader]:
        if isinstance(served, ImageSource):
            with open_image(served.path, served.format, runner=self.repo.runner) as image_reader:
                yield image_reader
            return
        reader = open_reader(served.reader, dict(served.options))
        try:
            yield BlockSourceReader(reader)
        finally:
            close = getattr(reader, "close", None)
            if callable(close):
                close()

    def _put_index(self, record: DiskRecord, index: ChunkIndex, *, bytes_read: int) -> None:
        data = encode_index(index, self.repo.key)
        self.repo.store.put(index_key(self.manifest.vm, self.manifest.backup_id, record.name), data)
        self.named |= index.referenced()
        data_chunks = sum(1 for _ in index.data_chunks())
        stats = ChunkStats(
            logical_size=index.data_bytes(),
            bytes_read=bytes_read,
            new_chunks=0,
            new_bytes=0,
            reused_chunks=data_chunks,
            zero_chunks=len(index) - data_chunks,
            unchanged_chunks=0,
        )
        name = record.name
        self.records.append(
            DiskRecord(name, f"{name}.index", record.virtual_size, 0, hashlib.sha256(data).hexdigest(), stats)
        )

    def seal(self, definition: str | None) -> None:
        """Write the copy's definition (if any) and, last, its manifest."""
        m = self.manifest
        sealed = None
        locks = self.repo.chunk_locks
        if locks is not None:
            sealed = locks.secure(
                named=self.named, stored=self.stored, started=self.started, previous=None, previous_ids=None
            )
        definition_id = None
        if definition is not None:
            definition_id = self.repo.put_definition(m.vm, m.backup_id, definition)
        copied = attrs.evolve(
            m,
            bitmap=None,
            disks=tuple(self.records),
            format=CHUNKS_FORMAT,
            digest=INDEX_DIGEST,
            definition=definition_id,
            chunk_lock=sealed.chunk_lock if sealed is not None else None,
        )
        written = self.repo.store.put(
            manifest_key(m.vm, m.backup_id),
            encode_manifest(copied, self.repo.key),
            if_absent=True,
            retention=sealed.manifest if sealed is not None else None,
        )
        self.repo.sealed(m.vm, m.backup_id, written)  # a gc may have fenced it (see vmsnap.repo.chunks.gc)


def _unread_problems(index: ChunkIndex, expected: ChunkDigests) -> list[int]:
    """Chunks the pipeline did not read (holes by the map) whose digest is not that of zeros."""
    return [
        number
        for number in range(len(index))
        if index.chunk_id(number) == HOLE and expected.chunk(number) != zero_digest(index.length(number))
    ]
