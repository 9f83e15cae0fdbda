"""``gc`` of a ``chunks`` repository in a store that keeps object versions (an S3 bucket with versioning, and
Object Lock for a locked repository): there a delete only adds a delete marker, so space is freed by
deleting versions — and never one that a lock holds.

From one listing of every version (ListObjectVersions) and gc's mark set (:mod:`vmsnap.repo.chunks.gc`):

- **Tampering stops gc before anything is deleted**: a backup's manifest with a delete marker over a version
  whose lock still holds (vmsnap's prune never removes a locked backup), or a second version with other
  content over a chunk, a backup's object or the marker (vmsnap writes those once). Then the repository was
  attacked: read it ``--as-of`` a time before (the message names one).
- **What goes** (each version only once no lock holds it): every version of an unreferenced chunk, of the
  objects of a backup gc's mark did not find complete (pruned, or a dead run's: fenced), and of any key
  whose current version is a delete marker; the older versions of every other key (an overwritten object's,
  and the old versions of leases, ``gc-generation``, ``writer.json``, quarantine records and the other
  mutable objects, which are never locked — so they are removed at every gc). A fenced run's tombstone (the
  current version at its manifest's key) stays, as in a store without versions. A delete marker goes last,
  once no version is left under it (else an older version would become current again). A chunk a kept
  backup names keeps every version even when a delete marker hides it (``verify`` moved it aside, or it is
  not vmsnap's doing): ``verify`` reports it, the next backup stores it again, and then the older versions
  go.
- **Whether a version is locked** is decided without trying to delete it: a delete marker, or a mutable
  object's version in a bucket without a default retention, is not; a version younger than the repository's
  lock ``days`` (less a minute for the clocks) is (every locked put lasts at least that long); any other is
  asked (one HeadObject each, 16 at a time). A locked version stays, and the report says how many, how big,
  and when the first frees up.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable, Sequence, Set

import attrs

from vmsnap.errors import NotFoundError, RepositoryError
from vmsnap.processes import crash_point
from vmsnap.repo.chunks.blob import ChunkId, parse_chunk_key
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.records import split_backup_key
from vmsnap.repo.chunks.retain import is_mutable, is_write_once
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.manifest import MANIFEST
from vmsnap.repo.stores.base import BucketLocking, ObjectVersion, Store
from vmsnap.repo.stores.history import before, format_time

HEAD_WORKERS = 16
"""HeadObject requests in flight while gc asks for versions' locks."""
CLOCK_SKEW = 60.0
"""Seconds the server's clock (which stamps a version) may be ahead of the host's (which dated its lock): a
version younger than the policy's days less this is locked for sure; an older one is asked."""


@attrs.frozen
class VersionSweep:
    """What the version sweep found and did.

    :param chunks_kept: referenced chunks (current versions)
    :param chunks_freed: unreferenced chunks all of whose versions went
    :param versions_freed: versions and delete markers deleted, of every key
    :param bytes_freed: their size
    :param partial_backups: ``vm/backup-id`` of the backups never sealed (dead runs') whose objects went
    :param locked_versions: versions gc would delete but a lock holds
    :param locked_bytes: their size
    :param next_unlock: when the first of them frees up (UTC ISO 8601; at the latest), or None
    :param present: the chunks whose current version is an object (not a delete marker) that stays
    """

    chunks_kept: int
    chunks_freed: int
    versions_freed: int
    bytes_freed: int
    partial_backups: tuple[str, ...]
    locked_versions: int
    locked_bytes: int
    next_unlock: str | None
    present: frozenset[ChunkId] = frozenset()


VersionHistory = dict[str, list[ObjectVersion]]
"""Key → its versions, newest first."""


def group(versions: Iterable[ObjectVersion]) -> VersionHistory:
    """Key → its versions, newest first (the order the store lists them in)."""
    grouped: dict[str, list[ObjectVersion]] = {}
    for version in versions:
        grouped.setdefault(version.key, []).append(version)
    return grouped


def check_untouched(
    history: dict[str, list[ObjectVersion]],
    policy: LockPolicy | None,
    *,
    locked: Callable[[ObjectVersion], dt.datetime | None],
) -> None:
    """Stop when the repository was tampered with (see the module docstring).

    :raise RepositoryError: a locked manifest was deleted, or a write-once object was overwritten
    """
    for key, versions in sorted(history.items()):
        newest = versions[0]
        overwritten = len(versions) > 1 and not newest.deleted and not versions[1].deleted
        if overwritten and is_write_once(key) and versions[1].etag != newest.etag:
            raise _tampered(f"{key} was overwritten at {format_time(newest.modified)}", newest.modified)
        parts = split_backup_key(key)
        if policy is None or parts is None or parts[2] != MANIFEST or not newest.deleted:
            continue
        for version in versions[1:]:  # (an overwrite under the delete marker may hide the locked one)
            if version.deleted:
                continue
            until = locked(version)
            if until is not None:
                raise _tampered(
                    f"backup {parts[0]}/{parts[1]} was deleted at {format_time(newest.modified)} while "
                    f"locked until {format_time(until)} (prune never removes a locked backup)",
                    newest.modified,
                )


def _tampered(what: str, when: dt.datetime) -> RepositoryError:
    return RepositoryError(
        f"gc stopped before deleting anything: {what} — not vmsnap's doing",
        hint=f"the repository was tampered with: read it as it was with --as-of {before(when)} (list, "
        "verify, restore, copy to a new bucket), and rotate the credentials of the hosts that write it",
    )


