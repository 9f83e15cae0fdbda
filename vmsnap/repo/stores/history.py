"""A store read as it was at an earlier time, from its object versions: the view behind ``--as-of TIME``.

For each key the view holds the newest version written at or before TIME; a key whose newest such entry is
a delete marker (or that had none yet) does not exist in it. Later versions (an attacker's overwrites) and
later delete markers are ignored, so a repository emptied or overwritten after TIME reads as it was —
as long as the versions are still there (a locked version stays until its date). The view knows nothing of
what the keys mean: it works for any layout's naming.

The view is read-only (its capabilities say ``writable=False``): a put or delete is refused. It lists the
versions under the store's prefix once, at its first use (one ListObjectVersions request per 1000 versions
on S3), and reads each object with one request for that version.

Times: ISO 8601 in UTC (``2026-12-07T21:30:00Z``). A store lists when each version was written with the
resolution it has (SeaweedFS seconds, AWS milliseconds): a version written during the second TIME names
counts as written by then. A repository location read as of a time is written ``LOCATION?as-of=TIME``, so
that the location alone reopens the same view (a mount's reader in another process does).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Iterable, Iterator, Sequence

import attrs

from vmsnap.errors import NotFoundError, StoreError, UsageError
from vmsnap.repo.stores.base import (
    Data,
    ObjectVersion,
    Retention,
    Store,
    StoreCapabilities,
    StoredObject,
    check_prefix,
)
from vmsnap.repo.stores.wrapper import StoreWrapper

AS_OF = "?as-of="
"""What separates a location from the time it is read at: ``s3://bucket/prefix?as-of=TIME``."""
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]00:?00)$")


def parse_time(text: str) -> dt.datetime:
    """A moment written in ISO 8601 UTC: ``2026-12-07T21:30:00Z`` (fractions of a second allowed).

    :raise UsageError: another form, or a local time without ``Z``
    """
    value = text.strip()
    if not _TIME.match(value):
        raise UsageError(
            f"time {text!r} is not an ISO 8601 UTC time", hint="write it like 2026-12-07T21:30:00Z"
        )
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.UTC)
    except ValueError as err:
        raise UsageError(f"time {text!r}: {err}", hint="write it like 2026-12-07T21:30:00Z") from err


