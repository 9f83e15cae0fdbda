"""Scratch buffers of the chunk data path: page-aligned (so ``O_DIRECT`` can write from them without a copy)
and zero checks over any part of them without copying it first.

A memoryview can be compared with ``==`` only element by element (20x slower than ``memcmp``) and
``tobytes()`` copies it; :func:`is_zero_at` calls libc's ``memcmp`` through ctypes instead (which releases the
GIL), at the address the buffer protocol gives (``PyObject_GetBuffer``, CPython's stable C API).
"""

from __future__ import annotations

import ctypes
import mmap

ALIGN = 4096
"""Page size: the alignment ``O_DIRECT`` needs of memory, offsets and lengths (on every Linux filesystem)."""

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_ZERO_SIZE = 4 * 1024 * 1024 + ALIGN
_ZEROS = bytes(_ZERO_SIZE)  # immutable: shared by every thread (faster to compare with than the zero page)
_ZEROS_ADDRESS = ctypes.cast(ctypes.c_char_p(_ZEROS), ctypes.c_void_p).value or 0


def aligned_buffer(size: int) -> mmap.mmap:
    """A new anonymous, zero-filled, writable buffer of ``size`` bytes whose start is page-aligned."""
    return mmap.mmap(-1, max(size, 1))


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (the buffer protocol's view, a stable part of the C API)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None
_PYBUF_SIMPLE = 0  # contiguous bytes: refused (a Python error) for a non-contiguous view


Buffer = bytes | bytearray | memoryview | mmap.mmap


def address(buffer: Buffer) -> int | None:
    """The address of the first byte of a contiguous buffer (bytes too), or None (empty, not contiguous).

    The address is valid while the caller holds ``buffer`` (and, for a bytearray, does not resize it).
    """
    if len(buffer) == 0:
        return None
    view = _PyBuffer()
    try:
        _get_buffer(buffer, ctypes.byref(view), _PYBUF_SIMPLE)
    except (BufferError, TypeError, ValueError):
        return None
    try:
        where: int | None = view.buf
        return where
    finally:
        _release_buffer(ctypes.byref(view))


def is_aligned(buffer: Buffer) -> bool:
    """True when ``buffer`` is contiguous and starts on a page boundary."""
    where = address(buffer)
    return where is not None and where % ALIGN == 0


def is_zero_at(base: int, offset: int, length: int) -> bool:
    """True when the ``length`` bytes at address ``base + offset`` are zero (``length`` <= 4 MiB + 4 KiB)."""
    if length > _ZERO_SIZE:
        raise ValueError(f"is_zero_at() compares at most {_ZERO_SIZE} bytes, got {length}")
    return length <= 0 or _memcmp(base + offset, _ZEROS_ADDRESS, length) == 0


def is_zero_view(data: Buffer) -> bool | None:
    """True/False when ``data``'s bytes are all zero / are not (compared where they lie), None when its
    address cannot be had (not contiguous) or it is longer than 4 MiB + 4 KiB."""
    where = address(data)
    if where is None or len(data) > _ZERO_SIZE:
        return None if len(data) else True
    return is_zero_at(where, 0, len(data))
