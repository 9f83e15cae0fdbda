"""The backup pipeline and restore (vmsnap.repo.chunks.pipeline, .restore) over an in-memory source and a
LocalStore in tmp_path: chunk planning against a byte-level model (hypothesis), what is read, hashed, stored
and reused, incrementals that read only the changed chunks, failures that stop every worker, and restores
that refuse a damaged or missing chunk without creating the target."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.errors import DamagedChunkError, StoreError, TransferError, UsageError
from vmsnap.repo.chunks.blob import CHUNK_SIZE, ChunkCodec, chunk_key
from vmsnap.repo.chunks.index import HOLE, ChunkIndex
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.pipeline import BackupProgress, backup_disk, chunk_ranges, list_known_chunks
from vmsnap.repo.chunks.readers import Extent, changed_chunks
from vmsnap.repo.chunks.restore import RestoreProgress, data_runs, restore_disk
from vmsnap.repo.stores.local import LocalStore

MiB = 1024 * 1024
CODECS = pytest.mark.parametrize(
    "codec", [ChunkCodec(), ChunkCodec(RepositoryKey.from_master(bytes(32)))], ids=["plain", "encrypted"]
)


class MemoryReader:
    """A SourceReader over bytes: ``zero_ranges`` are reported as zero extents, everything else as data."""

    def __init__(
        self, data: bytes, zero_ranges: Sequence[tuple[int, int]] = (), fail_at: int | None = None
    ) -> None:
        self.data = data
        self.zero_ranges = sorted(zero_ranges)
        self.fail_at = fail_at
        self.reads: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def parallel_reads(self) -> int:
        return 2

    @property
    def bytes_read(self) -> int:
        return sum(length for _, length in self.reads)

    def extents(self) -> Iterator[Extent]:
        pos = 0
        for start, length in self.zero_ranges:
            if start > pos:
                yield Extent(pos, start - pos, False)
            yield Extent(start, length, True)
            pos = start + length
        if pos < len(self.data):
            yield Extent(pos, len(self.data) - pos, False)

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise TransferError(f"read at {offset} failed")
        with self.lock:
            self.reads.append((offset, length))
        return self.data[offset : offset + length]

    def read_into(self, offset: int, buffer: memoryview) -> None:
        buffer[:] = self.read(offset, len(buffer))


def disk(size: int, data_chunks: dict[int, bytes | int]) -> bytes:
    """A disk of zeros with chunk i filled by a byte value or given bytes."""
    out = bytearray(size)
    for index, fill in data_chunks.items():
        start = index * CHUNK_SIZE
        end = min(start + CHUNK_SIZE, size)
        out[start:end] = bytes([fill]) * (end - start) if isinstance(fill, int) else fill[: end - start]
    return bytes(out)


def restored(index: ChunkIndex, store: LocalStore, codec: ChunkCodec, target: Path) -> bytes:
    restore_disk(index, store, codec, target)
    return target.read_bytes()


# -------------------------------------------------------------------------------------------- chunk planning


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 3 * CHUNK_SIZE + 5),
    cuts=st.lists(st.integers(0, 3 * CHUNK_SIZE + 5), max_size=8),
    zero_flags=st.lists(st.booleans(), min_size=9, max_size=9),
    gap=st.booleans(),
)
def test_chunk_ranges_against_a_model(size: int, cuts: list[int], zero_flags: list[bool], gap: bool) -> None:
    bounds = sorted({0, size, *(c for c in cuts if 0 < c < size)})
    extents = [Extent(a, b - a, zero_flags[i]) for i, (a, b) in enumerate(itertools.pairwise(bounds))]
    if gap and len(extents) > 1:
        del extents[len(extents) // 2]  # an undescribed range must be read
    covered_zero = {(e.start, e.length) for e in extents if e.zero}

    def reads_as_data(pos: int) -> bool:
        return not any(a <= pos < a + n for a, n in covered_zero)

    plan = list(chunk_ranges(iter(extents), size))
    assert [i for i, _ in plan] == list(range((size + CHUNK_SIZE - 1) // CHUNK_SIZE))
    for index, ranges in plan:
        start, end = index * CHUNK_SIZE, min((index + 1) * CHUNK_SIZE, size)
        for (a, n), (b, _) in itertools.pairwise(ranges):
            assert a + n < b  # sorted, merged, non-empty
        probes = {start, end - 1, *(p for a, n in ranges for p in (a - 1, a, a + n - 1, a + n))}
        probes |= {p for e in extents for p in (e.start - 1, e.start)}
        for pos in (p for p in probes if start <= p < end):
            in_ranges = any(a <= pos < a + n for a, n in ranges)
            assert in_ranges == reads_as_data(pos), (index, pos, ranges)


def test_changed_chunks() -> None:
    assert changed_chunks(iter([(0, 1), (CHUNK_SIZE - 1, 2), (10 * CHUNK_SIZE, 0)]), CHUNK_SIZE) == {0, 1}
    assert changed_chunks(iter([(3 * CHUNK_SIZE, 2 * CHUNK_SIZE)]), CHUNK_SIZE) == {3, 4}


def test_data_runs() -> None:
    block = 64 * 1024
    data = bytearray(CHUNK_SIZE)
    data[block * 3 + 7] = 1
    data[block * 4] = 1
    data[-1] = 1
    assert list(data_runs(bytes(data))) == [(3 * block, 5 * block), (CHUNK_SIZE - block, CHUNK_SIZE)]
    assert list(data_runs(bytes(100))) == [] and list(data_runs(b"\1" * 100)) == [(0, 100)]
    data[block * 3 + 7] = 0  # a block whose first and last bytes are zero, one in the middle is not
    data[block * 6 + 500] = 1
    expected = [(4 * block, 5 * block), (6 * block, 7 * block), (CHUNK_SIZE - block, CHUNK_SIZE)]
    for form in (bytes(data), memoryview(data), memoryview(bytes(data))[:]):  # views are compared in place
        assert list(data_runs(form)) == expected


# ---------------------------------------------------------------------------------------------- the pipeline


@CODECS
def test_full_backup_stores_each_distinct_chunk_once_and_restores(tmp_path: Path, codec: ChunkCodec) -> None:
    size = 7 * CHUNK_SIZE + 12345
    rnd = random.Random(5)
    content = disk(
        size,
        {0: rnd.randbytes(CHUNK_SIZE), 1: 0xAB, 2: 0xAB, 4: 0, 5: rnd.randbytes(CHUNK_SIZE), 7: 0x11},
    )
    reader = MemoryReader(content, zero_ranges=[(3 * CHUNK_SIZE, CHUNK_SIZE), (6 * CHUNK_SIZE, CHUNK_SIZE)])
    store = LocalStore(tmp_path / "store", create=True)
    reports: list[BackupProgress] = []
    result = backup_disk(reader, store, codec, workers=3, progress=reports.append)
    stats = result.stats
    assert (stats.new_chunks, stats.reused_chunks, stats.zero_chunks) == (4, 1, 3)
    assert stats.bytes_read == size - 2 * CHUNK_SIZE == reader.bytes_read  # zero extents never read
    assert stats.zero_bytes == 3 * CHUNK_SIZE and stats.reused_bytes == CHUNK_SIZE
    assert stats.new_data_bytes == size - 4 * CHUNK_SIZE
    assert len(list(store.list("chunks/"))) == 4 == len(list_known_chunks(store))
    assert stats.new_bytes == sum(o.size for o in store.list("chunks/"))
    index = result.index
    assert [index.is_hole(i) for i in range(8)] == [False, False, False, True, True, False, True, False]
    assert index.chunk_id(1) == index.chunk_id(2) == codec.chunk_id(bytes([0xAB]) * CHUNK_SIZE)
    assert index.chunk_id(7) == codec.chunk_id(bytes([0x11]) * 12345)
    final = reports[-1]
    assert final == BackupProgress(size, size, stats.bytes_read, stats.new_bytes, CHUNK_SIZE, 3 * CHUNK_SIZE)
    assert all(a.done <= b.done for a, b in itertools.pairwise(reports))
    assert restored(index, store, codec, tmp_path / "out.raw") == content


@CODECS
def test_known_chunks_are_not_stored_again(tmp_path: Path, codec: ChunkCodec) -> None:
    content = disk(3 * CHUNK_SIZE, {0: 1, 1: 2, 2: 3})
    store = LocalStore(tmp_path / "store", create=True)
    first = backup_disk(MemoryReader(content), store, codec)
    assert first.stats.new_chunks == 3
    mtimes = {o.key: os.stat(store.root / o.key).st_mtime_ns for o in store.list("chunks/")}
    known = list_known_chunks(store)
    again = backup_disk(MemoryReader(content), store, codec, known=known)
    assert (again.stats.new_chunks, again.stats.reused_chunks, again.stats.new_bytes) == (0, 3, 0)
    assert again.index == first.index and known == list_known_chunks(store)
    without_list = backup_disk(MemoryReader(content), store, codec)  # put(if_absent) says "exists"
    assert (without_list.stats.new_chunks, without_list.stats.reused_chunks) == (0, 3)
    assert mtimes == {o.key: os.stat(store.root / o.key).st_mtime_ns for o in store.list("chunks/")}


@CODECS
def test_incremental_reads_only_the_changed_chunks(tmp_path: Path, codec: ChunkCodec) -> None:
    size = 6 * CHUNK_SIZE
    base = disk(size, {i: i + 1 for i in range(6)})
    store = LocalStore(tmp_path / "store", create=True)
    parent = backup_disk(MemoryReader(base), store, codec).index
    changed = disk(size, {0: 1, 1: 2, 2: 0x77, 3: 4, 4: 0, 5: 6})  # chunk 2 rewritten, chunk 4 zeroed
    reader = MemoryReader(changed)
    result = backup_disk(reader, store, codec, parent=parent, changed={2, 4}, known=list_known_chunks(store))
    assert sorted(reader.reads) == [(2 * CHUNK_SIZE, CHUNK_SIZE), (4 * CHUNK_SIZE, CHUNK_SIZE)]
    stats = result.stats
    assert (stats.unchanged_chunks, stats.new_chunks, stats.zero_chunks) == (4, 1, 1)
    assert stats.bytes_read == 2 * CHUNK_SIZE and stats.unchanged_bytes == 4 * CHUNK_SIZE
    assert result.index.chunk_id(0) == parent.chunk_id(0) and result.index.is_hole(4)
    assert restored(result.index, store, codec, tmp_path / "out.raw") == changed


def test_incremental_of_a_resized_disk_reads_the_chunks_whose_length_changed(tmp_path: Path) -> None:
    codec = ChunkCodec()
    store = LocalStore(tmp_path / "store", create=True)
    parent = backup_disk(MemoryReader(disk(2 * CHUNK_SIZE + 100, {0: 1, 1: 2, 2: 3})), store, codec).index
    grown = disk(4 * CHUNK_SIZE, {0: 1, 1: 2, 2: 3, 3: 4})
    reader = MemoryReader(grown)
    result = backup_disk(reader, store, codec, parent=parent, changed=set())
    assert sorted(offset // CHUNK_SIZE for offset, _ in reader.reads) == [2, 3]
    assert restored(result.index, store, codec, tmp_path / "grown.raw") == grown
    shrunk = disk(CHUNK_SIZE + 10, {0: 1, 1: 2})
    reader = MemoryReader(shrunk)
    result = backup_disk(reader, store, codec, parent=parent, changed=set())
    assert [offset // CHUNK_SIZE for offset, _ in reader.reads] == [1]
    assert restored(result.index, store, codec, tmp_path / "shrunk.raw") == shrunk


def test_bad_incremental_arguments(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    reader = MemoryReader(disk(CHUNK_SIZE, {0: 1}))
    parent = ChunkIndex.holes(CHUNK_SIZE)
    with pytest.raises(UsageError, match="needs the set of changed chunks"):
        backup_disk(reader, store, ChunkCodec(), parent=parent)
    with pytest.raises(UsageError, match="without a parent"):
        backup_disk(reader, store, ChunkCodec(), changed={0})
    with pytest.raises(UsageError, match="outside"):
        backup_disk(reader, store, ChunkCodec(), parent=parent, changed={1})
    with pytest.raises(UsageError, match="workers"):
        backup_disk(reader, store, ChunkCodec(), workers=0)


def test_a_failed_read_stops_the_backup(tmp_path: Path) -> None:
    content = disk(20 * CHUNK_SIZE, {i: i + 1 for i in range(20)})
    store = LocalStore(tmp_path / "store", create=True)
    reader = MemoryReader(content, fail_at=5 * CHUNK_SIZE + 10)
    threads_before = threading.active_count()
    with pytest.raises(TransferError, match="read at"):
        backup_disk(reader, store, ChunkCodec(), workers=3)
    assert len(reader.reads) < 20  # the workers stopped taking chunks
    assert threading.active_count() == threads_before  # and are gone


def test_a_store_failure_stops_the_backup(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    (store.root / "chunks").mkdir(mode=0o700)
    os.chmod(store.root / "chunks", 0o500)
    if os.access(store.root / "chunks", os.W_OK):  # root ignores permissions: use a read-only file instead
        os.chmod(store.root / "chunks", 0o700)
        (store.root / "chunks").rmdir()
        (store.root / "chunks").write_bytes(b"")  # a file where the directory should be
    content = disk(4 * CHUNK_SIZE, {i: i + 1 for i in range(4)})
    with pytest.raises(StoreError) as info:
        backup_disk(MemoryReader(content), store, ChunkCodec())
    assert str(store.root) in info.value.message


def test_pool_raises_the_first_error_and_a_producer_error() -> None:
    seen: list[int] = []

    def work(task: int) -> None:
        if task == 3:
            raise ValueError("task 3")
        seen.append(task)

    with pytest.raises(ValueError, match="task 3"):
        BoundedPool(work, workers=2, depth=2).run(range(1000))
    assert len(seen) < 1000

    def tasks() -> Iterator[int]:
        yield 1
        raise RuntimeError("producer")

    with pytest.raises(RuntimeError, match="producer"):
        BoundedPool[int](lambda _: None, workers=2, depth=2).run(tasks())


# ------------------------------------------------------------------------------------------------- restore


@attrs.frozen
class Stored:
    store: LocalStore
    codec: ChunkCodec
    index: ChunkIndex
    content: bytes


@pytest.fixture
def stored(tmp_path: Path) -> Stored:
    codec = ChunkCodec(RepositoryKey.from_master(bytes(range(32))))
    content = disk(5 * CHUNK_SIZE, {0: 1, 1: random.Random(2).randbytes(CHUNK_SIZE), 3: 4})
    store = LocalStore(tmp_path / "store", create=True)
    return Stored(store, codec, backup_disk(MemoryReader(content), store, codec).index, content)


def test_restore_is_sparse_private_and_reports_progress(tmp_path: Path, stored: Stored) -> None:
    target = tmp_path / "out.raw"
    reports: list[RestoreProgress] = []
    stats = restore_disk(stored.index, stored.store, stored.codec, target, progress=reports.append)
    assert target.read_bytes() == stored.content
    assert (target.stat().st_mode & 0o777) == 0o600
    assert target.stat().st_blocks * 512 <= 3 * CHUNK_SIZE + 64 * 1024  # holes stay holes
    assert (stats.data_chunks, stats.hole_chunks, stats.written_bytes) == (3, 2, 3 * CHUNK_SIZE)
    assert reports[-1].done == reports[-1].total == 5 * CHUNK_SIZE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(UsageError, match="exists"):
        restore_disk(stored.index, stored.store, stored.codec, target)
    restore_disk(stored.index, stored.store, stored.codec, target, overwrite=True)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(stored.content).digest()


def test_a_damaged_chunk_fails_the_restore_naming_it_and_leaves_no_file(
    tmp_path: Path, stored: Stored
) -> None:
    chunk_id = stored.index.chunk_id(1)
    path = stored.store.root / chunk_key(chunk_id)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    target = tmp_path / "out.raw"
    with pytest.raises(DamagedChunkError) as info:
        restore_disk(stored.index, stored.store, stored.codec, target, name="disk0")
    message = info.value.message
    assert chunk_id.hex() in message and f"offset {CHUNK_SIZE} of disk0" in message and "chunk 1" in message
    assert not target.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_missing_chunk_or_a_blob_under_another_id_fails_the_restore(tmp_path: Path, stored: Stored) -> None:
    moved = stored.store.root / chunk_key(stored.index.chunk_id(3))
    other = stored.store.root / chunk_key(stored.index.chunk_id(0))
    blob = moved.read_bytes()
    moved.unlink()
    with pytest.raises(DamagedChunkError, match="missing from the store"):
        restore_disk(stored.index, stored.store, stored.codec, tmp_path / "a.raw")
    moved.write_bytes(blob)
    other.write_bytes(blob)  # chunk 3's blob filed as chunk 0's too
    with pytest.raises(DamagedChunkError, match="authentication failed"):
        restore_disk(stored.index, stored.store, stored.codec, tmp_path / "b.raw")
    assert not (tmp_path / "a.raw").exists() and not (tmp_path / "b.raw").exists()


def test_restore_refuses_bad_arguments(tmp_path: Path, stored: Stored) -> None:
    with pytest.raises(UsageError, match="format"):
        restore_disk(stored.index, stored.store, stored.codec, tmp_path / "x", format="vmdk")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="does not exist"):
        restore_disk(stored.index, stored.store, stored.codec, tmp_path / "no" / "x.raw")
    assert bytes(32) == HOLE  # the documented hole id
