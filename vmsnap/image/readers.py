"""Block readers: "something with a size and ``pread(offset, length)`` that raises on damage", the interface
the nbdkit plugin (:mod:`vmsnap.image.nbdkit_plugin`) serves over NBD for backups that are not qcow2 chains.

A reader is built inside nbdkit's embedded Python from an import string and string options, e.g.
``reader=vmsnap.image.readers:RawFileReader path=/backups/disk.raw``; the chunk layout's reader plugs in the
same way (``reader=vmsnap.repo.chunks.restore:open_reader repo=… vm=… backup=… disk=…``). Options land on
nbdkit's command line, visible in ``/proc/PID/cmdline``: never pass a secret as an option (a key *file*'s
path is fine).

The two readers here stand in for the chunk reader in tests and serve raw images: :class:`RawFileReader`
reads a raw file (holes reported through ``SEEK_HOLE``); :class:`VerifiedRawReader` also checks every 4 MiB
chunk it reads against the sha256 chunk digests of a format-1 backup (``<disk>.chunks``) and raises
:class:`~vmsnap.errors.DamagedChunkError` on a mismatch — exactly what the chunk reader does with a chunk
that fails its check.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vmsnap.errors import DamagedChunkError, NotFoundError, UsageError, VmsnapError
from vmsnap.image.digest import ChunkDigests, chunk_offset_text, read_chunks_file, zero_digest
from vmsnap.image.geometry import CHUNK_SIZE


@runtime_checkable
class BlockReader(Protocol):
    """A read-only disk: its size and its bytes. Safe to call from several threads at once.

    ``pread`` returns exactly ``length`` bytes or raises (a short read, a damaged chunk, an unreachable
    store); the plugin turns any exception into EIO for that request only.
    """

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...


@runtime_checkable
class ExtentReader(BlockReader, Protocol):
    """A reader that also knows where its disk reads as zeros (NBD block status), cheaply."""

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, reads_as_zero) runs covering ``[offset, offset + length)`` (clipped to size)."""
        ...


ReaderFactory = Callable[..., BlockReader]


def load_factory(spec: str) -> ReaderFactory:
    """The callable named by ``module:attribute`` (e.g. ``vmsnap.image.readers:RawFileReader``).

    :raise UsageError: the import string is malformed, the module or attribute does not exist
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute.isidentifier():
        raise UsageError(
            f"reader {spec!r} is not module:callable", hint="e.g. vmsnap.image.readers:RawFileReader"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"reader module {module_name!r} cannot be imported: {err}") from err
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"reader {spec!r}: {module_name} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]


def open_reader(spec: str, options: dict[str, str]) -> BlockReader:
    """Build a reader from its import string and string options, and check it has a sane size.

    :raise UsageError: the factory cannot be found, or rejects the options
    :raise VmsnapError: the factory failed (missing backup, unreadable store …)
    """
    factory = load_factory(spec)
    try:
        reader = factory(**options)
    except TypeError as err:
        raise UsageError(f"reader {spec} rejects the options {sorted(options)}: {err}") from err
    if not isinstance(reader, BlockReader):
        raise UsageError(f"reader {spec} made {type(reader).__name__}, which has no size and pread")
    if reader.size < 0:
        raise VmsnapError(f"reader {spec} reports a negative size {reader.size}")
    return reader


def _check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EINVAL, f"read of {length} bytes at {offset} is outside the disk ({size} bytes)")


class RawFileReader:
    """A raw image file as a :class:`BlockReader` (opened read-only; holes found with ``SEEK_HOLE``).

    :param path: the raw image
    :raise NotFoundError: it does not exist
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFoundError(f"raw image {self.path} does not exist") from err
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``.

        :raise OSError: a short read (the file shrank) or an I/O error
        """
        _check_range(self._size, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read of {self.path} at {offset}: {len(data)} of {length} bytes")
        return data

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Data and hole runs from ``SEEK_DATA``/``SEEK_HOLE`` (everything data where unsupported)."""
        end = min(offset + length, self._size)
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only a hole up to the end of the file
                    yield pos, end - pos, True
                    return
                yield pos, end - pos, False
                return
            if data > pos:
                yield pos, min(data, end) - pos, True
                pos = min(data, end)
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            yield pos, min(hole, end) - pos, False
            pos = min(hole, end)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VerifiedRawReader:
    """A raw image whose every 4 MiB chunk is checked against format-1 chunk digests before it is served.

    Reads are chunk-aligned underneath; the last few verified chunks are kept (LRU), so a sequential reader
    hashes each chunk once. A chunk whose sha256 differs from its digest raises
    :class:`~vmsnap.errors.DamagedChunkError` on every read that touches it; other chunks stay readable.
    A chunk whose digest is the all-zero chunk's is reported as zero in :meth:`extents` and never read.

    :param path: the raw image (its size must be the digests' size)
    :param chunks: the ``<disk>.chunks`` file (32 bytes of sha256 per chunk)
    :param cache_chunks: verified chunks kept in memory
    :raise NotFoundError: the image does not exist
    :raise RepositoryError: the digests file is unreadable or does not fit the image's size
    """

    def __init__(
        self, path: str | os.PathLike[str], chunks: str | os.PathLike[str], cache_chunks: str = "8"
    ) -> None:
        self._raw = RawFileReader(path)
        self.path = self._raw.path
        self.digests: ChunkDigests = read_chunks_file(Path(chunks), self._raw.size)
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cache_max = max(1, int(cache_chunks))
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._raw.size

    def _chunk(self, index: int) -> bytes:
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
        start = index * CHUNK_SIZE
        data = self._raw.pread(start, min(CHUNK_SIZE, self.size - start))
        if hashlib.sha256(data).digest() != self.digests.chunk(index):
            raise DamagedChunkError(
                f"{chunk_offset_text(index)} of {self.path} does not match its sha256",
                hint="the backup is damaged there: run `vmsnap verify`; files elsewhere stay readable",
            )
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, every chunk they touch verified.

        :raise DamagedChunkError: a chunk in the range fails its check
        :raise OSError: the image cannot be read
        """
        _check_range(self.size, offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            index = pos // CHUNK_SIZE
            chunk = self._chunk(index)
            inner = pos - index * CHUNK_SIZE
            take = min(end - pos, len(chunk) - inner)
            out += chunk[inner : inner + take]
            pos += take
        return bytes(out)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Chunk-sized runs: zero where the chunk's digest is the all-zero chunk's."""
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            index = pos // CHUNK_SIZE
            chunk_end = min((index + 1) * CHUNK_SIZE, end)
            chunk_length = min(CHUNK_SIZE, self.size - index * CHUNK_SIZE)
            yield pos, chunk_end - pos, self.digests.chunk(index) == zero_digest(chunk_length)
            pos = chunk_end

    def close(self) -> None:
        """Close the image."""
        self._raw.close()


def reader_options(options: dict[str, Any]) -> dict[str, str]:
    """Reader options as the strings nbdkit passes (``key=value``), keys checked.

    :raise UsageError: a key nbdkit would misread or that the plugin reserves, or a value with a newline
    """
    out: dict[str, str] = {}
    for key, value in options.items():
        if not key.isidentifier() or key in RESERVED_KEYS:
            raise UsageError(
                f"reader option {key!r} is not a usable name", hint=f"not one of {RESERVED_KEYS}"
            )
        text = str(value)
        if "\n" in text or "\0" in text:
            raise UsageError(f"reader option {key!r} holds a newline or NUL")
        out[key] = text
    return out


RESERVED_KEYS = ("reader", "syspath", "log")
"""Plugin parameters that are not reader options."""
