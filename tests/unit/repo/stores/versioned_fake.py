"""An in-memory store that keeps versions and locks them — a unit-test double for the logic above the store
(which version a view picks, what gc plans to delete, which locks a backup extends). The real behaviour is
SeaweedFS's: tests/integration/immutable/test_object_lock_server.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence

import attrs

from vmsnap.errors import NotFoundError, StoreError
from vmsnap.repo.stores.base import (
    BucketLocking,
    ObjectVersion,
    Retention,
    StoreBase,
    StoreCapabilities,
    StoredObject,
)

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


@attrs.define
class _Version:
    version_id: str
    modified: dt.datetime
    data: bytes | None  # None: a delete marker
    retention: Retention | None = None


class VersionedFake(StoreBase):
    """Versions in memory; ``now`` is the clock every write is stamped with (move it by hand)."""

    capabilities = StoreCapabilities(versions=True, retention_locks=True, batch_delete=True)

    def __init__(self) -> None:
        self.now = T0
        self.keys: dict[str, list[_Version]] = {}  # newest first
        self._ids = itertools.count(1)
        self.extended: list[tuple[str, dt.datetime]] = []
        self.deleted_versions: list[tuple[str, str]] = []
        self.heads = 0

    @property
    def url(self) -> str:
        return "fake://versions"

    def tick(self, seconds: float = 1.0) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now

    def _add(self, key: str, data: bytes | None, retention: Retention | None = None) -> str:
        version = _Version(f"v{next(self._ids):04d}", self.now, data, retention)
        self.keys.setdefault(key, []).insert(0, version)
        return version.version_id

    def _current(self, key: str) -> _Version | None:
        versions = self.keys.get(key, [])
        return versions[0] if versions and versions[0].data is not None else None

    def get(self, key: str) -> bytes:
        current = self._current(key)
        if current is None or current.data is None:
            raise NotFoundError(key)
        return current.data

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        if if_absent and self._current(key) is not None:
            return False
        self._add(key, data, retention)
        return True

    def sync(self) -> None:
        pass

    def exists(self, key: str) -> bool:
        return self._current(key) is not None

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        for key in sorted(self.keys):
            current = self._current(key)
            if key.startswith(prefix) and current is not None and current.data is not None:
                yield StoredObject(key, len(current.data))

    def delete(self, key: str) -> None:
        if self._current(key) is not None:
            self._add(key, None)

    def locking(self) -> BucketLocking:
        return BucketLocking(True, True, None)

    def list_versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        for key in sorted(self.keys):
            if not key.startswith(prefix):
                continue
            for n, v in enumerate(self.keys[key]):
                yield ObjectVersion(
                    key,
                    v.version_id,
                    v.modified,
                    len(v.data or b""),
                    v.data is None,
                    n == 0,
                    hashlib.md5(v.data).hexdigest() if v.data is not None else "",
                )

    def _version(self, key: str, version_id: str) -> _Version:
        for v in self.keys.get(key, []):
            if v.version_id == version_id:
                return v
        raise NotFoundError(f"{key} {version_id}")

    def get_version(self, key: str, version_id: str) -> bytes:
        version = self._version(key, version_id)
        if version.data is None:
            raise NotFoundError(f"{key} {version_id} is a delete marker")
        return version.data

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        self.heads += 1
        if version_id is None:
            current = self._current(key)
            if current is None:
                raise NotFoundError(key)
            return current.retention
        return self._version(key, version_id).retention

    def extend_retention(self, keys: Sequence[str], retention: Retention) -> None:
        for key in keys:
            current = self._current(key)
            if current is None:
                raise NotFoundError(key)
            if current.retention is None or current.retention.until < retention.until:
                current.retention = retention
            self.extended.append((key, retention.until))

    def delete_versions(self, versions: Iterable[tuple[str, str]]) -> None:
        for key, version_id in versions:
            version = self._version(key, version_id)
            if version.retention is not None and version.retention.covers(self.now):
                raise StoreError(f"{key} {version_id} is locked")
            self.keys[key].remove(version)
            if not self.keys[key]:
                del self.keys[key]
            self.deleted_versions.append((key, version_id))
