"""A locked ``chunks`` repository (S3 Object Lock): which objects are locked for how long, and how the chunks
a backup names are kept locked at least as long as the backup — with few requests.

**What is locked** (the rule a :class:`~vmsnap.repo.stores.retaining.RetainingStore` applies to every put):
a backup's own objects (indexes, definition, manifest, the objects kept beside it, a gc's tombstone) for
the policy's ``days`` from their put; chunks and the marker for ``days + extend_days``. Mutable objects —
leases (``locks/``), ``gc-generation``, ``known-chunks-epoch``, ``vms/<vm>/needs-full``, a backup's
``writer.json`` (deleted when it is sealed), quarantine records (``quarantine/``) — are never locked: they
are rewritten and deleted all the time, and gc removes their old versions.

**Keeping reused chunks locked** (:meth:`ChunkLocks.secure`, when a backup is sealed, before its
manifest): a backup sealed at time *t* must find every chunk it names locked until at least *t + days*
(its manifest, put next, is locked until then). Each manifest records ``chunk_lock``: a date until which
every chunk it names is locked. So at seal:

- a chunk this backup stored is locked until at least start + ``days + extend_days`` (its put);
- a chunk the previous backup of the VM (the parent, or the latest for a full backup) names is locked until
  that backup's ``chunk_lock`` — enough while that date is at least *t + days*;
- any other chunk (found in the store: another VM's, or a killed run's), and every chunk once the previous
  backup's ``chunk_lock`` falls short, gets its lock extended to *t + days + extend_days*: one
  PutObjectRetention each, sent together (16 at a time) — the batch.

So a VM's chunks are extended all at once about every ``extend_days`` (``chunk_lock`` then moves
``extend_days`` ahead), not once per backup; in between a backup extends only the chunks it reuses from
elsewhere. Every seal also extends the marker's lock (one request): the repository must stay readable as
long as its newest backup is locked. A backup that dies during the extension leaves no manifest, so the
next backup of the VM, seeing the same old ``chunk_lock``, extends them all again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Sequence, Set
from typing import Protocol

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.processes import crash_point
from vmsnap.repo.chunks.blob import ChunkId, chunk_key, parse_chunk_key
from vmsnap.repo.chunks.known import EPOCH_KEY, GENERATION_KEY
from vmsnap.repo.chunks.leases import WRITERS
from vmsnap.repo.chunks.quarantine import QUARANTINE
from vmsnap.repo.chunks.records import NEEDS_FULL, VMS, WRITER, manifest_key
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.marker import MARKER, RepoMarker
from vmsnap.repo.stores.base import Retention, Store
from vmsnap.repo.stores.history import format_time, parse_time
from vmsnap.repo.stores.retaining import RetainingStore, RetentionRule, retention_after

LOCKS = WRITERS.split("/", 1)[0] + "/"
"""``locks/``: every lease is under it."""


def is_mutable(key: str) -> bool:
    """True for the objects a ``chunks`` repository rewrites or deletes as it works (never locked): leases,
    the gc generation, the known-chunks epoch, a VM's needs-full mark, the ``writer.json`` of a backup being
    written, the quarantine records of damaged chunks."""
    if key.startswith((LOCKS, QUARANTINE)) or key in (GENERATION_KEY, EPOCH_KEY):
        return True
    parts = key.split("/")
    if not key.startswith(VMS):
        return False
    return (len(parts) == 3 and parts[2] == NEEDS_FULL) or (len(parts) == 4 and parts[3] == WRITER)


def is_write_once(key: str) -> bool:
    """True for the objects vmsnap writes once and never overwrites: chunks, a backup's objects, the marker
    (a second version with other content over one of them is not vmsnap's doing)."""
    if key == MARKER or parse_chunk_key(key) is not None:
        return True
    parts = key.split("/")
    return len(parts) == 4 and key.startswith(VMS) and parts[2][:1].isdigit() and not is_mutable(key)


def retention_rule(policy: LockPolicy) -> RetentionRule:
    """Seconds each new object is locked (see the module docstring)."""

    def rule(key: str) -> float | None:
        if is_mutable(key):
            return None
        if key == MARKER or parse_chunk_key(key) is not None:
            return policy.chunk_seconds
        return policy.seconds

    return rule


def lock_store(store: Store, marker: RepoMarker) -> tuple[Store, ChunkLocks | None]:
    """The store a repository with ``marker`` writes through, and what keeps its chunks locked: for a locked
    repository a :class:`RetainingStore` with :func:`retention_rule`; else ``store`` itself and None.

    :raise RepositoryError: a locked repository in a store that cannot lock
    """
    if marker.lock is None:
        return store, None
    if not store.capabilities.retention_locks:
        raise RepositoryError(
            f"repository {store.url} is locked ({marker.lock.describe()}), and its store cannot lock",
            hint="a locked repository lives in an S3 bucket with Object Lock: open it there",
        )
    retaining = RetainingStore(store, marker.lock.mode, retention_rule(marker.lock))
    return retaining, ChunkLocks(retaining, marker.lock)


def locked_backups(store: Store, vm: str, backup_ids: Sequence[str]) -> dict[str, str]:
    """Which of these backups of ``vm`` ``prune`` must keep: those whose manifest's lock still holds (one
    HeadObject each), with the date it ends. A locked backup's manifest is never deleted (a delete marker over
    it would be allowed, but is how gc recognises an attack)."""
    now = dt.datetime.now(dt.UTC)
    locked: dict[str, str] = {}
    for backup_id in backup_ids:
        with contextlib.suppress(NotFoundError):
            retention = store.retention(manifest_key(vm, backup_id))
            if retention is not None and retention.covers(now):
                locked[backup_id] = format_time(retention.until)
    return locked


class _Latest(Protocol):
    def latest(self, vm: str) -> Manifest | None: ...


def previous_backup(repo: _Latest, vm: str, parent: Manifest | None) -> Manifest | None:
    """The backup of ``vm`` before a new one, whose ``chunk_lock`` says how long the chunks it names are
    locked: the parent of an incremental, else the VM's latest (None when it has none or it is damaged:
    then every chunk the new backup reuses is extended)."""
    if parent is not None:
        return parent
    try:
        return repo.latest(vm)
    except RepositoryError:
        return None


@attrs.frozen
class Sealed:
    """What :meth:`ChunkLocks.secure` made sure of: every chunk is locked until at least ``chunk_lock``
    (UTC ISO 8601, for the manifest), which is no earlier than ``manifest`` — the lock to put the manifest
    with."""

    chunk_lock: str
    manifest: Retention


class ChunkLocks:
    """Keeps the chunks of the backups one process writes locked (see the module docstring); thread-safe.

    :param store: the repository's store (locks configured)
    :param policy: the repository's lock policy
    """

    def __init__(self, store: Store, policy: LockPolicy) -> None:
        self.store = store
        self.policy = policy
        self._lock = threading.Lock()
        self._known: dict[ChunkId, float] = {}
        self.extended = 0
        """Chunk locks this process extended (for reports and benchmarks)."""

    def secure(
        self,
        *,
        named: Set[ChunkId],
        stored: Set[ChunkId],
        started: float,
        previous: Manifest | None,
        previous_ids: Set[ChunkId] | None,
    ) -> Sealed:
        """Make sure every chunk in ``named`` is locked until at least now + ``days`` (the lock the manifest
        is then put with), extending in one batch those that are not known to be.

        :param named: every chunk the new backup's indexes name
        :param stored: the chunks this backup stored (their put locked them)
        :param started: when the backup started (Unix time): its puts came later
        :param previous: the VM's backup before this one (its ``chunk_lock`` covers ``previous_ids``)
        :param previous_ids: every chunk ``previous`` names, or None when they could not all be read
        :raise NotFoundError: a chunk to extend is missing from the store (deleted behind vmsnap's back)
        :raise StoreError: the store failed or refused an extension
        """
        now = time.time()
        manifest = retention_after(self.policy.mode, self.policy.seconds, now)
        need = manifest.until.timestamp()
        stored_until = started + self.policy.chunk_seconds
        previous_until = _chunk_lock(previous)
        previous_usable = previous_until is not None and previous_until >= need and previous_ids is not None
        extend: set[ChunkId] = set()
        bounds: list[float] = []
        if stored:
            if stored_until >= need:
                bounds.append(stored_until)
            else:  # a backup that ran longer than extend_days: its first chunks fall short
                extend |= stored
        used_previous = False
        with self._lock:
            known = dict(self._known)
        for chunk_id in named:
            if chunk_id in stored:
                continue
            until = known.get(chunk_id)
            if until is not None and until >= need:
                bounds.append(until)
            elif previous_usable and previous_ids is not None and chunk_id in previous_ids:
                used_previous = True
            else:
                extend.add(chunk_id)
        if used_previous and previous_until is not None:
            bounds.append(previous_until)
        retention = retention_after(self.policy.mode, self.policy.chunk_seconds, now)
        if extend:
            self._extend(sorted(extend), retention.until)
            bounds.append(retention.until.timestamp())
        self.store.extend_retention([MARKER], retention)
        with self._lock:
            for chunk_id in stored - extend:
                self._known[chunk_id] = max(self._known.get(chunk_id, 0.0), stored_until)
            for chunk_id in extend:
                self._known[chunk_id] = retention.until.timestamp()
        lock = int(min(bounds) if bounds else retention.until.timestamp())  # whole seconds, down: >= need
        return Sealed(format_time(dt.datetime.fromtimestamp(lock, dt.UTC)), manifest)

    def _extend(self, ids: list[ChunkId], until: dt.datetime) -> None:
        """Extend in two halves (a test stops a run between them)."""
        retention = retention_after(self.policy.mode, 0, until.timestamp())
        half = len(ids) // 2
        for part, batch in enumerate((ids[:half], ids[half:])):
            if part == 1:
                crash_point("lock-extension-half")
            self.store.extend_retention([chunk_key(chunk_id) for chunk_id in batch], retention)
            with self._lock:
                self.extended += len(batch)


def _chunk_lock(manifest: Manifest | None) -> float | None:
    if manifest is None or manifest.chunk_lock is None:
        return None
    try:
        return parse_time(manifest.chunk_lock).timestamp()
    except UsageError:
        return None
