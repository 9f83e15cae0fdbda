"""vmsnap.buffers: page-aligned buffers, addresses through the buffer protocol, zero checks where the bytes
lie (compared with what Python's own comparison says)."""

from __future__ import annotations

import os

import pytest

from vmsnap.buffers import ALIGN, address, aligned_buffer, is_aligned, is_zero_at, is_zero_view


def test_aligned_buffers_start_on_a_page_and_views_keep_their_offset() -> None:
    buffer = aligned_buffer(3 * ALIGN)
    assert is_aligned(buffer) and is_aligned(memoryview(buffer)) and is_aligned(memoryview(buffer)[ALIGN:])
    assert not is_aligned(memoryview(buffer)[8:])
    base = address(buffer)
    assert base is not None and address(memoryview(buffer)[100:]) == base + 100
    assert address(b"") is None and address(memoryview(buffer)[::2]) is None  # empty, not contiguous


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "mmap", "readonly view"])
def test_zero_checks_agree_with_python(kind: str) -> None:
    data = bytearray(4 * 1024 * 1024)
    for where in (0, 1, 65535, len(data) - 1):
        data[where] = 1
    made = {
        "bytes": lambda d: bytes(d),
        "bytearray": lambda d: d,
        "mmap": lambda d: _mapped(d),
        "readonly view": lambda d: memoryview(bytes(d)),
    }[kind](data)
    view = memoryview(made)
    for start, end in [(0, 1), (1, 2), (2, 65535), (2, 65536), (65536, len(data) - 1), (0, len(data))]:
        assert is_zero_view(view[start:end]) == (not any(data[start:end])), (start, end)
    base = address(made)
    assert base is not None
    assert is_zero_at(base, 2, 65533) and not is_zero_at(base, 2, 65534)


def _mapped(data: bytearray) -> object:
    buffer = aligned_buffer(len(data))
    buffer[:] = data
    return buffer


def test_random_data_is_not_zero_and_large_views_are_refused() -> None:
    assert is_zero_view(os.urandom(4096)) is False
    assert is_zero_view(bytes(8 * 1024 * 1024)) is None  # longer than the shared zero buffer: not judged
    with pytest.raises(ValueError, match="at most"):
        is_zero_at(0, 0, 8 * 1024 * 1024)
