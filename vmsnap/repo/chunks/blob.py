r"""One chunk as stored: its id, and the blob codec (zstd, then AES-256-GCM when the repository is encrypted).

Chunk id (32 bytes; hex in store keys), by the repository's chunk id hash (its marker says which)::

    sha256, unencrypted   id = sha256(plaintext)
    sha256, encrypted     id = HMAC-SHA256(id_key, plaintext)          id_key: see vmsnap.repo.chunks.keys
    blake3, unencrypted   id = BLAKE3(plaintext)                       (32-byte output)
    blake3, encrypted     id = BLAKE3-keyed(blake3_id_key, plaintext)  (BLAKE3's keyed mode, a PRF like HMAC)

BLAKE3 is what new repositories use: with AVX-512 it hashed 4 MiB chunks at 5.4-5.6 GB/s per core here,
against 1.4 GB/s for sha256 with SHA-NI (:mod:`hashlib`, OpenSSL 3.0), and hashing every chunk is the
largest single CPU cost of both a backup and a restore (every chunk read back is hashed again to check it).

A chunk is at most 4 MiB of guest-visible content (the last chunk of a disk may be shorter); an all-zero chunk
is never stored (indexes mark it as a hole). The blob of chunk ``id`` lives under the store key
``chunks/<hex(id)[0:4]>/<hex(id)>``.

Blob (all integers big-endian)::

    offset  size  field
    0       4     magic  b"VMCB"
    4       1     version  1
    5       1     flags  bit 0: payload is one zstd frame (with its content size); bit 1: encrypted;
                  other bits 0
    6       2     reserved, 0
    8       …     unencrypted: payload
                  encrypted:   nonce (12 random bytes) || AES-256-GCM(encryption_key, nonce, payload,
                               associated data = blob[0:8] || id) || tag (16 bytes)

``payload`` is the zstd frame when that is smaller than the plaintext, else the plaintext itself (a chunk of
256 KiB or more whose four 8 KiB samples do not compress is stored raw without trying the whole). Decoding
checks, in order: length, magic, version, flags, the GCM tag (which binds the blob to its id: a blob copied
under another id fails here), the zstd frame (exactly one, content size <= 4 MiB, no trailing bytes), then
recomputes the id from the plaintext. Any failure is a :class:`~vmsnap.errors.DamagedChunkError` and no
plaintext is returned. Random 96-bit nonces keep AES-GCM within its bounds for 2^32 blobs per key (16 PiB of
chunks).

By hand (unencrypted): ``tail -c +9 BLOB | zstd -d | sha256sum`` (or ``b3sum``, Debian's package b3sum,
in a blake3 repository) prints the id when flag bit 0 is set; ``tail -c +9 BLOB | sha256sum`` otherwise.

The data path avoids copying chunks: :meth:`ChunkCodec.encode_frame` stores a plaintext read into a buffer
behind room for the header as it lies there (the blob is a view of that buffer), and
:meth:`ChunkCodec.decode_view` returns a view of the blob (or of the thread's decryption buffer) instead of
a copy; both views live until the same thread's next call.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import struct
import threading
from typing import Any, NewType, cast

import attrs
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmsnap.buffers import aligned_buffer, is_zero_view
from vmsnap.errors import DamagedChunkError, UsageError
from vmsnap.image.geometry import CHUNK_SIZE as CHUNK_SIZE
from vmsnap.repo.chunks.keys import RepositoryKey

ChunkId = NewType("ChunkId", bytes)
"""32 bytes naming a chunk's content (see the module docstring)."""

ID_SIZE = 32
MAGIC = b"VMCB"
VERSION = 1
FLAG_ZSTD = 0x01
FLAG_ENCRYPTED = 0x02
HEADER_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
DEFAULT_LEVEL = 1
"""zstd level. On real filesystem data (a tar of /usr/share/doc and /usr/share/perl, 4 MiB chunks) level 1
compressed 0.53-0.57 GiB/s per core here at a ratio of 1.81, level 3 0.28 GiB/s at 1.89: half the CPU for 4 %
more bytes stored, and compression is what a backup of a real filesystem spends most of its CPU on (the
level is not part of the format: blobs of any level decode the same)."""

