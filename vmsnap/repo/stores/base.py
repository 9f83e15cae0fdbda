"""The Store protocol: where a repository's bytes live (a local directory, an S3 bucket), as named objects.

A store knows keys and bytes, nothing of backups. Keys are relative, '/'-separated names made of
``[A-Za-z0-9._+-]`` parts (no empty part, no '.' or '..', no leading dot in the first part), checked by
:func:`check_key` before any store touches them, so a key can never escape the store's root.

Every store guarantees:

- ``put`` is atomic: a reader sees the old object (or none) or the whole new one, never a part;
- ``put(..., if_absent=True)`` creates the object only when no object has that key, atomically against
  other writers (local: link/O_EXCL; S3: a conditional ``If-None-Match: *`` PUT), and returns False when
  it existed (the data is then not written);
- ``put`` is durable when it returns; ``put(..., durable=False)`` may leave the object invisible until
  ``sync()`` returns, but never visible before it is durable (a reader may trust whatever it finds), and
  its True then says "absent when the put began" (should another writer store the key first, that object
  stays: still one object, written once). ``sync()`` raises when such a put could not be completed;
- ``get`` returns exactly what one ``put`` stored, or raises :class:`~vmsnap.errors.NotFoundError`;
- ``list`` yields every object under a prefix that existed for the whole listing (objects created or
  deleted meanwhile may or may not appear), with its size, in no promised order;
- failures of the store itself (unreachable, refused, full) raise :class:`~vmsnap.errors.StoreError`
  with one line that names the store's URL (never a secret) and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import attrs

from vmsnap.errors import UsageError

Data = bytes | bytearray | memoryview
"""What ``put`` takes: any contiguous bytes-like object (the chunk pipeline hands views of its buffers)."""

_PART = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")


def check_key(key: str) -> str:
    """Return ``key`` when it is a valid store key (see the module docstring).

    :raise UsageError: it is not
    """
    parts = key.split("/")
    if not key or len(key) > 1024 or any(not _PART.match(p) or p in (".", "..") for p in parts):
        raise UsageError(f"invalid store key {key!r}", hint="a bug: vmsnap builds keys from validated names")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` when it is "" or a valid key, optionally ending with '/'.

    :raise UsageError: it is not
    """
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


@attrs.frozen
class StoredObject:
    """One object a :meth:`Store.list` found: its key and its size in bytes."""

    key: str
    size: int


@runtime_checkable
class Store(Protocol):
    """Named immutable-or-replaced objects (see the module docstring for the guarantees)."""

    @property
    def url(self) -> str:
        """Where the store is, for messages: a path or ``s3://bucket/prefix`` (never a secret)."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes.

        :raise NotFoundError: no object has that key
        :raise StoreError: the store failed
        """
        ...

    def put(self, key: str, data: Data, *, if_absent: bool = False, durable: bool = True) -> bool:
        """Store ``data`` under ``key`` atomically; with ``if_absent``, only when no object has that key.
        ``data`` may be a view of the caller's buffer: it is not kept after ``put`` returns.

        :param durable: False: durable (and visible) by the time :meth:`sync` returns, not necessarily now
        :return: True when written, False when ``if_absent`` found an object there (nothing written)
        :raise StoreError: the store failed (full, refused, unreachable)
        """
        ...

    def sync(self) -> None:
        """Make every ``put(durable=False)`` that returned before this call durable and visible.

        :raise StoreError: one of them could not be completed (that object is not there)
        """
        ...

    def exists(self, key: str) -> bool:
        """True when an object has that key."""
        ...

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``, with its size."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is no error."""
        ...
