"""One disk of a ``chunks`` backup as a read-only block device: what ``vmsnap mount`` and instant restore
serve through nbdkit's Python plugin (:mod:`vmsnap.image.nbdkit_plugin`).

nbdkit builds the reader with :func:`open_reader` from string options (the repository, VM, backup, disk and
the *path* of the key file — never key material), then forks: so the factory only checks that the backup is
readable (the repository opens, the key is right, the index is whole) and the reader opens the repository
again lazily, in the process that serves. Every chunk is checked against its id (or its tag) before a byte
of it is served; a damaged or missing chunk fails that request only (EIO), naming the chunk. A few decoded
chunks are kept (LRU), because FUSE and a loop device read 4 to 128 KiB at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmsnap.errors import DamagedChunkError, UsageError
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.repo.chunks.blob import chunk_key
from vmsnap.repo.chunks.index import ChunkIndex

CACHED_CHUNKS = 8


def _open(repo: str, key_file: str) -> Any:
    from vmsnap.repo.repository import Repository  # the repository facade sits above this package

    return Repository.open(repo, key_file=Path(key_file) if key_file else None)


class ChunkDiskReader:
    """A ``chunks`` backup's disk, read chunk by chunk (see the module docstring).

    :param repo: the repository's location (a directory or ``s3://BUCKET/PREFIX``)
    :param key_file: the key file's path ("" for an unencrypted repository)
    :param index: the disk's index (checked when the factory read it)
    :param name: the disk, for messages (``vm/backup/disk``)
    """

    def __init__(self, repo: str, key_file: str, index: ChunkIndex, name: str) -> None:
        self._repo_location, self._key_file = repo, key_file
        self._index = index
        self._name = name
        self._lock = threading.Lock()
        self._repository: Any = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    @property
    def size(self) -> int:
        return self._index.virtual_size

    def _repo(self) -> Any:
        with self._lock:
            if self._repository is None:  # opened in the serving process, after nbdkit forked
                self._repository = _open(self._repo_location, self._key_file)
            return self._repository

    def _chunk(self, number: int) -> bytes:
        """The plaintext of chunk ``number`` (zeros for a hole), checked against its id.

        :raise DamagedChunkError: it is missing or does not match its id
        """
        with self._lock:
            cached = self._cache.get(number)
            if cached is not None:
                self._cache.move_to_end(number)
                return cached
        length = self._index.length(number)
        if self._index.is_hole(number):
            data = bytes(length)
        else:
            repo = self._repo()
            chunk_id = self._index.chunk_id(number)
            try:
                blob = repo.store.get(chunk_key(chunk_id))
            except Exception as err:  # a missing chunk, or the store failed: this request fails
                raise DamagedChunkError(
                    f"chunk {chunk_id.hex()} (number {number} of {self._name}) cannot be read: {err}",
                    hint="run `vmsnap verify`; other files of the backup still read",
                ) from err
            data = repo.codec.decode(blob, chunk_id, length=length)
        with self._lock:
            self._cache[number] = data
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (ranges may span chunks).

        :raise UsageError: the range lies outside the disk
        :raise DamagedChunkError: a chunk it needs is damaged or missing
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at {offset} outside a disk of {self.size} bytes")
        out = bytearray()
        position = offset
        while position < offset + length:
            number = position // CHUNK_SIZE
            start = position - number * CHUNK_SIZE
            take = min(CHUNK_SIZE - start, offset + length - position)
            out += self._chunk(number)[start : start + take]
            position += take
        return bytes(out)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, reads_as_zero) runs over ``[offset, offset + length)``: holes read as zero."""
        end = min(offset + length, self.size)
        position = offset
        while position < end:
            number = position // CHUNK_SIZE
            chunk_end = min((number + 1) * CHUNK_SIZE, end)
            yield position, chunk_end - position, self._index.is_hole(number)
            position = chunk_end


def open_reader(*, repo: str, vm: str, backup: str, disk: str, key_file: str = "") -> ChunkDiskReader:
    """The reader nbdkit serves (see the module docstring): checks now that the repository opens with this
    key and that the backup's index of ``disk`` is whole; opens the repository again when first read.

    :raise RepositoryError: no repository there, no such backup or disk, a damaged index
    :raise KeyFileError: a missing or wrong key
    """
    repository = _open(repo, key_file)
    try:
        manifest = repository.get(vm, backup)
        index = repository.index(manifest, disk)
    finally:
        repository.store.close()  # no connection pool crosses nbdkit's fork
    return ChunkDiskReader(repo, key_file, index, f"{vm}/{backup}/{disk}")
