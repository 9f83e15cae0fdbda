"""The backup pipeline makes chunk blobs durable in batches (``put(durable=False)``, then ``store.sync()``)
and returns the index only after the sync: a backup killed between its puts and the sync leaves no chunk
visible and none in this host's known-chunks cache, so the next backup stores them again; a failed run
leaves nothing queued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmsnap.errors import TransferError
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.chunks.blob import CHUNK_SIZE, ChunkCodec
from vmsnap.repo.chunks.known import KnownChunks, RecordingStore
from vmsnap.repo.chunks.pipeline import backup_disk, list_known_chunks
from vmsnap.repo.chunks.readers import FileReader
from vmsnap.repo.chunks.restore import restore_disk
from vmsnap.repo.stores.local import LocalStore

CHUNKS = 6
BACKUP = """
import sys
from pathlib import Path
from vmsnap.repo.chunks.blob import ChunkCodec
from vmsnap.repo.chunks.known import KnownChunks, RecordingStore
from vmsnap.repo.chunks.pipeline import backup_disk
from vmsnap.repo.chunks.readers import FileReader
from vmsnap.repo.stores.local import LocalStore

image, root, cache = (Path(arg) for arg in sys.argv[1:])
store = LocalStore(root, create=True)
known = KnownChunks(store, cache)
ids = known.load("0")
with FileReader(image) as reader:
    result = backup_disk(reader, RecordingStore(store, known), ChunkCodec(), known=ids)
print(result.stats.new_chunks)
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw disk of distinct random chunks (and a hole)."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as out:
        out.truncate((CHUNKS + 1) * CHUNK_SIZE)
        for number in range(CHUNKS):
            out.seek(number * CHUNK_SIZE)
            out.write(os.urandom(CHUNK_SIZE))
    return path


def _backup(image: Path, root: Path, cache: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BACKUP, str(image), str(root), str(cache)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _cached_ids(cache: Path) -> bytes:
    """The ids the known-chunks cache holds (after its header line)."""
    return cache.read_bytes().partition(b"\n")[2] if cache.exists() else b""


def test_a_backup_killed_before_the_sync_leaves_no_chunk_and_none_known(tmp_path: Path, image: Path) -> None:
    root, cache = tmp_path / "store", tmp_path / "known-chunks"
    dead = _backup(image, root, cache, {CRASH_ENV: "chunks-before-sync"})
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    store = LocalStore(root)
    assert list_known_chunks(store) == set()  # queued blobs are not objects before they are durable
    assert _cached_ids(cache) == b""  # nor known: the next backup must not trust them
    following = _backup(image, root, cache, {})
    assert following.returncode == 0, following.stderr
    assert int(following.stdout) == CHUNKS  # every chunk stored (again)
    assert len(list_known_chunks(store)) == CHUNKS
    assert len(_cached_ids(cache)) == CHUNKS * 32
    assert not [p for p in root.rglob(".tmp-*") if p.stat().st_nlink > 1]  # leftovers are never objects


class SpyStore(LocalStore):
    """A LocalStore that records the order of durable=False puts and syncs."""

    events: list[str]

    def put(self, key: str, data: bytes, *, if_absent: bool = False, durable: bool = True) -> bool:
        self.events.append("put" if durable else "queued")
        return super().put(key, data, if_absent=if_absent, durable=durable)

    def sync(self) -> None:
        self.events.append("sync")
        super().sync()


def test_the_pipeline_returns_after_the_sync_with_every_chunk_there(tmp_path: Path, image: Path) -> None:
    store = SpyStore(tmp_path / "store", create=True)
    store.events = []
    cache = tmp_path / "known-chunks"
    known = KnownChunks(store, cache)
    with FileReader(image) as reader:
        result = backup_disk(reader, RecordingStore(store, known), ChunkCodec(), known=known.load("0"))
    assert store.events == ["queued"] * CHUNKS + ["sync"]
    assert result.stats.new_chunks == CHUNKS == len(list_known_chunks(store))
    assert len(_cached_ids(cache)) == CHUNKS * 32
    restore_disk(result.index, store, ChunkCodec(), tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == image.read_bytes()


class FailingReader(FileReader):
    def read_into(self, offset: int, buffer: memoryview) -> None:
        if offset >= 3 * CHUNK_SIZE:
            raise TransferError("the export went away")
        super().read_into(offset, buffer)


def test_a_failed_run_leaves_nothing_queued(tmp_path: Path, image: Path) -> None:
    store = SpyStore(tmp_path / "store", create=True)
    store.events = []
    with FailingReader(image) as reader, pytest.raises(TransferError):
        backup_disk(reader, store, ChunkCodec(), workers=1)
    assert store.events[-1] == "sync"  # what was queued landed whole (garbage for gc), nothing stays queued
    assert not list(store.root.rglob(".tmp-*"))
    assert len(list_known_chunks(store)) == store.events.count("queued")