ID_HASHES = ("blake3", "sha256")
"""The chunk id hashes a repository can use (its marker says which); the first is what new ones use."""
PROBE_MIN = 256 * 1024
PROBE_SAMPLES = 4
PROBE_SIZE = 8192
_HEADER = struct.Struct(">4sBBH")
_ZEROS = bytes(CHUNK_SIZE)
_DAMAGED_HINT = (
    "run `vmsnap verify`: it names the backups that use the chunk and moves it aside, so that the next "
    "backup stores it again if the disk still holds that data; meanwhile restore another backup"
)
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


@functools.lru_cache(maxsize=4)
def _zeros(length: int) -> bytes:
    return _ZEROS if length == CHUNK_SIZE else bytes(length)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` (at most 4 MiB) is all zero bytes: one ``memcmp`` against a shared zero buffer
    (~21-25 GB/s; a memoryview of a writable buffer is compared where it lies, a read-only one is copied
    first: its own comparison is 20x slower)."""
    if len(data) > CHUNK_SIZE:
        raise UsageError(f"is_zero() takes at most {CHUNK_SIZE} bytes, got {len(data)}")
    if isinstance(data, memoryview):
        found = is_zero_view(data)
        if found is not None:
            return found
        return _zeros(len(data)) == data.tobytes()
    return _zeros(len(data)) == data


@functools.lru_cache(maxsize=1)
def _blake3() -> type[Any]:
    try:
        import blake3
    except ImportError as err:  # a dependency: only a broken installation lacks it
        raise UsageError(
            "this repository's chunk ids are BLAKE3 and the blake3 module is missing",
            hint="install the Python package blake3 (pip install blake3)",
        ) from err
    return cast("type[Any]", blake3.blake3)


def chunk_key(chunk_id: bytes) -> str:
    """The store key of a chunk's blob: ``chunks/<hex[0:4]>/<hex>``."""
    if len(chunk_id) != ID_SIZE:
        raise UsageError(f"a chunk id has {ID_SIZE} bytes, got {len(chunk_id)}", hint="a bug in the caller")
    text = chunk_id.hex()
    return f"chunks/{text[:4]}/{text}"


def parse_chunk_key(key: str) -> ChunkId | None:
    """The chunk id a store key names, or None when the key is not a well-formed chunk key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "chunks" or not _HEX_ID.match(parts[2]) or parts[1] != parts[2][:4]:
        return None
    return ChunkId(bytes.fromhex(parts[2]))


def _damaged(chunk_id: bytes, what: str) -> DamagedChunkError:
    return DamagedChunkError(f"chunk {chunk_id.hex()} is damaged: {what}", hint=_DAMAGED_HINT)


@attrs.frozen
class ChunkCodec:
    """Ids, encoding and checked decoding of chunk blobs; safe to share between threads.

    :param key: the repository key (an encrypted repository), or None
    :param level: zstd compression level (1-19)
    :param compress: try zstd on each chunk (False: a repository made with ``--compression none`` stores
        every payload raw; blobs of either kind decode the same)
    :param id_hash: "sha256" or "blake3" (see the module docstring); the repository's marker says which
    """

    key: RepositoryKey | None = None
    level: int = attrs.field(default=DEFAULT_LEVEL)
    compress: bool = True
    id_hash: str = attrs.field(default="sha256", kw_only=True)
    _local: threading.local = attrs.field(factory=threading.local, init=False, repr=False, eq=False)

    @level.validator
    def _check_level(self, _attribute: object, value: int) -> None:
        if not 1 <= value <= 19:
            raise UsageError(f"zstd level {value} is out of range", hint="use a level from 1 to 19")

    @id_hash.validator
    def _check_id_hash(self, _attribute: object, value: str) -> None:
        if value not in ID_HASHES:
            raise UsageError(f"unknown chunk id hash {value!r}", hint=f"use {' or '.join(ID_HASHES)}")

    @property
    def encrypted(self) -> bool:
        """True when blobs are encrypted and ids keyed."""
        return self.key is not None

    def chunk_id(self, data: bytes | bytearray | memoryview) -> ChunkId:
        """The id of a plaintext chunk: sha256 or BLAKE3, keyed with the id key when encrypted (HMAC-SHA256,
        BLAKE3's keyed mode). Both release the GIL while they hash a chunk."""
        if self.id_hash == "blake3":
            if self.key is None:
                return ChunkId(_blake3()(data).digest())
            return ChunkId(_blake3()(data, key=self.key.blake3_id_key).digest())
        if self.key is None:
            return ChunkId(hashlib.sha256(data).digest())
        return ChunkId(hmac.digest(self.key.id_key, data, "sha256"))

    # ---------------------------------------------------------------------------------------- thread state

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
            self._local.compressor = compressor
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.decompressor = decompressor
        return decompressor

    def _buffer(self, size: int) -> memoryview:
        """A per-thread, page-aligned scratch buffer of at least ``size`` bytes (AES-GCM writes into it: no
        big allocation per chunk, and a blob built there can be written with O_DIRECT as it lies)."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = aligned_buffer(max(size, HEADER_SIZE + NONCE_SIZE + CHUNK_SIZE + TAG_SIZE + 64))
            self._local.buffer = buffer
        return memoryview(buffer)

    # -------------------------------------------------------------------------------------------- encode

    def _worth_compressing(self, data: bytes | bytearray | memoryview) -> bool:
        """False when four 8 KiB samples of a large chunk do not shrink by 2% (random, already compressed or
        encrypted data): zstd would spend ~1 ms and a 4 MiB buffer per chunk to store it raw anyway. Always
        False in a repository made with ``--compression none``."""
        if not self.compress:
            return False
        if len(data) < PROBE_MIN:
            return True
        step = len(data) // PROBE_SAMPLES
        sample = b"".join(bytes(data[i * step : i * step + PROBE_SIZE]) for i in range(PROBE_SAMPLES))
        return len(self._compressor().compress(sample)) < len(sample) * 0.98

    def encode(self, data: bytes | bytearray | memoryview, chunk_id: bytes) -> bytes:
        """The blob of a plaintext chunk whose id is ``chunk_id`` (from :meth:`chunk_id`).

        :param data: the plaintext, 1 byte to 4 MiB
        :param chunk_id: its id (bound to the blob as associated data when encrypted)
        :raise UsageError: ``data`` is empty or larger than a chunk
        """
        if not 0 < len(data) <= CHUNK_SIZE or len(chunk_id) != ID_SIZE:
            raise UsageError(f"cannot encode a chunk of {len(data)} bytes", hint="a bug in the caller")
        flags, payload = self._payload(data)
        if self.key is None:
            return _HEADER.pack(MAGIC, VERSION, flags, 0) + payload
        return bytes(self._seal(flags, payload, chunk_id))

    def encode_frame(self, frame: memoryview, length: int, chunk_id: bytes) -> bytes | memoryview:
        """The blob of the ``length``-byte plaintext at ``frame[HEADER_SIZE:HEADER_SIZE + length]`` (whose
        id is ``chunk_id``), built without copying the plaintext where it can be: stored raw and unencrypted,
        the blob is ``frame[:HEADER_SIZE + length]`` with the header written in front of the plaintext;
        encrypted, it is a view of this thread's scratch buffer. A view is valid until the caller changes
        ``frame`` or this thread encodes again; same bytes as :meth:`encode`.

        :raise UsageError: ``length`` is 0 or larger than a chunk, or ``frame`` too short
        """
        if not 0 < length <= CHUNK_SIZE or len(frame) < HEADER_SIZE + length or len(chunk_id) != ID_SIZE:
            raise UsageError(f"cannot encode a chunk of {length} bytes", hint="a bug in the caller")
        data = frame[HEADER_SIZE : HEADER_SIZE + length]
        flags, payload = self._payload(data)
        if self.key is not None:
            return self._seal(flags, payload, chunk_id)
        if payload is data:
            _HEADER.pack_into(frame, 0, MAGIC, VERSION, flags, 0)
            return frame[: HEADER_SIZE + length]
        return _HEADER.pack(MAGIC, VERSION, flags, 0) + payload

    def _payload(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes | bytearray | memoryview]:
        """(flags, payload): the zstd frame when it is worth it and smaller, else ``data`` itself."""
        if self._worth_compressing(data):
            compressed = self._compressor().compress(data)
            if len(compressed) < len(data):
                return FLAG_ZSTD, compressed
        return 0, data

    def _seal(self, flags: int, payload: bytes | bytearray | memoryview, chunk_id: bytes) -> memoryview:
        """The encrypted blob, in this thread's scratch buffer."""
        assert self.key is not None
        flags |= FLAG_ENCRYPTED
        header = _HEADER.pack(MAGIC, VERSION, flags, 0)
        nonce = secrets.token_bytes(NONCE_SIZE)
        start = HEADER_SIZE + NONCE_SIZE
        out = self._buffer(start + len(payload) + TAG_SIZE + 64)
        out[:HEADER_SIZE] = header
        out[HEADER_SIZE:start] = nonce
        encryptor = Cipher(algorithms.AES(self.key.encryption_key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(header + chunk_id)
        written = encryptor.update_into(payload, out[start:])  # type: ignore[arg-type]  # stubs say bytes; any buffer works
        encryptor.finalize()
        out[start + written : start + written + TAG_SIZE] = encryptor.tag
        return out[: start + written + TAG_SIZE]

    # -------------------------------------------------------------------------------------------- decode

    def decode(self, blob: bytes, expected_id: bytes, *, length: int | None = None) -> bytes:
        """The plaintext of ``blob``, after checking everything (see the module docstring).

        :param blob: what the store returned for ``expected_id``'s key
        :param expected_id: the id the caller looked up (from an index)
        :param length: the plaintext length the index expects, when known
        :raise DamagedChunkError: anything does not check out (the message names the chunk id)
        """
        plaintext = self.decode_view(blob, expected_id, length=length)
        return plaintext if isinstance(plaintext, bytes) else bytes(plaintext)

    def decode_view(
        self, blob: bytes | bytearray | memoryview, expected_id: bytes, *, length: int | None = None
    ) -> bytes | memoryview:
        """:meth:`decode` without its final copy: the checked plaintext as a view of ``blob`` (a raw payload)
        or of this thread's scratch buffer (encrypted), or new bytes (zstd). A view is valid until ``blob``
        changes or this thread decodes again. Same checks, same errors."""
        if len(blob) < HEADER_SIZE:
            raise _damaged(expected_id, f"truncated to {len(blob)} bytes")
        magic, version, flags, reserved = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise _damaged(expected_id, "not a chunk blob (bad magic)")
        if version != VERSION or reserved != 0 or flags & ~(FLAG_ZSTD | FLAG_ENCRYPTED):
            raise _damaged(expected_id, f"unknown blob version {version} or flags {flags:#x}")
        if bool(flags & FLAG_ENCRYPTED) != self.encrypted:
            state = "encrypted" if flags & FLAG_ENCRYPTED else "not encrypted"
            raise _damaged(expected_id, f"the blob is {state}, unlike this repository")
        view = memoryview(blob).cast("B")
        payload: bytes | memoryview = view[HEADER_SIZE:]
        if self.key is not None:
            payload = self._decrypt(view, expected_id)
        plaintext = self._decompress(payload, expected_id) if flags & FLAG_ZSTD else payload
        if not 0 < len(plaintext) <= CHUNK_SIZE or (length is not None and len(plaintext) != length):
            raise _damaged(expected_id, f"holds {len(plaintext)} bytes, expected {length or CHUNK_SIZE}")
        if not hmac.compare_digest(self.chunk_id(plaintext), expected_id):
            raise _damaged(expected_id, "its content does not match its id")
        return plaintext

    def _decrypt(self, blob: memoryview, expected_id: bytes) -> memoryview:
        assert self.key is not None
        start = HEADER_SIZE + NONCE_SIZE
        if len(blob) < start + TAG_SIZE:
            raise _damaged(expected_id, f"truncated to {len(blob)} bytes")
        nonce = bytes(blob[HEADER_SIZE:start])
        tag = bytes(blob[-TAG_SIZE:])
        ciphertext = blob[start:-TAG_SIZE]
        out = self._buffer(len(ciphertext) + 64)
        decryptor = Cipher(algorithms.AES(self.key.encryption_key), modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(bytes(blob[:HEADER_SIZE]) + expected_id)
        written = decryptor.update_into(ciphertext, out)  # type: ignore[arg-type]  # stubs say bytes
        try:
            decryptor.finalize()
        except InvalidTag:
            raise _damaged(
                expected_id, "authentication failed (altered, or filed under another id)"
            ) from None
        return out[:written]

    def _decompress(self, payload: bytes | memoryview, expected_id: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(payload)
        except zstandard.ZstdError:
            raise _damaged(expected_id, "its zstd frame header is invalid") from None
        if not 0 < size <= CHUNK_SIZE:  # -1: unknown; never written so, and a bound for the allocation
            raise _damaged(expected_id, f"its zstd frame claims {size} bytes")
        try:
            decompressor = self._decompressor()
            return decompressor.decompress(payload, max_output_size=CHUNK_SIZE, allow_extra_data=False)
        except zstandard.ZstdError as err:
            raise _damaged(expected_id, f"zstd: {err}") from None
