"""The per-disk chunk index (vmsnap.repo.chunks.index): round trips (hypothesis), the documented byte layout
parsed by hand, and strict decoding — every flipped bit and truncation is caught (checksum or MAC), as are a
MAC downgraded to a checksum and a wrong key; the header's counts must agree with each other and the size."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.errors import ChecksumMismatchError, RepositoryError
from vmsnap.repo.chunks.blob import CHUNK_SIZE
from vmsnap.repo.chunks.index import HOLE, ChunkIndex, chunk_count, decode_index, encode_index
from vmsnap.repo.chunks.keys import RepositoryKey

KEY = RepositoryKey.from_master(bytes(range(32)))
OTHER_KEY = RepositoryKey.from_master(bytes(32))
MiB = 1024 * 1024


def sample(size: int, seed: int = 0) -> ChunkIndex:
    ids = b"".join(
        HOLE if i % 3 == 1 else hashlib.sha256(f"{seed}-{i}".encode()).digest()
        for i in range(chunk_count(size))
    )
    return ChunkIndex(size, ids)


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(0, 40 * CHUNK_SIZE),
    seed=st.integers(0, 1000),
    authenticated=st.booleans(),
)
def test_round_trip(size: int, seed: int, authenticated: bool) -> None:
    index = sample(size, seed)
    key = KEY if authenticated else None
    assert decode_index(encode_index(index, key), key) == index


def test_layout_by_hand() -> None:
    index = sample(10 * MiB + 5)  # three chunks, the last 2 MiB + 5 bytes
    data = encode_index(index, KEY)
    magic, version, flags, chunk_size, size, count = struct.unpack(">8sHHIQQ", data[:32])
    assert (magic, version, flags, chunk_size, size, count) == (b"VMSNAPIX", 1, 1, 4 * MiB, 10 * MiB + 5, 3)
    assert data[32 : 32 + 96] == index.ids and len(data) == 32 + 96 + 32
    assert data[-32:] == hmac.digest(KEY.mac_key, data[:-32], "sha256")
    plain = encode_index(index)
    assert plain[10:12] == b"\0\0" and plain[:-32] == data[:10] + b"\0\0" + data[12:-32]
    assert plain[-32:] == hashlib.sha256(plain[:-32]).digest()


def test_accessors() -> None:
    index = sample(10 * MiB + 5)
    assert len(index) == 3 and index.chunk_size == CHUNK_SIZE
    assert [index.length(i) for i in range(3)] == [4 * MiB, 4 * MiB, 2 * MiB + 5]
    assert [index.offset(i) for i in range(3)] == [0, 4 * MiB, 8 * MiB]
    assert index.is_hole(1) and not index.is_hole(0)
    assert [i for i, _ in index.data_chunks()] == [0, 2]
    assert index.referenced() == {index.chunk_id(0), index.chunk_id(2)}
    assert index.data_bytes() == 6 * MiB + 5
    with pytest.raises(IndexError):
        index.chunk_id(3)
    empty = ChunkIndex.holes(9 * MiB)
    assert len(empty) == 3 and empty.referenced() == set() and empty.data_bytes() == 0
    assert len(ChunkIndex.holes(0)) == 0
    with pytest.raises(ValueError, match="do not fit"):
        ChunkIndex(5 * MiB, bytes(32))
    with pytest.raises(ValueError, match="out of range"):
        ChunkIndex(-1, b"")


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "authenticated"])
def test_every_flipped_bit_is_caught(key: RepositoryKey | None) -> None:
    data = encode_index(sample(9 * MiB), key)
    for bit in range(len(data) * 8):
        with pytest.raises(RepositoryError) as info:
            decode_index(flipped(data, bit), key, name="vms/vm1/b1/disk0.index")
        assert "vms/vm1/b1/disk0.index" in info.value.message


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "authenticated"])
def test_truncated_or_extended_indexes_are_caught(key: RepositoryKey | None) -> None:
    data = encode_index(sample(9 * MiB), key)
    for length in range(len(data)):
        with pytest.raises(RepositoryError):
            decode_index(data[:length], key)
    with pytest.raises(RepositoryError):
        decode_index(data + b"\0", key)


def test_wrong_key_stripped_mac_and_missing_key() -> None:
    index = sample(9 * MiB)
    with pytest.raises(ChecksumMismatchError, match="another key"):
        decode_index(encode_index(index, KEY), OTHER_KEY)
    with pytest.raises(RepositoryError, match="not authenticated"):
        decode_index(encode_index(index), KEY)  # an attacker dropped the MAC and the flag
    authenticated = encode_index(index, KEY)
    body = authenticated[:10] + b"\0\0" + authenticated[12:-32]
    with pytest.raises(RepositoryError, match="not authenticated"):
        decode_index(body + hashlib.sha256(body).digest(), KEY)  # a MAC swapped for a valid checksum
    with pytest.raises(RepositoryError, match="no key was given") as info:
        decode_index(authenticated)
    assert "--key-file" in info.value.hint


def test_inconsistent_headers_name_the_index() -> None:
    good = encode_index(sample(9 * MiB))

    def with_header(**fields: int) -> bytes:
        values = dict(
            zip(
                ("version", "flags", "chunk_size", "size", "count"),
                struct.unpack(">HHIQQ", good[8:32]),
                strict=True,
            )
        )
        values.update(fields)
        body = good[:8] + struct.pack(">HHIQQ", *values.values()) + good[32:-32]
        return body + hashlib.sha256(body).digest()  # a consistent checksum: the header checks must catch it

    cases = {
        "version 2": with_header(version=2),
        "flags 0x4": with_header(flags=4),
        "chunk size 65536": with_header(chunk_size=65536),
        "cannot describe": with_header(count=2),
        "cannot describe ": with_header(size=1 << 62, count=(1 << 62) // CHUNK_SIZE),
        "bad magic": b"VMSNAPIY" + good[8:],
        "fails its checksum": good[:40] + b"X" + good[41:],
        "bytes, expected": with_header(size=13 * MiB, count=4),
    }
    for message, data in cases.items():
        with pytest.raises(RepositoryError, match=message.strip()) as info:
            decode_index(data, name="vms/vm1/b1/disk0.index")
        assert "vms/vm1/b1/disk0.index" in info.value.message
