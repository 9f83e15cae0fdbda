"""The one qcow2 reader: header facts (virtual size, backing link), and L1/L2 lookups of plain images, so that
an incremental backup's changed chunks are found and placed in its chain's files without QEMU, and an
independent reader (:mod:`vmsnap.image.libqcow`) knows which file serves each cluster.

Only what QEMU writes for vmsnap's own backups is understood: qcow2 v2/v3 with standard L2 entries, no
encryption, no external data file, no extended L2, not marked dirty or corrupt; backing files that are
qcow2 of the same kind or raw. Anything else (and any compressed cluster in the ranges asked for) makes
these functions answer None, and the caller asks QEMU instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import attrs

from vmsnap.image.geometry import Extent

MAGIC = b"QFI\xfb"
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COMPRESSED = 1 << 62
_ZERO_FLAG = 1
_COMPRESSION_TYPE_BIT = 1 << 3  # only matters for compressed clusters, which are refused anyway
_EXT_BACKING_FORMAT = 0xE2792ACA
_MAX_CHAIN = 256


@attrs.frozen
class Layer:
    """One file of a backing chain: a plain qcow2 (with its L1 table) or a raw file (``l1`` empty)."""

    path: Path
    size: int
    raw: bool
    cluster_bits: int = 16
    zero_flag: bool = False
    l1: tuple[int, ...] = ()
    backing: Path | None = None
    backing_raw: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


@attrs.frozen
class Header:
    """The facts of a qcow2 header every caller may want, read without QEMU.

    :param backing_file: the backing file name exactly as written (relative or absolute), or None
    """

    version: int
    virtual_size: int
    cluster_bits: int
    backing_file: str | None
    incompatible_features: int


def read_header(path: Path) -> Header:
    """The header of qcow2 image ``path``.

    :raise ValueError: not a qcow2 image, or a malformed header (the message says which)
    :raise OSError: the file cannot be read
    """
    with open(path, "rb") as f:
        header = f.read(112)
        if len(header) < 72 or header[:4] != MAGIC:
            raise ValueError(f"{path} is not a qcow2 image")
        version, backing_offset, backing_size, cluster_bits, size = struct.unpack(">IQIIQ", header[4:32])
        incompatible = struct.unpack(">Q", header[72:80])[0] if version >= 3 and len(header) >= 80 else 0
        backing: str | None = None
        if backing_offset and backing_size:
            if backing_size > 1023:
                raise ValueError(f"{path} has a malformed backing file name")
            f.seek(backing_offset)
            backing = f.read(backing_size).decode("utf-8", errors="replace")
    return Header(version, size, cluster_bits, backing, incompatible)


def cluster_states(path: Path) -> tuple[int, dict[int, str]]:
    """(cluster size, cluster index → "data" | "zero") of one qcow2 file's own L2 tables; clusters not in the
    map fall through to the backing file. Compressed clusters count as "data".

    :raise ValueError: not a qcow2, or it uses features this reader does not know (external data, extended
        L2 entries …)
    :raise OSError: a read failed
    """
    header = read_header(path)
    if header.incompatible_features & ~0b11:  # anything beyond "dirty" and "corrupt"
        raise ValueError(f"{path} uses qcow2 features vmsnap's reader does not know")
    with open(path, "rb") as f:
        raw = f.read(48)
        l1_size, l1_offset = struct.unpack(">IQ", raw[36:48])
        cluster_size = 1 << header.cluster_bits
        l2_entries = cluster_size // 8
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        states: dict[int, str] = {}
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & _OFFSET_MASK
            if not l2_offset:
                continue
            f.seek(l2_offset)
            l2 = struct.unpack(f">{l2_entries}Q", f.read(cluster_size))
            for l2_index, entry in enumerate(l2):
                if not entry:
                    continue
                compressed = bool(entry & _COMPRESSED)
                if not compressed and header.version >= 3 and entry & _ZERO_FLAG:
                    state = "zero"
                elif compressed or entry & _OFFSET_MASK:
                    state = "data"
                else:
                    continue
                states[l1_index * l2_entries + l2_index] = state
    return cluster_size, states


def _pread_exact(fd: int, length: int, offset: int) -> bytes | None:
    data = os.pread(fd, length, offset)
    return data if len(data) == length else None


def read_layer(path: Path) -> Layer | None:
    """The qcow2 metadata of ``path``, or None when it is not a plain qcow2 this module understands."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        header = os.pread(fd, 112, 0)
        if len(header) < 72 or header[:4] != MAGIC:
            return None
        version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset = struct.unpack(
            ">IQIIQIIQ", header[4:48]
        )
        if version not in (2, 3) or crypt != 0 or not 9 <= cluster_bits <= 21:
            return None
        header_length = 72
        if version == 3:
            if len(header) < 104:
                return None
            incompatible = struct.unpack(">Q", header[72:80])[0]
            if incompatible & ~_COMPRESSION_TYPE_BIT:  # dirty, corrupt, external data, extended L2, …
                return None
            header_length = struct.unpack(">I", header[100:104])[0]
        backing_format = _backing_format(fd, header_length, 1 << cluster_bits)
        backing: Path | None = None
        if backing_offset:
            if not 0 < backing_size <= 1023:
                return None
            name = _pread_exact(fd, backing_size, backing_offset)
            if name is None:
                return None
            text = name.decode("utf-8", errors="strict")
            if text.startswith("json:") or ":" in text.split("/", 1)[0]:
                return None  # a protocol or option string, not a file name
            backing = path.parent / text
            if backing_format is None:  # unrecorded format: a qcow2 by its magic, else not ours
                backing_format = "qcow2" if _is_qcow2(backing) else "unknown"
            if backing_format not in ("qcow2", "raw"):
                return None
        l1_bytes = _pread_exact(fd, 8 * l1_size, l1_offset) if l1_size else b""
        if l1_bytes is None:
            return None
        l1 = tuple(e & _OFFSET_MASK for e in struct.unpack(f">{l1_size}Q", l1_bytes))
        return Layer(
            path,
            size,
            False,
            cluster_bits,
            version >= 3,
            l1,
            backing,
            backing is not None and backing_format == "raw",
        )
    except (OSError, UnicodeDecodeError, struct.error):
        return None
    finally:
        os.close(fd)


