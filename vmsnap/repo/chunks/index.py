r"""The index of one disk in one backup: its virtual size and the id of each 4 MiB chunk, in order.

Every backup, incremental or not, has a complete index, so any backup restores (and any can be pruned) alone.
Byte format (all integers big-endian)::

    offset      size        field
    0           8           magic  b"VMSNAPIX"
    8           2           version  1
    10          2           flags  bit 0: authenticated (the trailer is a MAC); other bits 0
    12          4           chunk size  4194304
    16          8           virtual size (bytes)
    24          8           chunk count = ceil(virtual size / chunk size)
    32          32 * count  chunk ids in disk order; 32 zero bytes: a hole (the chunk reads as zeros,
                            nothing is stored)
    32+32*count 32          trailer over every byte before it: HMAC-SHA256(mac_key, …) with flag bit 0,
                            else SHA-256(…)

Chunk ``i`` covers ``[i * 4 MiB, min((i + 1) * 4 MiB, virtual size))``. The trailer catches any damaged
byte; an encrypted repository writes and accepts only authenticated indexes (a plain checksum in its place is
refused, not ignored), so an index cannot be altered, truncated or downgraded without the key. Decoding checks
the length against the count, the count against the size, the flags against the repository and the trailer
before anything is used.

By hand: ``head -c -32 DISK.index | sha256sum`` equals the last 32 bytes (``tail -c 32 DISK.index | xxd -p
-c 32``) of an unencrypted repository's index; ``tail -c +33 DISK.index | head -c $((32 * COUNT)) | xxd -p
-c 32`` lists the ids (hex).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator

import attrs

from vmsnap.errors import ChecksumMismatchError, RepositoryError
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.image.geometry import chunk_count as chunk_count
from vmsnap.repo.chunks.blob import ID_SIZE, ChunkId
from vmsnap.repo.chunks.keys import RepositoryKey

MAGIC = b"VMSNAPIX"
VERSION = 1
FLAG_AUTHENTICATED = 0x0001
HEADER_SIZE = 32
TRAILER_SIZE = 32
HOLE = ChunkId(bytes(ID_SIZE))
"""The id an index records for a chunk that reads as zeros (never stored)."""

_HEADER = struct.Struct(">8sHHIQQ")
_DAMAGED_HINT = "the backup is damaged: run `vmsnap verify`, restore another backup or take a new one"
MAX_VIRTUAL_SIZE = 1 << 60
"""A bound on the size a header may claim (1 EiB), so a damaged header cannot ask for a huge allocation."""


@attrs.frozen
class ChunkIndex:
    """One disk's content as chunk ids.

    :param virtual_size: the disk's guest-visible size in bytes
    :param ids: 32 bytes per chunk, in order (:data:`HOLE` for a chunk that reads as zeros)
    :raise ValueError: ``ids`` does not have 32 bytes per chunk of ``virtual_size``
    """

    virtual_size: int
    ids: bytes = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.virtual_size <= MAX_VIRTUAL_SIZE:
            raise ValueError(f"virtual size {self.virtual_size} is out of range")
        if len(self.ids) != ID_SIZE * chunk_count(self.virtual_size):
            raise ValueError(
                f"{len(self.ids)} bytes of chunk ids do not fit a disk of {self.virtual_size} bytes "
                f"({chunk_count(self.virtual_size)} chunks of {CHUNK_SIZE})"
            )

    @classmethod
    def holes(cls, virtual_size: int) -> ChunkIndex:
        """The index of an all-zero disk."""
        return cls(virtual_size, HOLE * chunk_count(virtual_size))

    def __len__(self) -> int:
        return len(self.ids) // ID_SIZE

    @property
    def chunk_size(self) -> int:
        return CHUNK_SIZE

    def chunk_id(self, index: int) -> ChunkId:
        """The id of chunk ``index`` (:data:`HOLE` for a hole).

        :raise IndexError: no such chunk
        """
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} of {len(self)}")
        return ChunkId(self.ids[index * ID_SIZE : (index + 1) * ID_SIZE])

    def is_hole(self, index: int) -> bool:
        """True when chunk ``index`` reads as zeros."""
        return self.chunk_id(index) == HOLE

    def offset(self, index: int) -> int:
        """Where chunk ``index`` starts on the disk."""
        return index * CHUNK_SIZE

    def length(self, index: int) -> int:
        """How many bytes chunk ``index`` covers (the last one may be short)."""
        return min(CHUNK_SIZE, self.virtual_size - index * CHUNK_SIZE)

    def data_chunks(self) -> Iterator[tuple[int, ChunkId]]:
        """(index, id) of every chunk that is not a hole, in disk order."""
        for index in range(len(self)):
            chunk_id = ChunkId(self.ids[index * ID_SIZE : (index + 1) * ID_SIZE])
            if chunk_id != HOLE:
                yield index, chunk_id

    def referenced(self) -> set[ChunkId]:
        """Every chunk id this index needs from the store (what gc marks)."""
        return {chunk_id for _, chunk_id in self.data_chunks()}

    def data_bytes(self) -> int:
        """Guest-visible bytes that are not holes."""
        return sum(self.length(index) for index, _ in self.data_chunks())


def encode_index(index: ChunkIndex, key: RepositoryKey | None = None) -> bytes:
    """The bytes of ``index``, with a SHA-256 trailer, or a MAC when ``key`` is given (authenticated).

    :param index: the index
    :param key: the repository key of an encrypted repository
    """
    flags = FLAG_AUTHENTICATED if key is not None else 0
    body = _HEADER.pack(MAGIC, VERSION, flags, CHUNK_SIZE, index.virtual_size, len(index)) + index.ids
    return body + (key.mac(body) if key is not None else hashlib.sha256(body).digest())


def decode_index(data: bytes, key: RepositoryKey | None = None, *, name: str = "index") -> ChunkIndex:
    """The index in ``data``, after checking its format and its trailer (with ``key``: its MAC).

    :param data: what the store returned
    :param key: the repository key of an encrypted repository (its indexes must be authenticated)
    :param name: what to call it in messages (its store key)
    :raise RepositoryError: not an index, a version or chunk size this vmsnap does not know, inconsistent
        lengths, or an unauthenticated index in an encrypted repository (and the reverse)
    :raise ChecksumMismatchError: the trailer does not match (damaged, altered, or another repository's key)
    """
    if len(data) < HEADER_SIZE:
        raise _damaged(name, f"truncated to {len(data)} bytes")
    magic, version, flags, chunk_size, virtual_size, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _damaged(name, "not a chunk index (bad magic)")
    if version != VERSION or flags & ~FLAG_AUTHENTICATED:
        raise RepositoryError(
            f"index {name} has version {version} and flags {flags:#x}; this vmsnap reads version {VERSION}",
            hint="use a vmsnap that knows this repository format",
        )
    if chunk_size != CHUNK_SIZE:
        raise _damaged(name, f"chunk size {chunk_size}, expected {CHUNK_SIZE}")
    if virtual_size > MAX_VIRTUAL_SIZE or count != chunk_count(virtual_size):
        raise _damaged(name, f"{count} chunks cannot describe {virtual_size} bytes")
    authenticated = bool(flags & FLAG_AUTHENTICATED)
    if authenticated and key is None:
        raise RepositoryError(
            f"index {name} is authenticated, but no key was given",
            hint="the repository is encrypted: pass its key file (--key-file or VMSNAP_KEY_FILE)",
        )
    if key is not None and not authenticated:
        raise _damaged(name, "not authenticated, in an encrypted repository (its MAC was stripped?)")
    body_end = HEADER_SIZE + ID_SIZE * count
    expected = body_end + TRAILER_SIZE
    if len(data) != expected:
        raise _damaged(name, f"{len(data)} bytes, expected {expected}")
    body, trailer = memoryview(data)[:body_end], memoryview(data)[body_end:]
    if key is not None and not key.check_mac(body, trailer):
        raise ChecksumMismatchError(
            f"index {name} fails its authentication check: altered, or written with another key",
            hint=_DAMAGED_HINT,
        )
    if key is None and not hmac.compare_digest(hashlib.sha256(body).digest(), trailer):
        raise ChecksumMismatchError(f"index {name} fails its checksum: damaged", hint=_DAMAGED_HINT)
    return ChunkIndex(virtual_size, bytes(data[HEADER_SIZE:body_end]))


def _damaged(name: str, what: str) -> RepositoryError:
    return RepositoryError(f"index {name} is damaged: {what}", hint=_DAMAGED_HINT)
