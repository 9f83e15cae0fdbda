"""An independent reader of qcow2 chains for ``verify``: libqcow (``pyqcow``, the optional ``qcow`` extra)
reads the data, so that one bug cannot hide in both the writer (QEMU) and the checker."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from pathlib import Path
from typing import Any

from vmsnap.errors import RepositoryError, UsageError
from vmsnap.image.digest import DIGEST_SIZE, ChunkDigests
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.image.qcow2 import cluster_states, read_header


def available() -> bool:
    """True when pyqcow can be imported."""
    try:
        import pyqcow  # noqa: F401
    except ImportError:
        return False
    return True


def _backing(image: Path) -> str | None:
    try:
        return read_header(image).backing_file
    except (OSError, ValueError) as err:
        raise RepositoryError(f"cannot read {image}: {err}", hint="the backup is damaged") from err


def _states(image: Path) -> tuple[int, dict[int, str]]:
    try:
        return cluster_states(image)
    except ValueError as err:
        raise RepositoryError(str(err), hint="use --reader qemu") from err


def libqcow_chunks(image: Path, *, parent: ChunkDigests | None = None) -> ChunkDigests:
    """The chunk digests (:mod:`vmsnap.image.digest`) of a qcow2 chain's guest-visible content, read with
    libqcow (pyqcow): an independent reader for ``verify``. Chunks without a data cluster in any layer are
    not read; with ``parent`` (the digests of the backing file's content, of the same size) only the chunks
    the image's own layer holds clusters of are read, the others are the parent's.

    libqcow reads each file's data; which file serves each cluster comes from vmsnap's own L2-table parse,
    because libqcow (as of 20260703) reads a zero-flagged cluster of an overlay from its backing file.

    :raise RepositoryError: a backing file is missing, a file is not qcow2, or a read fell short
    :raise UsageError: pyqcow is not installed
    """
    try:
        import pyqcow
    except ImportError as err:
        raise UsageError("reading with libqcow needs pyqcow", hint="pip install 'vmsnap[qcow]'") from err
    layers: list[Path] = []
    current: Path | None = image
    while current is not None:
        if not current.is_file():
            raise RepositoryError(f"backing file {current} is missing", hint="the chain is broken")
        if len(layers) > 256 or current in layers:
            raise RepositoryError(f"the backing chain of {image} loops or is too long")
        layers.append(current)
        backing = _backing(current)
        current = (current.parent / backing) if backing is not None else None
    maps = [_states(layer) for layer in layers]
    cluster = maps[0][0]
    if any(m[0] != cluster for m in maps) or CHUNK_SIZE % cluster:
        raise RepositoryError(
            f"{image}: the libqcow reader needs one cluster size (at most 4 MiB) along a chain",
            hint="use --reader qemu",
        )
    per_chunk = CHUNK_SIZE // cluster
    files = []
    try:
        for layer in layers:
            handle = pyqcow.file()
            handle.open(str(layer))
            files.append(handle)
        for child, below in itertools.pairwise(files):
            child.set_parent(below)  # libqcow refuses to read an overlay without its parent
        size = int(files[0].get_media_size())
        zeros = ChunkDigests.zeros(size)
        if parent is not None and (parent.size != size or len(layers) < 2):
            parent = None
        digests = bytearray((parent or zeros).digests)
        with_data = {index // per_chunk for m in maps for index, state in m[1].items() if state == "data"}
        if parent is not None:
            touched = {index // per_chunk for index in maps[0][1]}
            for chunk in touched & set(range(len(zeros))):  # zeros unless data is found below
                digests[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE] = zeros.chunk(chunk)
            with_data &= touched
        for chunk in sorted(with_data):
            start = chunk * CHUNK_SIZE
            if start >= size:
                continue
            content = _read_chunk(files, maps, chunk, per_chunk, cluster, size, image)
            digests[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE] = hashlib.sha256(content).digest()
        return ChunkDigests(size, bytes(digests))
    except OSError as err:
        raise RepositoryError(f"libqcow cannot read {image}: {err}", hint="the backup is damaged") from err
    finally:
        for handle in files:
            with contextlib.suppress(Exception):
                handle.close()


def _read_chunk(
    files: list[Any],
    maps: list[tuple[int, dict[int, str]]],
    chunk: int,
    per_chunk: int,
    cluster: int,
    size: int,
    image: Path,
) -> bytes:
    """The guest content of chunk ``chunk``: each cluster from the first layer that holds it (zeros when a
    layer marks it zero or none holds it).

    :raise RepositoryError: libqcow read short
    """
    content = bytearray()
    for index in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        offset = index * cluster
        if offset >= size:
            break
        length = min(cluster, size - offset)
        data = bytes(length)
        for handle, layer_map in zip(files, maps, strict=True):
            state = layer_map[1].get(index)
            if state == "zero":
                break
            if state == "data":
                data = handle.read_buffer_at_offset(length, offset)
                if len(data) != length:
                    raise RepositoryError(
                        f"libqcow read {len(data)} of {length} bytes at {offset} of {image}"
                    )
                break
        content += data
    return bytes(content)
