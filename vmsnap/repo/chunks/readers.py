"""Sources the backup pipeline reads: an NBD export (several connections, block status, dirty bitmaps) or a
raw file / block device (``SEEK_DATA``/``SEEK_HOLE``, ``os.pread``); qcow2 images are served by qemu-nbd.

A reader says how big the disk is, which extents read as zeros (never read), which chunks a dirty bitmap
marks, and reads ranges from any thread. It counts what it read, so callers can prove what was not read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vmsnap.errors import NotFoundError, TransferError, UsageError
from vmsnap.image.geometry import Extent as Extent
from vmsnap.image.nbd import DIRTY, STATE_ZERO, QemuNbdServer, extents, nbd_connection, pread
from vmsnap.image.readers import BlockReader, ExtentReader
from vmsnap.model import ExportSource
from vmsnap.runner import LocalRunner, Runner

DEFAULT_CONNECTIONS = 4
REQUEST_SIZE = 1024 * 1024
"""Bytes per NBD read request: a chunk's read is split into requests of this size, all in flight at once on
the worker's connection. Measured serving a 1.5 GiB backup, QEMU's export spent 0.66-0.71 CPU s on 1 MiB
requests against 0.93-1.42 s on 4 MiB ones (its NBD server allocates a buffer per request, and glibc maps and
faults in a fresh one for each 4 MiB request; see docs/performance.md)."""
QEMU_NBD_CLIENTS = 8
"""Clients a :class:`~vmsnap.image.io.QemuNbdServer` accepts (``--shared=8``); more are never opened."""


@runtime_checkable
class SourceReader(Protocol):
    """What the pipeline reads from; ``read`` may be called from several threads at once."""

    @property
    def size(self) -> int:
        """The disk's guest-visible size in bytes."""
        ...

    @property
    def parallel_reads(self) -> int:
        """How many reads may usefully run at once (connections)."""
        ...

    @property
    def bytes_read(self) -> int:
        """Bytes :meth:`read` returned so far."""
        ...

    def extents(self) -> Iterator[Extent]:
        """Extents covering ``[0, size)`` in order, adjacent, none empty."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``.

        :raise TransferError: the read failed
        """
        ...

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` (writable, contiguous) with the bytes at ``offset``: no allocation per read.

        :raise TransferError: the read failed
        """
        ...


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.total += count


def changed_chunks(dirty: Iterator[tuple[int, int]], chunk_size: int) -> frozenset[int]:
    """Indices of the chunks that the (offset, length) ranges touch."""
    found: set[int] = set()
    for offset, length in dirty:
        if length > 0:
            found.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return frozenset(found)


class NbdReader:
    """Reads an NBD export over ``connections`` libnbd connections (one read at a time each).

    All connections open at once and stay open until :meth:`close` (a qemu-nbd started without
    ``--persistent`` exits when its last client leaves). A context manager.

    :param uri: the export's NBD URI
    :param connections: how many connections (and reads in flight)
    :param dirty_bitmap_context: ``qemu:dirty-bitmap:NAME`` to ask for, for :meth:`dirty_chunks`
    :raise UsageError: ``connections`` < 1, or a malformed bitmap context
    :raise TransferError: a connection failed
    """

    def __init__(
        self,
        uri: str,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        dirty_bitmap_context: str | None = None,
        request_size: int = REQUEST_SIZE,
    ) -> None:
        if connections < 1:
            raise UsageError(f"{connections} NBD connections", hint="use at least 1")
        if request_size < 4096 or request_size % 4096:
            raise UsageError(f"NBD requests of {request_size} bytes", hint="use a multiple of 4096")
        self.request_size = request_size
        if dirty_bitmap_context is not None and not dirty_bitmap_context.startswith("qemu:dirty-bitmap:"):
            raise UsageError(
                f"{dirty_bitmap_context!r} is not a dirty bitmap context",
                hint="use qemu:dirty-bitmap:NAME",
            )
        self.uri = uri
        self.dirty_bitmap_context = dirty_bitmap_context
        contexts = ["base:allocation"] + ([dirty_bitmap_context] if dirty_bitmap_context else [])
        self._stack = contextlib.ExitStack()
        self._handles: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._counter = _Counter()
        self._connections = connections
        try:
            for _ in range(connections):
                handle = self._stack.enter_context(nbd_connection(uri, contexts=contexts))
                handle.set_pread_initialize(False)  # a read fills the buffer or fails: no memset first
                self._handles.put(handle)
            with self._handle() as handle:
                self._size = int(handle.get_size())
        except BaseException:
            self._stack.close()
            raise

    @contextlib.contextmanager
    def _handle(self) -> Iterator[Any]:
        handle = self._handles.get()
        try:
            yield handle
        finally:
            self._handles.put(handle)

    @property
    def size(self) -> int:
        return self._size

    @property
    def parallel_reads(self) -> int:
        return self._connections

    @property
    def bytes_read(self) -> int:
        return self._counter.total

    def extents(self) -> Iterator[Extent]:
        """``base:allocation`` extents (the whole disk as data when the server does not report it)."""
        with self._handle() as handle:
            spans = list(extents(handle, "base:allocation"))
        for offset, length, flags in spans:
            yield Extent(offset, length, bool(flags & STATE_ZERO))

    def dirty_chunks(self, chunk_size: int) -> frozenset[int]:
        """The chunks the dirty bitmap marks as changed.

        :raise UsageError: no dirty bitmap context was asked for
        :raise TransferError: the server does not export that bitmap (never read as "nothing changed")
        """
        context = self.dirty_bitmap_context
        if context is None:
            raise UsageError("this NBD reader was opened without a dirty bitmap context")
        with self._handle() as handle:
            if not handle.can_meta_context(context):
                raise TransferError(
                    f"NBD export {self.uri} does not offer {context}",
                    hint="export the bitmap (qemu-nbd --bitmap=NAME, or nbd-server-add bitmap), "
                    "or take a full backup",
                )
            dirty = [(o, n) for o, n, flags in extents(handle, context) if flags & DIRTY]
        return changed_chunks(iter(dirty), chunk_size)

    def read(self, offset: int, length: int) -> bytes:
        with self._handle() as handle:
            data = pread(handle, length, offset)
        self._counter.add(len(data))
        return data

    def read_into(self, offset: int, buffer: memoryview) -> None:
        import nbd  # present: nbd_connection imported it

        step = self.request_size
        with self._handle() as handle:
            try:  # aio_preads into the caller's buffer, all in flight, waited for on this connection
                cookies = [
                    handle.aio_pread(nbd.Buffer.from_buffer(buffer[pos : pos + step]), offset + pos)
                    for pos in range(0, len(buffer), step)
                ]
                for cookie in cookies:
                    while not handle.aio_command_completed(cookie):
                        handle.poll(-1)
            except nbd.Error as err:
                raise TransferError(
                    f"NBD read of {len(buffer)} bytes at offset {offset} failed: {err.string}"
                ) from err
        self._counter.add(len(buffer))

    def close(self) -> None:
        """Close every connection."""
        self._stack.close()

    def __enter__(self) -> NbdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileReader:
    """Reads a raw image file or a block device with ``os.pread``; holes found with SEEK_DATA/SEEK_HOLE.

    :param path: the file or device
    :param parallel_reads: reads to run at once
    :raise NotFoundError: it does not exist
    :raise TransferError: it cannot be opened, or is neither a regular file nor a block device
    """

    def __init__(self, path: Path, *, parallel_reads: int = DEFAULT_CONNECTIONS) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise NotFoundError(f"source image {path} does not exist", hint="check the path") from err
        except OSError as err:
            raise TransferError(f"cannot open source image {path}: {err.strerror or err}") from err
        mode = os.fstat(self._fd).st_mode
        self.block_device = stat.S_ISBLK(mode)
        if not (self.block_device or stat.S_ISREG(mode)):
            os.close(self._fd)
            raise TransferError(f"{path} is neither a regular file nor a block device", hint="pass an image")
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._parallel = max(1, parallel_reads)
        self._counter = _Counter()

    @property
    def size(self) -> int:
        return self._size

    @property
    def parallel_reads(self) -> int:
        return self._parallel

    @property
    def bytes_read(self) -> int:
        return self._counter.total

    def extents(self) -> Iterator[Extent]:
        """Data and hole extents (a block device, or a filesystem without SEEK_DATA, is all data)."""
        pos, end = 0, self._size
        while pos < end:
            data = self._seek(pos, os.SEEK_DATA)
            if data is None or data >= end:
                yield Extent(pos, end - pos, True)
                return
            if data > pos:
                yield Extent(pos, data - pos, True)
            hole = self._seek(data, os.SEEK_HOLE)
            hole = end if hole is None else min(hole, end)
            yield Extent(data, hole - data, False)
            pos = hole

    def _seek(self, offset: int, whence: int) -> int | None:
        try:
            return os.lseek(self._fd, offset, whence)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return None  # no data (or hole) at or after offset
            if err.errno == errno.EINVAL:
                return offset if whence == os.SEEK_DATA else self._size  # no SEEK_DATA support: all data
            raise TransferError(f"cannot map {self.path}: {err.strerror or err}") from err

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
            while len(data) < length:  # short reads are legal; only EOF ends them
                more = os.pread(self._fd, length - len(data), offset + len(data))
                if not more:
                    raise TransferError(f"{self.path} ended at {offset + len(data)}, inside its size")
                data += more
        except OSError as err:
            raise TransferError(f"read of {length} bytes at {offset} of {self.path} failed: {err}") from err
        self._counter.add(len(data))
        return data

    def read_into(self, offset: int, buffer: memoryview) -> None:
        done = 0
        try:
            while done < len(buffer):
                got = os.preadv(self._fd, [buffer[done:]], offset + done)
                if not got:
                    raise TransferError(f"{self.path} ended at {offset + done}, inside its size")
                done += got
        except OSError as err:
            raise TransferError(
                f"read of {len(buffer)} bytes at {offset} of {self.path} failed: {err}"
            ) from err
        self._counter.add(done)

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockSourceReader:
    """A :class:`~vmsnap.image.readers.BlockReader` (what a layout's reader source builds, e.g. a backup disk
    of another repository, each chunk checked as it is read) as a :class:`SourceReader` for the pipeline:
    its zero runs where it knows them (an :class:`~vmsnap.image.readers.ExtentReader`), else all data.

    :param reader: the block reader (thread-safe, as every block reader is)
    :param parallel_reads: reads the pipeline may run at once
    """

    def __init__(self, reader: BlockReader, *, parallel_reads: int = DEFAULT_CONNECTIONS) -> None:
        self._reader = reader
        self._parallel = parallel_reads
        self._counter = _Counter()

    @property
    def size(self) -> int:
        return self._reader.size

    @property
    def parallel_reads(self) -> int:
        return self._parallel

    @property
    def bytes_read(self) -> int:
        return self._counter.total

    def extents(self) -> Iterator[Extent]:
        if not isinstance(self._reader, ExtentReader):
            if self.size:
                yield Extent(0, self.size, False)
            return
        for offset, length, zero in self._reader.extents(0, self.size):
            if length:
                yield Extent(offset, length, zero)

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = self._reader.pread(offset, length)
        except OSError as err:
            raise TransferError(f"reading {length} bytes at {offset} failed: {err}") from err
        self._counter.add(len(data))
        return data

    def read_into(self, offset: int, buffer: memoryview) -> None:
        buffer[:] = self.read(offset, len(buffer))


@contextlib.contextmanager
def open_image(
    path: Path,
    format: str,
    *,
    connections: int = DEFAULT_CONNECTIONS,
    bitmap: str | None = None,
    force_share: bool = False,
    runner: Runner | None = None,
) -> Iterator[FileReader | NbdReader]:
    """A reader for an image file: raw files and devices directly, qcow2 (or a bitmap) through a qemu-nbd.

    :param path: the image file or block device
    :param format: "raw" or "qcow2"
    :param connections: NBD connections (qcow2), or parallel reads (raw)
    :param bitmap: a persistent dirty bitmap of the image to expose (qcow2), for ``dirty_chunks``
    :param force_share: open an image a running QEMU holds (qcow2)
    :raise UsageError: an unknown format
    :raise NotFoundError: the image does not exist
    :raise TransferError: qemu-nbd or the reads failed
    """
    if format not in ("raw", "qcow2"):
        raise UsageError(f"unsupported image format {format!r}", hint="use 'raw' or 'qcow2'")
    if format == "raw" and bitmap is None and not force_share:
        with FileReader(path, parallel_reads=connections) as reader:
            yield reader
        return
    mode = os.stat(path).st_mode if Path(path).exists() else 0
    server = QemuNbdServer(
        Path(path),
        format,
        bitmap=bitmap,
        force_share=force_share,
        block_device=stat.S_ISBLK(mode),
        runner=runner or LocalRunner(),
    )
    context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
    connections = min(connections, QEMU_NBD_CLIENTS)
    with server, NbdReader(server.uri, connections=connections, dirty_bitmap_context=context) as nbd_reader:
        yield nbd_reader


@contextlib.contextmanager
def open_source(
    source: ExportSource, *, connections: int = DEFAULT_CONNECTIONS, runner: Runner | None = None
) -> Iterator[FileReader | NbdReader]:
    """A reader for a strategy's :class:`~vmsnap.model.ExportSource` (with its dirty bitmap, if any).

    :raise NotFoundError: the file or device does not exist
    :raise TransferError: qemu-nbd, the connection or the reads failed
    """
    bitmap = source.dirty_bitmap
    if bitmap is not None and not bitmap.startswith("qemu:dirty-bitmap:"):
        bitmap = f"qemu:dirty-bitmap:{bitmap}"
    if source.kind == "nbd":
        with NbdReader(source.location, connections=connections, dirty_bitmap_context=bitmap) as reader:
            yield reader
        return
    if (
        source.format == "raw"
        and not source.image_opts
        and not source.force_share
        and not source.dirty_bitmap
    ):
        with FileReader(Path(source.location), parallel_reads=connections) as file_reader:
            yield file_reader
        return
    with (
        QemuNbdServer.for_source(source, runner=runner) as server,
        NbdReader(
            server.uri, connections=min(connections, QEMU_NBD_CLIENTS), dirty_bitmap_context=bitmap
        ) as nbd_reader,
    ):
        yield nbd_reader