def format_time(moment: dt.datetime) -> str:
    """``moment`` in ISO 8601 UTC, to the second when it has no fraction: ``2026-12-07T21:30:00Z``."""
    moment = moment.astimezone(dt.UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_past(moment: dt.datetime, *, now: dt.datetime | None = None) -> dt.datetime:
    """``moment`` when it is not in the future.

    :raise UsageError: it is
    """
    current = now or dt.datetime.now(dt.UTC)
    if moment > current:
        raise UsageError(
            f"--as-of {format_time(moment)} is in the future "
            f"(it is {format_time(current.replace(microsecond=0))} now)",
            hint="give a time before the damage; `vmsnap list` without --as-of reads the repository as it is",
        )
    return moment


def with_as_of(location: str, moment: dt.datetime | None) -> str:
    """``location`` read as of ``moment`` (unchanged for None)."""
    return location if moment is None else f"{location}{AS_OF}{format_time(moment)}"


def split_as_of(location: str) -> tuple[str, dt.datetime | None]:
    """(location, moment) of ``LOCATION?as-of=TIME``; (location, None) without a time.

    :raise UsageError: a malformed time
    """
    base, sep, when = location.partition(AS_OF)
    return (base, parse_time(when)) if sep else (location, None)


@attrs.frozen
class KeyHistory:
    """When one key was first written, and what happened to it last (for messages about damage)."""

    first_written: dt.datetime | None
    deleted_at: dt.datetime | None
    overwritten_at: dt.datetime | None

    @property
    def damaged_at(self) -> dt.datetime | None:
        """When the key was last deleted or overwritten (None: neither)."""
        return self.deleted_at or self.overwritten_at


def key_history(store: Store, key: str) -> KeyHistory:
    """What the versions of ``key`` say (one listing): when it was first written; when it was deleted (its
    current version is a delete marker); when it was overwritten (its current version replaced another one
    with other content).

    :raise StoreError: the store failed
    """
    versions = [v for v in store.list_versions(key) if v.key == key]
    if not versions:
        return KeyHistory(None, None, None)
    real = [v for v in versions if not v.deleted]
    first = min((v.modified for v in real), default=None)
    newest = versions[0]
    if newest.deleted:
        return KeyHistory(first, newest.modified, None)
    older = [v for v in versions[1:] if not v.deleted]
    replaced = bool(older) and not versions[1].deleted and older[0].etag != newest.etag
    return KeyHistory(first, None, newest.modified if replaced else None)


def before(moment: dt.datetime) -> str:
    """The ``--as-of`` value one second before ``moment`` (to read what was there before it)."""
    return format_time(moment.replace(microsecond=0) - dt.timedelta(seconds=1))


class AsOfStore(StoreWrapper):
    """``store`` as it was at ``moment`` (see the module docstring); read-only.

    :param store: a store that keeps versions (configured to: an S3 bucket with versioning)
    :param moment: the time to read it at (UTC)
    """

    def __init__(self, store: Store, moment: dt.datetime) -> None:
        super().__init__(store)
        self.moment = moment.astimezone(dt.UTC)
        self._lock = threading.Lock()
        self._chosen: dict[str, ObjectVersion] | None = None
        self._first: dict[str, dt.datetime] = {}

    @property
    def url(self) -> str:
        return with_as_of(self._store.url, self.moment)

    @property
    def capabilities(self) -> StoreCapabilities:
        return attrs.evolve(self._store.capabilities, writable=False, reads_into=False)

    def _objects(self) -> dict[str, ObjectVersion]:
        with self._lock:
            if self._chosen is None:
                chosen: dict[str, ObjectVersion] = {}
                decided: set[str] = set()
                for version in self._store.list_versions(""):
                    if not version.deleted:
                        first = self._first.get(version.key)
                        if first is None or version.modified < first:
                            self._first[version.key] = version.modified
                    if version.key in decided or version.modified > self.moment:
                        continue
                    decided.add(version.key)  # the newest at or before the moment: a key's newest come first
                    if not version.deleted:
                        chosen[version.key] = version
                self._chosen = chosen
            return self._chosen

    def first_written(self, key: str) -> dt.datetime | None:
        """When ``key`` was first written (any time, also after the view's moment), or None: never."""
        self._objects()
        return self._first.get(key)

    def get(self, key: str) -> bytes:
        version = self._objects().get(key)
        if version is None:
            raise NotFoundError(
                f"no object {key!r} in {self.url}",
                hint="it did not exist at that time, or was deleted before",
            )
        return self._store.get_version(key, version.version_id)

    def get_into(self, key: str, buffer: memoryview) -> int:
        """:meth:`get` (of the version read), copied into ``buffer``."""
        data = self.get(key)
        if len(data) > len(buffer):
            raise StoreError(f"store {self.url}: object {key} has {len(data)} bytes, more than expected")
        buffer[: len(data)] = data
        return len(data)

    def exists(self, key: str) -> bool:
        return key in self._objects()

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        check_prefix(prefix)
        found = [StoredObject(k, v.size) for k, v in self._objects().items() if k.startswith(prefix)]
        return iter(found)

    def list_versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        """The versions the view reads (one per key), not the store's history."""
        check_prefix(prefix)
        return iter([v for k, v in sorted(self._objects().items()) if k.startswith(prefix)])

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        if version_id is None:
            version = self._objects().get(key)
            if version is None:
                raise NotFoundError(f"no object {key!r} in {self.url}")
            version_id = version.version_id
        return self._store.retention(key, version_id)

    def _read_only(self) -> StoreError:
        return StoreError(
            f"{self.url} is the repository as it was at {format_time(self.moment)}: nothing can be written "
            "there",
            hint="read it (list, verify, restore, mount, copy --from); write to the repository without "
            "--as-of",
        )

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        raise self._read_only()

    def sync(self) -> None:
        """Nothing was written."""

    def delete(self, key: str) -> None:
        raise self._read_only()

    def delete_many(self, keys: Iterable[str]) -> None:
        raise self._read_only()

    def extend_retention(self, keys: Sequence[str], retention: Retention) -> None:
        raise self._read_only()

    def delete_versions(self, versions: Iterable[tuple[str, str]]) -> None:
        raise self._read_only()

    def check_conditional_writes(self) -> None:
        """Nothing to probe: nothing is written."""