def _is_qcow2(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _backing_format(fd: int, header_length: int, cluster_size: int) -> str | None:
    """The backing file format header extension, or None when there is none."""
    offset = header_length
    while offset + 8 <= cluster_size:
        head = _pread_exact(fd, 8, offset)
        if head is None:
            return None
        kind, length = struct.unpack(">II", head)
        if kind == 0:
            return None
        if kind == _EXT_BACKING_FORMAT:
            value = _pread_exact(fd, length, offset + 8)
            return value.decode("ascii", errors="replace") if value is not None else None
        offset += 8 + ((length + 7) & ~7)
    return None


def read_chain(top: Path) -> list[Layer] | None:
    """The layers of ``top``'s backing chain, top first, or None when one is not understood."""
    layers: list[Layer] = []
    current: Path | None = top
    raw = False
    while current is not None:
        if len(layers) > _MAX_CHAIN or any(current == layer.path for layer in layers):
            return None
        if raw:
            try:
                size = current.stat().st_size
            except OSError:
                return None
            layers.append(Layer(current, size, True))
            break
        layer = read_layer(current)
        if layer is None:
            return None
        layers.append(layer)
        raw = layer.backing_raw
        current = layer.backing
    return layers


class ChainMap:
    """L2 lookups along a chain of :class:`Layer`; the caller closes it."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self._fds: list[int] = []
        try:
            for layer in layers:
                self._fds.append(os.open(layer.path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ChainMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entries(self, index: int, first: int, count: int) -> tuple[int, ...] | None:
        """L2 entries of clusters ``first .. first+count-1`` of layer ``index`` (all in one L2 table)."""
        layer = self.layers[index]
        per_table = layer.cluster_size // 8
        l1_index = first // per_table
        if l1_index >= len(layer.l1) or not layer.l1[l1_index]:
            return (0,) * count
        data = _pread_exact(self._fds[index], 8 * count, layer.l1[l1_index] + 8 * (first % per_table))
        return struct.unpack(f">{count}Q", data) if data is not None else None

    def allocated(self, index: int = 0) -> Iterator[tuple[int, int]] | None:
        """(start, length) of the clusters layer ``index`` holds itself (data, zeros or compressed)."""
        layer = self.layers[index]
        if layer.raw:
            return None
        per_table = layer.cluster_size // 8
        found: list[tuple[int, int]] = []
        for l1_index, l2_offset in enumerate(layer.l1):
            if not l2_offset:
                continue
            data = _pread_exact(self._fds[index], layer.cluster_size, l2_offset)
            if data is None:
                return None
            for position, entry in enumerate(struct.unpack(f">{per_table}Q", data)):
                if entry:
                    start = (l1_index * per_table + position) << layer.cluster_bits
                    if start < layer.size:
                        found.append((start, min(layer.cluster_size, layer.size - start)))
        return iter(found)

    def place(self, start: int, end: int) -> list[Extent] | None:
        """Where each byte of ``[start, end)`` of the top's guest content lives, or None when a compressed
        cluster (or a short read) is in the way."""
        pending = [(start, end)]
        placed: list[Extent] = []
        for index, layer in enumerate(self.layers):
            if not pending:
                break
            unresolved: list[tuple[int, int]] = []
            for lo, hi in pending:
                result = self._place_in(index, layer, lo, hi, placed, unresolved)
                if result is None:
                    return None
            pending = unresolved
        placed += [Extent(lo, hi - lo, True) for lo, hi in pending]  # below the bottom: zeros
        placed.sort(key=lambda p: p.start)
        return _merge(placed)

    def _place_in(
        self,
        index: int,
        layer: Layer,
        lo: int,
        hi: int,
        placed: list[Extent],
        unresolved: list[tuple[int, int]],
    ) -> bool | None:
        if lo >= layer.size:
            placed.append(Extent(lo, hi - lo, True))  # past a shorter backing file: zeros
            return True
        if hi > layer.size:
            placed.append(Extent(layer.size, hi - layer.size, True))
            hi = layer.size
        if layer.raw:
            placed.append(Extent(lo, hi - lo, False, index, lo))
            return True
        bits, size = layer.cluster_bits, layer.cluster_size
        per_table = size // 8
        cluster = lo >> bits
        last = (hi - 1) >> bits
        while cluster <= last:
            count = min(last - cluster + 1, per_table - cluster % per_table)
            entries = self._entries(index, cluster, count)
            if entries is None:
                return None
            for entry in entries:
                c_lo = max(lo, cluster << bits)
                c_hi = min(hi, (cluster + 1) << bits)
                if entry & _COMPRESSED:
                    return None
                if layer.zero_flag and entry & _ZERO_FLAG:
                    placed.append(Extent(c_lo, c_hi - c_lo, True))
                elif entry & _OFFSET_MASK:
                    host = (entry & _OFFSET_MASK) + (c_lo - (cluster << bits))
                    placed.append(Extent(c_lo, c_hi - c_lo, False, index, host))
                else:
                    unresolved.append((c_lo, c_hi))
                cluster += 1
        return True


def _merge(placed: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for piece in placed:
        if merged:
            last = merged[-1]
            contiguous = last.start + last.length == piece.start
            same = last.zero == piece.zero and (
                last.zero
                or (last.layer == piece.layer and last.host_offset + last.length == piece.host_offset)
            )
            if contiguous and same:
                merged[-1] = attrs.evolve(last, length=last.length + piece.length)
                continue
        merged.append(piece)
    return merged