class LockOracle:
    """Whether a version is still locked, asked of the store only when it cannot be told (see the module
    docstring); thread-safe, each version asked at most once."""

    def __init__(self, store: Store, locking: BucketLocking, policy: LockPolicy | None, now: dt.datetime):
        self.store = store
        self.locking = locking
        self.policy = policy
        self.now = now
        self._lock = threading.Lock()
        self._asked: dict[tuple[str, str], dt.datetime | None] = {}
        self.heads = 0

    def known(self, version: ObjectVersion) -> tuple[bool, dt.datetime | None]:
        """(decided, until): decided without a request; until is None when not locked."""
        if version.deleted or not self.locking.object_lock:
            return True, None
        if is_mutable(version.key) and self.locking.default_retention is None:
            return True, None
        if self.policy is not None:  # every locked put lasts the policy's days (less the clocks' skew)
            at_least = version.modified + dt.timedelta(seconds=self.policy.seconds - CLOCK_SKEW)
            if at_least > self.now:
                return True, at_least
        with self._lock:
            if (version.key, version.version_id) in self._asked:
                return True, self._asked[(version.key, version.version_id)]
        return False, None

    def ask(self, version: ObjectVersion) -> dt.datetime | None:
        """The date the version is locked until (None: not locked, or gone), asking the store if need be."""
        decided, until = self.known(version)
        if decided:
            return until
        try:
            retention = self.store.retention(version.key, version.version_id)
        except NotFoundError:
            retention = None
        result = retention.until if retention is not None and retention.covers(self.now) else None
        with self._lock:
            self.heads += 1
            self._asked[(version.key, version.version_id)] = result
        return result

    def ask_all(self, versions: Sequence[ObjectVersion]) -> None:
        """Ask for every version not decided yet, :data:`HEAD_WORKERS` at a time."""
        todo = [v for v in versions if not self.known(v)[0]]

        def ask(version: ObjectVersion) -> None:
            self.ask(version)

        BoundedPool(ask, workers=HEAD_WORKERS, depth=2 * HEAD_WORKERS).run(todo)


def plan_sweep(
    history: dict[str, list[ObjectVersion]], referenced: Set[bytes], complete: Set[tuple[str, str]]
) -> tuple[list[ObjectVersion], set[str], int]:
    """(the versions to delete if unlocked, newest first per key; the keys whose every version is to go;
    the chunks kept) — see the module docstring. ``complete``: the (vm, backup id) of every backup gc's mark
    found sealed."""
    candidates: list[ObjectVersion] = []
    whole: set[str] = set()
    kept = 0
    for key, versions in history.items():
        newest = versions[0]
        garbage = newest.deleted
        chunk_id = parse_chunk_key(key)
        if chunk_id is not None and chunk_id in referenced:
            if newest.deleted:
                continue
            kept += 1
        elif chunk_id is not None:
            garbage = True
        parts = split_backup_key(key)
        if parts is not None and (parts[0], parts[1]) not in complete:
            # a fenced run's tombstone stays (its writer must never seal); every other object goes
            garbage = garbage or parts[2] != MANIFEST
        if garbage:
            whole.add(key)
            candidates.extend(versions)
        else:
            candidates.extend(versions[1:])
    return candidates, whole, kept


def sweep_versions(
    store: Store,
    history: dict[str, list[ObjectVersion]],
    referenced: Set[bytes],
    complete: Set[tuple[str, str]],
    unfinished: Set[str],
    oracle: LockOracle,
    *,
    dry_run: bool,
    check: Callable[[], None] = lambda: None,
    group_size: int = 8000,
) -> VersionSweep:
    """Delete every version :func:`plan_sweep` names that no lock holds (delete markers over others last),
    in groups of ``group_size``, calling ``check`` before each (gc: its lock is still its own).

    :param unfinished: ``vm/backup-id`` of the runs gc fenced (reported once none of their objects is held)
    """
    candidates, whole, kept = plan_sweep(history, referenced, complete)
    oracle.ask_all(candidates)
    free: list[ObjectVersion] = []
    held: list[tuple[ObjectVersion, dt.datetime]] = []
    for version in candidates:
        until = oracle.ask(version)
        if until is None:
            free.append(version)
        else:
            held.append((version, until))
    freed_ids = {(v.key, v.version_id) for v in free}
    held_keys = {version.key for version, _ in held}

    def alone(version: ObjectVersion) -> bool:
        """A current delete marker with every version under it going: it may go too."""
        return all((v.key, v.version_id) in freed_ids for v in history[version.key][1:])

    first = [v for v in free if not (v.deleted and v.latest)]
    last = [v for v in free if v.deleted and v.latest and alone(v)]
    deleted = first + last
    if not dry_run:
        crash_point("gc-before-versions")
        half = len(deleted) // 2
        for part in (first, last):
            for start in range(0, len(part), group_size):
                chunk = part[start : start + group_size]
                if part is first and start <= half < start + len(chunk):
                    crash_point("gc-mid-sweep")
                check()  # a writer took the lock over (this gc was stopped past its lease): stop here
                store.delete_versions((v.key, v.version_id) for v in chunk)
    gone = whole - held_keys
    held_prefixes = {"/".join(v.key.split("/")[:3]) + "/" for v, _ in held}
    present = frozenset(
        chunk_id
        for key, versions in history.items()
        if not versions[0].deleted and key not in gone and (chunk_id := parse_chunk_key(key)) is not None
    )
    return VersionSweep(
        chunks_kept=kept,
        chunks_freed=sum(1 for key in gone if parse_chunk_key(key) is not None),
        versions_freed=len(deleted),
        bytes_freed=sum(v.size for v in deleted),
        partial_backups=tuple(sorted(p for p in unfinished if f"vms/{p}/" not in held_prefixes)),
        locked_versions=len(held),
        locked_bytes=sum(v.size for v, _ in held),
        next_unlock=format_time(min(until for _, until in held)) if held else None,
        present=present,
    )
