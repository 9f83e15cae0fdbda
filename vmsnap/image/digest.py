r"""The repository's content digest ("sha256-4MiB-chunks"): an image's guest-visible content in 4 MiB chunks,
each chunk's sha256, and the disk's digest as the sha256 of those digests, with holes and changes cheap.

Definition (the last chunk is short when the virtual size is not a multiple of 4 MiB)::

    chunk i   = content[i * 4 MiB : min((i + 1) * 4 MiB, virtual_size)]
    digests   = sha256(chunk 0) || sha256(chunk 1) || …          32 raw bytes each: the ``<disk>.chunks`` file
    root      = sha256(digests), hex                            the manifest's ``sha256``

By hand: ``qemu-img convert -O raw IMAGE disk.raw; split -b 4M -d -a 8 disk.raw c.; sha256sum c.* |
cut -c1-64 | tr -d '\n' | tr a-f A-F | basenc --base16 -d | sha256sum``.

A chunk that reads as zeros is never read (its digest is a constant); other chunks are read and hashed in a
small thread pool (``os.preadv`` and hashlib release the GIL). Local qcow2/raw images are read straight from
their files where ``qemu-img map`` gives each data extent's layer and host offset; anything unusual
(compressed or encrypted clusters, external data files, internal snapshots) is read through a private
``qemu-nbd``. Given the digests of a backing file's content (``parent``), only the chunks that the image's
own top layer touches are read again: everything else reads as the parent does.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import functools
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, TransferError, UsageError
from vmsnap.image import qemu_img
from vmsnap.image.geometry import CHUNK_SIZE as CHUNK_SIZE
from vmsnap.image.geometry import Extent as Extent
from vmsnap.image.geometry import chunk_count as chunk_count
from vmsnap.image.geometry import chunk_length
from vmsnap.image.nbd import STATE_ZERO, QemuNbdServer, extents, libnbd, nbd_connection, nbd_sha256
from vmsnap.image.qcow2 import ChainMap, read_chain
from vmsnap.image.qemu_img import check_source
from vmsnap.model import ExportSource
from vmsnap.runner import LocalRunner, Runner

ALGORITHM = "sha256-4MiB-chunks"
"""The name the manifest gives this digest."""

DIGEST_SIZE = 32
_ZEROS = bytes(CHUNK_SIZE)
WORKERS = max(4, min(8, os.cpu_count() or 4))
"""Threads that read and hash chunks at once (more than the cores: reads from disk overlap the hashing)."""


@functools.lru_cache(maxsize=8)
def zero_digest(length: int = CHUNK_SIZE) -> bytes:
    """sha256 of ``length`` zero bytes (the digest of every chunk that reads as zeros)."""
    return hashlib.sha256(_ZEROS[:length]).digest()


@attrs.frozen
class ChunkDigests:
    """The chunk digests of one disk's content: ``digests`` is what ``<disk>.chunks`` holds.

    :param size: the virtual size they describe
    :param digests: 32 bytes per chunk, in order
    :raise ValueError: ``digests`` has the wrong length for ``size``
    """

    size: int
    digests: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if self.size < 0 or len(self.digests) != DIGEST_SIZE * chunk_count(self.size):
            raise ValueError(
                f"{len(self.digests)} bytes of chunk digests do not fit a disk of {self.size} bytes "
                f"({chunk_count(self.size)} chunks of {CHUNK_SIZE})"
            )

    @property
    def root(self) -> str:
        """The disk's digest, hex: sha256 of the concatenated chunk digests."""
        return hashlib.sha256(self.digests).hexdigest()

    def __len__(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def chunk(self, index: int) -> bytes:
        """The digest of chunk ``index``."""
        return self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def differing(self, other: ChunkDigests) -> list[int]:
        """The chunk indices where ``other`` (of the same size) differs."""
        if other.size != self.size:
            raise ValueError(f"sizes differ: {self.size} and {other.size}")
        return [i for i in range(len(self)) if self.chunk(i) != other.chunk(i)]

    @classmethod
    def zeros(cls, size: int) -> ChunkDigests:
        """The digests of an all-zero disk of ``size`` bytes."""
        count = chunk_count(size)
        body = zero_digest() * max(count - 1, 0)
        if count:
            body += zero_digest(chunk_length(count - 1, size))
        return cls(size, body)


def chunk_offset_text(index: int) -> str:
    """ "chunk 3 (offset 12 MiB)" — for messages."""
    return f"chunk {index} (offset {index * CHUNK_SIZE // (1024 * 1024)} MiB)"


def read_chunks_file(path: Path, size: int) -> ChunkDigests:
    """The chunk digests stored in ``path`` for a disk of ``size`` bytes.

    :raise RepositoryError: missing, unreadable, or of the wrong length
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RepositoryError(
            f"sha256 chunk digests {path} are unreadable: {err.strerror or err}",
            hint="the backup is damaged: run `vmsnap verify`, restore another backup or take a full one",
        ) from err
    try:
        return ChunkDigests(size, data)
    except ValueError as err:
        raise RepositoryError(
            f"sha256 chunk digests {path} are damaged: {err}",
            hint="the backup is damaged: run `vmsnap verify`, restore another backup or take a full one",
        ) from err


def write_chunks_file(path: Path, chunks: ChunkDigests) -> None:
    """Write ``chunks`` to ``path`` (0600, fsync'd; the caller renames the directory into place)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(chunks.digests)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ extent maps


@attrs.frozen
class ImageMap:
    """Every extent of an image's content, in order, and the files its data lives in."""

    size: int
    extents: tuple[Extent, ...]
    files: tuple[Path, ...]
    via_nbd: bool

    def top_chunks(self) -> set[int]:
        """Chunks that intersect an extent the image's top layer holds itself."""
        touched: set[int] = set()
        for extent in self.extents:
            if extent.top and extent.length:
                touched.update(range(extent.start // CHUNK_SIZE, (extent.end - 1) // CHUNK_SIZE + 1))
        return touched


def _nonzero_chunks(extents: Sequence[Extent]) -> Iterator[int]:
    """Chunks that intersect an extent that is not known to be zero, ascending, each once."""
    last = -1
    for extent in extents:
        if extent.zero or not extent.length:
            continue
        first = max(extent.start // CHUNK_SIZE, last + 1)
        final = (extent.end - 1) // CHUNK_SIZE
        yield from range(first, final + 1)
        last = max(last, final)


def qemu_img_map(
    path: Path,
    fmt: str,
    *,
    force_share: bool = False,
    block_device: bool = False,
    runner: Runner | None = None,
) -> ImageMap | None:
    """The image's content map from ``qemu-img map --output=json`` and its backing chain's files, or None
    when some data cannot be read straight from a local file (then read it through NBD).

    :raise CommandError: qemu-img could not open the image or its backing files
    """
    runner = runner or LocalRunner()
    chain = qemu_img.chain_info(runner, path, fmt=fmt, force_share=force_share)
    files: list[Path] = []
    for entry in chain:
        specific = (entry.get("format-specific") or {}).get("data") or {}
        if entry.get("encrypted") or specific.get("data-file") or entry.get("format") not in ("qcow2", "raw"):
            return None
        name = str(entry.get("filename", ""))
        if name.startswith("json:") or ":" in name.split("/", 1)[0]:
            return None
        file = Path(name)
        try:
            mode = file.stat().st_mode
        except OSError:
            return None
        if not (stat.S_ISREG(mode) or (block_device and stat.S_ISBLK(mode))):
            return None
        files.append(file)
    size = int(chain[0]["virtual-size"])
    found: list[Extent] = []
    for entry in qemu_img.map_entries(runner, path, fmt=fmt, force_share=force_share):
        start, length, depth = int(entry["start"]), int(entry["length"]), int(entry.get("depth", 0))
        top = depth == 0 and bool(entry.get("present", True))
        if entry.get("zero"):
            found.append(Extent(start, length, True, top=top))
        elif entry.get("data") and "offset" in entry and 0 <= depth < len(files):
            found.append(Extent(start, length, False, depth, int(entry["offset"]), top=top))
        else:  # a compressed cluster, or content qemu-img cannot place in a file
            return None
    if _gaps(found, size):
        return None
    return ImageMap(size, tuple(found), tuple(files), via_nbd=False)


def overlay_map(path: Path) -> ImageMap | None:
    """The map of only the chunks an overlay's own clusters touch, from the qcow2 tables of its chain (no
    QEMU, O(changed data)), or None when the chain is not plain enough for :mod:`vmsnap.image.qcow2`."""
    layers = read_chain(path)
    if layers is None or len(layers) < 2:
        return None
    size = layers[0].size
    try:
        chain = ChainMap(layers)
    except OSError:
        return None
    with chain:
        allocated = chain.allocated(0)
        if allocated is None:
            return None
        touched = sorted(
            {
                i
                for start, length in allocated
                for i in range(start // CHUNK_SIZE, (start + length - 1) // CHUNK_SIZE + 1)
            }
        )
        found: list[Extent] = []
        for first, last in _runs_of(touched):
            placed = chain.place(first * CHUNK_SIZE, min((last + 1) * CHUNK_SIZE, size))
            if placed is None:
                return None
            found += [attrs.evolve(p, top=True) for p in placed]
    return ImageMap(size, tuple(found), tuple(layer.path for layer in layers), via_nbd=False)


def _runs_of(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, last) of each run of consecutive numbers in sorted ``indices``."""
    start = previous = None
    for index in indices:
        if previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None and previous is not None:
            yield start, previous
        start = previous = index
    if start is not None and previous is not None:
        yield start, previous


def _gaps(found: Sequence[Extent], size: int) -> bool:
    position = 0
    for extent in found:
        if extent.start != position:
            return True
        position = extent.end
    return position != size


def nbd_map(handle: Any) -> ImageMap:
    """The content map of an NBD export (base:allocation): zero extents, the rest read over NBD."""
    size = int(handle.get_size())
    found = [
        Extent(offset, length, bool(flags & STATE_ZERO))
        for offset, length, flags in extents(handle, "base:allocation", end=size)
    ]
    return ImageMap(size, tuple(found), (), via_nbd=True)


# ---------------------------------------------------------------------------------------------- hashing


class _Hasher:
    """Reads and hashes chunks of one image map: one thread-local buffer (and NBD handle) per worker."""

    def __init__(self, image_map: ImageMap, nbd_uri: str | None) -> None:
        self.map = image_map
        self.starts = [e.start for e in image_map.extents]
        self.nbd_uri = nbd_uri
        self.local = threading.local()
        self.fds: list[int] = []
        self.handles: list[contextlib.ExitStack] = []
        self.lock = threading.Lock()

    def __enter__(self) -> _Hasher:
        try:
            for file in self.map.files:
                self.fds.append(os.open(file, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as err:
            self.close()
            raise TransferError(f"cannot open {err.filename}: {err.strerror}") from err
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        for stack in self.handles:
            stack.close()
        self.handles.clear()

    def _buffer(self) -> memoryview:
        view: memoryview | None = getattr(self.local, "view", None)
        if view is None:
            view = memoryview(bytearray(CHUNK_SIZE))
            self.local.view = view
        return view

    def _nbd_handle(self) -> Any:
        handle = getattr(self.local, "handle", None)
        if handle is None:
            assert self.nbd_uri is not None
            stack = contextlib.ExitStack()
            handle = stack.enter_context(nbd_connection(self.nbd_uri))
            with self.lock:
                self.handles.append(stack)
            self.local.handle = handle
        return handle

    def digest(self, index: int) -> bytes:
        """sha256 of chunk ``index``."""
        size = self.map.size
        start = index * CHUNK_SIZE
        end = min(start + CHUNK_SIZE, size)
        view = self._buffer()[: end - start]
        extents = self.map.extents
        i = bisect.bisect_right(self.starts, start) - 1
        while i < len(extents) and extents[i].start < end:
            extent = extents[i]
            i += 1
            lo, hi = max(extent.start, start), min(extent.end, end)
            if hi <= lo:
                continue
            piece = view[lo - start : hi - start]
            if extent.zero:
                piece[:] = _ZEROS[: hi - lo]
            elif extent.layer >= 0:
                self.pread_into(extent.layer, piece, extent.host_offset + (lo - extent.start))
            else:
                piece[:] = self._nbd_read(hi - lo, lo)
        return hashlib.sha256(view).digest()

    def pread_into(self, layer: int, piece: memoryview, offset: int) -> None:
        fd = self.fds[layer]
        while piece:
            got = os.preadv(fd, [piece], offset)
            if got <= 0:
                raise TransferError(
                    f"{self.map.files[layer]} ends at {offset}, before data qemu-img map places there",
                    hint="the image is truncated or damaged",
                )
            piece, offset = piece[got:], offset + got

    def _nbd_read(self, length: int, offset: int) -> bytes:
        nbd = libnbd()
        try:
            return bytes(self._nbd_handle().pread(length, offset))
        except nbd.Error as err:
            raise TransferError(
                f"NBD read of {length} bytes at offset {offset} failed: {err.string}"
            ) from err


def hash_chunks(
    image_map: ImageMap,
    *,
    parent: ChunkDigests | None = None,
    nbd_uri: str | None = None,
    workers: int = WORKERS,
    progress: Callable[[int, int], None] | None = None,
) -> ChunkDigests:
    """The chunk digests of the content ``image_map`` describes.

    :param parent: the digests of the backing file's content: only chunks the top layer touches are read
    :param nbd_uri: where extents without a file are read (maps from :func:`nbd_map`)
    :param progress: called with (chunks done, chunks to hash)
    :raise TransferError: a read failed
    """
    size = image_map.size
    if parent is not None and parent.size != size:
        raise UsageError(f"the parent's digests cover {parent.size} bytes, the image has {size}")
    if parent is not None and (image_map.via_nbd or len(image_map.files) < 2):
        raise UsageError(
            "reusing a parent's chunk digests needs an image with a backing file, mapped by qemu-img map"
        )
    digests = bytearray((parent or ChunkDigests.zeros(size)).digests)
    wanted: set[int] | None = None
    if parent is not None:
        wanted = image_map.top_chunks()
        for index in wanted:  # a touched chunk that is zeros now must not keep the parent's digest
            digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = zero_digest(chunk_length(index, size))
    todo = [i for i in _nonzero_chunks(image_map.extents) if wanted is None or i in wanted]
    with _Hasher(image_map, nbd_uri) as hasher:
        for done, (index, digest) in enumerate(_parallel(hasher.digest, todo, workers), 1):
            digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
            if progress is not None:
                progress(done, len(todo))
    return ChunkDigests(size, bytes(digests))


def _parallel(
    work: Callable[[int], bytes], indices: Sequence[int], workers: int
) -> Iterator[tuple[int, bytes]]:
    """(index, work(index)) for every index, computed ``workers`` at a time, in order; at most a bounded
    number of results wait, so a huge disk does not queue a future per chunk up front."""
    if workers <= 1 or len(indices) <= 1:
        for index in indices:
            yield index, work(index)
        return
    window = workers * 4
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmsnap-hash") as pool:
        pending: list[tuple[int, concurrent.futures.Future[bytes]]] = []
        try:
            for index in indices:
                pending.append((index, pool.submit(work, index)))
                if len(pending) >= window:
                    first, future = pending.pop(0)
                    yield first, future.result()
            for first, future in pending:
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


# ------------------------------------------------------------------------------------------ front doors


def image_chunks(
    path: str | Path,
    format: str = "qcow2",
    *,
    parent: ChunkDigests | None = None,
    image_opts: Mapping[str, str] | None = None,
    force_share: bool = False,
    block_device: bool = False,
    workers: int = WORKERS,
    runner: Runner | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ChunkDigests:
    """The chunk digests of an image's GUEST-VISIBLE content (backing files resolved, holes as zeros).

    Read straight from the image's files where qemu-img map places every data extent in one; else through
    a private read-only qemu-nbd.

    :param parent: the digests of the image's backing file's content: only the chunks the image's own top
        layer touches are read (an incremental backup); the rest are taken from ``parent``. Ignored (every
        chunk is read) when the image must be read through qemu-nbd.
    :param image_opts: e.g. ``{"snapshot.name": "s1"}`` (read through qemu-nbd)
    :param force_share: read an image a running QEMU holds
    :param progress: called with (chunks hashed, chunks to hash) as the work goes on
    :raise NotFoundError: the image does not exist
    :raise UsageError: an unsupported format, or a ``parent`` of another size or for an image without a
        backing file
    :raise CommandError: qemu-img cannot open the image or its chain
    :raise TransferError: a read failed
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"unsupported image format {format!r}", hint="use 'qcow2' or 'raw'")
    runner = runner or LocalRunner()
    path = Path(path).absolute()
    if not path.exists():
        raise NotFoundError(f"image {path} does not exist", hint="check the path")
    if parent is not None and not image_opts and not force_share and format == "qcow2":
        changes = overlay_map(path)
        if changes is not None and changes.size == parent.size:
            return hash_chunks(changes, parent=parent, workers=workers, progress=progress)
    if not image_opts:
        image_map = qemu_img_map(
            path, format, force_share=force_share, block_device=block_device, runner=runner
        )
        if image_map is not None:
            return hash_chunks(image_map, parent=parent, workers=workers, progress=progress)
    server = QemuNbdServer(
        path,
        format,
        image_opts=dict(image_opts or {}),
        force_share=force_share,
        block_device=block_device,
        runner=runner,
    )
    with server:
        return uri_chunks(server.uri, workers=workers, progress=progress)


def uri_chunks(
    uri: str, *, workers: int = WORKERS, progress: Callable[[int, int], None] | None = None
) -> ChunkDigests:
    """The chunk digests of an NBD export's content (one connection per worker)."""
    # the first connection stays open while the workers read: a private qemu-nbd exits with its last client
    with nbd_connection(uri, contexts=["base:allocation"]) as handle:
        image_map = nbd_map(handle)
        # qemu-nbd --shared=8
        return hash_chunks(image_map, nbd_uri=uri, workers=min(workers, 7), progress=progress)


def plain_sha256(
    path: str | Path,
    format: str = "qcow2",
    *,
    force_share: bool = False,
    block_device: bool = False,
    runner: Runner | None = None,
) -> str | None:
    """The plain sha256 of an image's guest-visible content read straight from its files (holes hashed from
    a zero buffer, never read), or None when qemu-img map cannot place every data extent in a file.

    :raise CommandError: qemu-img cannot open the image
    :raise TransferError: a read failed
    """
    image_map = qemu_img_map(
        Path(path).absolute(), format, force_share=force_share, block_device=block_device, runner=runner
    )
    if image_map is None:
        return None
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK_SIZE))
    with _Hasher(image_map, None) as reader:
        for extent in image_map.extents:
            position = extent.start
            while position < extent.end:
                step = min(CHUNK_SIZE, extent.end - position)
                if extent.zero:
                    digest.update(_ZEROS[:step])
                else:
                    host = extent.host_offset + position - extent.start
                    reader.pread_into(extent.layer, buffer[:step], host)
                    digest.update(buffer[:step])
                position += step
    return digest.hexdigest()


def guest_sha256(
    path: str | Path,
    format: str,
    *,
    image_opts: Mapping[str, str] | None = None,
    force_share: bool = False,
    block_device: bool = False,
    runner: Runner | None = None,
) -> str:
    """sha256 of an image's GUEST-VISIBLE content: its whole virtual size, backing files resolved, holes read
    as zeros (hashed from a shared zero buffer, never read). A qcow2 and its raw conversion, or a chain and
    its flattened copy, give the same digest. Read straight from the image's files where ``qemu-img map``
    places every data extent (see :mod:`vmsnap.image.digest`), else through a private qemu-nbd.

    :param path: image file (or block device)
    :param format: "qcow2" or "raw"
    :param image_opts: e.g. ``{"snapshot.name": "s1"}`` to hash an internal snapshot
    :param force_share: read an image a running QEMU holds
    :raise NotFoundError: the image does not exist
    :raise TransferError: qemu-nbd could not open it, or a read failed
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"unsupported image format {format!r}", hint="use 'qcow2' or 'raw'")
    if not image_opts and Path(path).exists():
        direct = plain_sha256(path, format, force_share=force_share, block_device=block_device, runner=runner)
        if direct is not None:
            return direct
    server = QemuNbdServer(
        Path(path),
        format,
        image_opts=dict(image_opts or {}),
        force_share=force_share,
        block_device=block_device,
        runner=runner or LocalRunner(),
    )
    with server:
        return nbd_sha256(server.uri)


def source_sha256(source: ExportSource, *, runner: Runner | None = None) -> str:
    """:func:`guest_sha256` of any :class:`ExportSource` ("nbd" ones are read directly)."""
    check_source(source)
    if source.kind == "nbd":
        return nbd_sha256(source.location)
    with QemuNbdServer.for_source(attrs.evolve(source, dirty_bitmap=None), runner=runner) as server:
        return nbd_sha256(server.uri)
