"""A store that passes every call on to another one: the base of views that change one thing about a store
(lock what a repository writes, read it as it was at an earlier time, note what a backup stored) and leave
the rest as it is."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from vmsnap.repo.stores.base import (
    BucketLocking,
    Data,
    ObjectVersion,
    Retention,
    Store,
    StoreCapabilities,
    StoredObject,
)


class StoreWrapper:
    """Every :class:`~vmsnap.repo.stores.base.Store` method, passed on to ``store``; subclasses override
    what they change.

    :param store: the store underneath
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def inner(self) -> Store:
        """The store underneath."""
        return self._store

    @property
    def url(self) -> str:
        return self._store.url

    @property
    def capabilities(self) -> StoreCapabilities:
        return self._store.capabilities

    def get(self, key: str) -> bytes:
        return self._store.get(key)

    def get_into(self, key: str, buffer: memoryview) -> int:
        return self._store.get_into(key, buffer)

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        if retention is None:  # (a store written before retentions existed takes no such argument)
            return self._store.put(key, data, if_absent=if_absent, durable=durable)
        return self._store.put(key, data, if_absent=if_absent, durable=durable, retention=retention)

    def sync(self) -> None:
        self._store.sync()

    def exists(self, key: str) -> bool:
        return self._store.exists(key)

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        return self._store.list(prefix)

    def delete(self, key: str) -> None:
        self._store.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        self._store.delete_many(keys)

    def check_conditional_writes(self) -> None:
        self._store.check_conditional_writes()

    def close(self) -> None:
        self._store.close()

    def locking(self) -> BucketLocking:
        return self._store.locking()

    def list_versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        return self._store.list_versions(prefix)

    def get_version(self, key: str, version_id: str) -> bytes:
        return self._store.get_version(key, version_id)

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        return self._store.retention(key, version_id)

    def extend_retention(self, keys: Sequence[str], retention: Retention) -> None:
        self._store.extend_retention(keys, retention)

    def delete_versions(self, versions: Iterable[tuple[str, str]]) -> None:
        self._store.delete_versions(versions)
