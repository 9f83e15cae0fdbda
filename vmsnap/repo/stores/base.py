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

What differs between stores is data, :class:`StoreCapabilities` (a store's :attr:`Store.capabilities`),
asked for by the layout that uses the store — never found out from the store's class.

A store that keeps **object versions** (:attr:`StoreCapabilities.versions`: an S3 bucket with versioning)
also lists every version of its objects, delete markers included (:meth:`Store.list_versions`), reads one
(:meth:`Store.get_version`) and deletes versions by id (:meth:`Store.delete_versions`); one with **retention
locks** (:attr:`StoreCapabilities.retention_locks`: S3 Object Lock) puts an object with a
:class:`Retention` (a date before which that version cannot be deleted or overwritten), says an object's
retention (:meth:`Store.retention`) and extends it (:meth:`Store.extend_retention`). Whether the store at hand
is configured for them (a bucket created with Object Lock) is :meth:`Store.locking`'s answer. A store class is
registered by URL scheme under the ``vmsnap.stores`` entry point (see :mod:`vmsnap.repo.stores`) and opened
with its :meth:`StoreClass.open_location`; :class:`StoreBase` gives a new store the defaults of what it
need not do differently.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar, Literal, Protocol, runtime_checkable

import attrs

from vmsnap.errors import StoreError, UnsupportedError, UsageError

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


@attrs.frozen(kw_only=True)
class StoreCapabilities:
    """What a store does differently from another, as data (``vmsnap`` asks, never checks a class).

    :param sharded_listing: a listing costs a round trip per page (S3: 1000 keys), so a large listing is
        split into disjoint prefixes (``chunks/0`` … ``chunks/f``) listed in parallel; False: one walk is
        cheaper (a local directory)
    :param conditional_put: who makes ``put(if_absent=True)`` atomic: "store" (the store itself: link,
        ``O_EXCL``), or "server" (a server that is trusted to honour ``If-None-Match: *``: it is probed with
        :meth:`Store.check_conditional_writes` when a repository is created there)
    :param batch_delete: :meth:`Store.delete_many` removes many keys in few requests (S3's DeleteObjects);
        False: it deletes them one by one, and a caller may as well delete on parallel workers
    :param versions: the store can keep earlier versions of objects (and delete markers), so it can be read
        as it was at an earlier time — when it is configured to (:meth:`Store.locking` says whether it is:
        an S3 bucket with versioning enabled); False: a local directory
    :param retention_locks: the store can give an object version a retention date before which nobody can
        delete or overwrite it (S3 Object Lock) — when it is configured to (:meth:`Store.locking`: a bucket
        created with Object Lock)
    :param writable: False for a read-only view (a store read as it was at an earlier time): puts and deletes
        are refused, so nothing that writes (a lease) may be attempted
    :param reads_into: :meth:`Store.get_into` reads an object straight into the caller's buffer (a local
        file: no allocation, and with O_DIRECT no copy through the page cache); False: it is ``get`` and a
        copy, so a caller that can use the bytes ``get`` returns calls ``get``
    :param transfer_threads: requests the chunk pipelines keep in flight through this store at least, each
        waiting on a network and a server rather than on this host's CPUs (S3: 12); 0: no more than the
        CPUs keep busy
    """

    sharded_listing: bool = False
    conditional_put: Literal["store", "server"] = "store"
    batch_delete: bool = False
    versions: bool = False
    retention_locks: bool = False
    writable: bool = True
    reads_into: bool = False
    transfer_threads: int = attrs.field(default=0, validator=attrs.validators.ge(0))

    def to_json(self) -> dict[str, object]:
        """The capabilities as a JSON object."""
        return attrs.asdict(self)


@attrs.frozen
class StoredObject:
    """One object a :meth:`Store.list` found: its key and its size in bytes."""

    key: str
    size: int


LockMode = Literal["compliance", "governance"]
"""S3 Object Lock's two modes: in ``compliance`` nobody can shorten a version's retention or delete it before
its date; in ``governance`` an identity allowed to bypass it (``s3:BypassGovernanceRetention``) can."""
LOCK_MODES: tuple[LockMode, ...] = ("compliance", "governance")


@attrs.frozen
class Retention:
    """An object version's lock: its mode, and the date (UTC) before which it cannot be deleted or
    overwritten."""

    mode: LockMode
    until: dt.datetime = attrs.field(validator=lambda _, __, value: _check_aware(value))

    def covers(self, moment: dt.datetime) -> bool:
        """True when the lock still holds at ``moment``."""
        return self.until > moment


def _check_aware(value: dt.datetime) -> None:
    if value.tzinfo is None:
        raise ValueError("a retention date needs a time zone (UTC)")


@attrs.frozen
class ObjectVersion:
    """One version of an object, as :meth:`Store.list_versions` lists it.

    :param key: the store key
    :param version_id: the store's id of this version
    :param modified: when it was written (UTC; S3 servers list seconds, AWS milliseconds)
    :param size: its size in bytes (0 for a delete marker)
    :param deleted: it is a delete marker (the key reads as missing from then on)
    :param latest: it is the key's current version
    :param etag: the server's entity tag of its content ("" for a delete marker)
    """

    key: str
    version_id: str
    modified: dt.datetime
    size: int
    deleted: bool
    latest: bool
    etag: str = ""


@attrs.frozen
class BucketLocking:
    """How the store at hand keeps versions and locks (:meth:`Store.locking`).

    :param versioning: earlier versions are kept (an S3 bucket's versioning is "Enabled")
    :param object_lock: versions can be locked (the bucket was created with Object Lock)
    :param default_retention: the bucket's default retention rule ("GOVERNANCE, 1 days"), or None: a
        version put without a retention of its own gets that one
    """

    versioning: bool = False
    object_lock: bool = False
    default_retention: str | None = None


@runtime_checkable
class Store(Protocol):
    """Named immutable-or-replaced objects (see the module docstring for the guarantees)."""

    @property
    def url(self) -> str:
        """Where the store is, for messages: a path or ``s3://bucket/prefix`` (never a secret)."""
        ...

    @property
    def capabilities(self) -> StoreCapabilities:
        """What this store does differently (see :class:`StoreCapabilities`)."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes.

        :raise NotFoundError: no object has that key
        :raise StoreError: the store failed
        """
        ...

    def get_into(self, key: str, buffer: memoryview) -> int:
        """Read the object into ``buffer`` (writable, contiguous) and return its size; see
        :attr:`StoreCapabilities.reads_into` for what it saves.

        :raise NotFoundError: no object has that key
        :raise StoreError: the store failed, or the object is larger than ``buffer``
        """
        ...

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        """Store ``data`` under ``key`` atomically; with ``if_absent``, only when no object has that key.
        ``data`` may be a view of the caller's buffer: it is not kept after ``put`` returns.

        :param durable: False: durable (and visible) by the time :meth:`sync` returns, not necessarily now
        :param retention: lock the new version until then (a store with
            :attr:`StoreCapabilities.retention_locks`, configured for them; others refuse it)
        :return: True when written, False when ``if_absent`` found an object there (nothing written)
        :raise StoreError: the store failed (full, refused, unreachable), or refused the retention
        :raise UnsupportedError: a retention, and the store has no retention locks
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

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove these objects (missing ones are no error): in few requests where
        :attr:`StoreCapabilities.batch_delete` says so, else one by one.

        :raise StoreError: the store failed, or refused to delete one of them
        """
        ...

    def check_conditional_writes(self) -> None:
        """Make sure ``put(if_absent=True)`` is refused for an existing key (leases and manifests rely on
        it); asked where :attr:`StoreCapabilities.conditional_put` is "server", when a repository is made.

        :raise StoreError: the store ignores conditional writes, or failed
        """
        ...

    def close(self) -> None:
        """Release connections (the store must not be used afterwards); nothing for a local store."""
        ...

    def locking(self) -> BucketLocking:
        """Whether this store keeps versions and can lock them, as configured now (S3: two requests).

        :raise StoreError: the store failed, or refused to say
        """
        ...

    def list_versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        """Every version of every object whose key starts with ``prefix``, delete markers included: keys in
        ascending order, each key's versions newest first.

        :raise UnsupportedError: the store keeps no versions
        :raise StoreError: the store failed
        """
        ...

    def get_version(self, key: str, version_id: str) -> bytes:
        """The bytes of one version of an object.

        :raise NotFoundError: no such version (or it is a delete marker)
        :raise UnsupportedError: the store keeps no versions
        :raise StoreError: the store failed
        """
        ...

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        """The lock of one version (the current one when ``version_id`` is None), None when it has none.

        :raise NotFoundError: no such object or version
        :raise StoreError: the store failed
        """
        ...

    def extend_retention(self, keys: Sequence[str], retention: Retention) -> None:
        """Lock the current version of each of ``keys`` until at least ``retention.until`` (a version locked
        further already keeps its date; in parallel where the store can).

        :raise NotFoundError: one of them is missing (the first is named)
        :raise UnsupportedError: the store has no retention locks
        :raise StoreError: the store failed, or refused to extend one of them
        """
        ...

    def delete_versions(self, versions: Iterable[tuple[str, str]]) -> None:
        """Delete these (key, version id) versions for good (delete markers too): in few requests where
        :attr:`StoreCapabilities.batch_delete` says so.

        :raise UnsupportedError: the store keeps no versions
        :raise StoreError: the store failed, or refused one of them (a locked version: the first is named)
        """
        ...


class StoreClass(Protocol):
    """What the store registry asks of a store's class: open the store a location names.

    :cvar scheme: the URL scheme it is registered under (its entry point's name, e.g. ``s3``)
    """

    scheme: ClassVar[str]

    @classmethod
    def open_location(cls, location: str, *, create: bool = False) -> Store:
        """The store at ``location`` (a URL of its scheme; for the local store, a directory path).

        :param create: make what is missing where that is the store's business (a local directory); an
            object store's bucket must exist
        :raise UsageError: a malformed location
        :raise StoreError: the store cannot be reached
        """
        ...


class StoreBase:
    """Defaults a store class may inherit for what it need not do differently: the capabilities of a
    plain store, reading into a buffer through ``get``, deleting many keys one by one, nothing to probe,
    nothing to close, no versions and no locks."""

    capabilities: ClassVar[StoreCapabilities] = StoreCapabilities()

    @property
    def url(self) -> str:
        """Where the store is (every store defines it)."""
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        """The object's bytes (every store defines it)."""
        raise NotImplementedError

    def get_into(self, key: str, buffer: memoryview) -> int:
        """``get``, copied into ``buffer``."""
        data = self.get(key)
        if len(data) > len(buffer):
            raise StoreError(f"store {self.url}: object {key} has {len(data)} bytes, more than expected")
        buffer[: len(data)] = data
        return len(data)

    def delete(self, key: str) -> None:
        """Remove the object (every store defines it)."""
        raise NotImplementedError

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete the keys one by one."""
        for key in keys:
            self.delete(key)

    def check_conditional_writes(self) -> None:
        """Nothing to probe: the store makes ``put(if_absent=True)`` atomic itself."""

    def close(self) -> None:
        """Nothing to release."""

    def locking(self) -> BucketLocking:
        """No versions, no locks."""
        return BucketLocking()

    def list_versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        """:raise UnsupportedError: always"""
        raise self._no_versions()

    def get_version(self, key: str, version_id: str) -> bytes:
        """:raise UnsupportedError: always"""
        raise self._no_versions()

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        """None: nothing here is ever locked."""
        return None

    def extend_retention(self, keys: Sequence[str], retention: Retention) -> None:
        """:raise UnsupportedError: always (unless there is nothing to extend)"""
        if keys:
            raise self._no_locks()

    def delete_versions(self, versions: Iterable[tuple[str, str]]) -> None:
        """:raise UnsupportedError: always (unless there is nothing to delete)"""
        if any(True for _ in versions):
            raise self._no_versions()

    def _no_versions(self) -> UnsupportedError:
        where = getattr(self, "url", type(self).__name__)
        return UnsupportedError(
            f"{where} keeps no earlier versions of its objects",
            hint="reading a repository as it was (--as-of) needs an S3 bucket with versioning",
        )

    def _no_locks(self) -> UnsupportedError:
        where = getattr(self, "url", type(self).__name__)
        return UnsupportedError(
            f"{where} cannot lock objects", hint="a locked repository needs an S3 bucket with Object Lock"
        )
