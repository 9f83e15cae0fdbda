"""``gc`` of a ``chunks`` repository: delete the chunks no backup's index names, and the partial backups of
runs that died — never a chunk a kept backup needs, nor one a backup that is still to be sealed will name.

1. **Lock**: the gc lock (a lease series, :mod:`vmsnap.repo.chunks.leases`) is taken, then the writer and
   reader leases are listed; while any is live, gc releases its lock and refuses (or, with ``wait``, tries
   again until the time is up). Writers and readers check the gc lock after writing their own lease, so
   neither misses the other.
2. **Fence**: the gc generation is replaced (so every host's cache of known chunks is dropped), then every
   backup directory without a manifest — a run that died, or one stopped for longer than its lease — gets a
   tombstone at its manifest's key, written with ``put(if_absent)``: its writer seals with
   ``put(if_absent)`` on the same key, so exactly one of them wins. A writer that loses fails ("a gc fenced
   this backup"); a manifest that won is a complete backup, and the mark below reads it.
3. **Mark**: every manifest is read and checked, and every index it names is read and checked; the ids they
   name are kept. A damaged manifest or index stops gc before anything is deleted (its chunks could be
   needed; run ``verify``, then delete or repair that backup).
4. **Sweep**: the fenced backups' objects are deleted (the tombstones stay), then every chunk not marked
   that the store held when the mark was done, in groups; before each group gc checks that its lock is
   still its own (a writer takes over a gc lock that is not live, and then gc stops). The quarantine
   records (:mod:`vmsnap.repo.chunks.quarantine`) of chunks that are back, or that no backup names any
   more, are removed. Last, the generation is replaced again, so that no cache made while gc deleted
   survives it.

Why a sealed backup never loses a chunk: its writer opens its backup directory (a ``writer.json`` object)
before it reads the gc lock a second time and before it learns which chunks exist. A gc that listed the
directories before that object appeared held its lock when the writer looked again: the writer refused (a
live lock) or took the lock over and replaced the generation (a lock that was not live), so the writer
lists the store afresh after whatever that gc deleted, and that gc deletes no further group. A gc that
listed the directories after that object appeared either fenced the backup (the writer fails at its seal)
or found its manifest, and kept what it names.

On one host all of this holds whatever the clock says: a lease taken on this host is live as long as its
process exists (see :mod:`vmsnap.repo.chunks.leases`), so a stopped gc keeps its lock and a stopped writer
its lease. Across hosts leases expire, and one window is left that no lease can fence on a store without
conditional deletes: a gc on another host stopped for longer than its lease after its last check of the
lock and before the delete request of that group reaches the store (the writer that took the lock over may
rely on a chunk of that group). gc checks before every group of :data:`SWEEP_GROUP` deletes.

A gc killed at any point has deleted only what no backup needs; the next one finishes.

In a store that keeps object versions (an S3 bucket with versioning; a locked repository's always does) a
delete frees nothing, so the sweep deletes versions instead — only those no lock holds, after checking
that nobody tampered with the repository (:mod:`vmsnap.repo.chunks.versions_gc`). There every version is
listed, and the tampering checked, right after the lock is taken — before the fence, whose tombstone would
cover a manifest deleted behind vmsnap's back; then fence and mark as above, and the sweep deletes only
versions of that listing (what is written later is never touched, the fence's tombstones included).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Protocol

from vmsnap.errors import LeaseError, NotFoundError, RepositoryError, StoreError
from vmsnap.model import validate_seconds
from vmsnap.processes import crash_point
from vmsnap.repo.chunks.index import ChunkIndex
from vmsnap.repo.chunks.known import bump_generation, list_chunks
from vmsnap.repo.chunks.leases import GC_SERIES, READERS, WRITERS, Lease, Leases
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.quarantine import clear as clear_records
from vmsnap.repo.chunks.quarantine import quarantined_ids
from vmsnap.repo.chunks.records import encode_tombstone, is_tombstone, manifest_key, split_backup_key
from vmsnap.repo.chunks.versions_gc import LockOracle, VersionHistory, check_untouched, group, sweep_versions
from vmsnap.repo.manifest import MANIFEST, Damaged, Manifest
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.reports import GcReport
from vmsnap.repo.stores.base import BucketLocking, Store

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0
"""How often a waiting gc looks again for running writers and readers."""
DELETE_WORKERS = 8
MARK_WORKERS = 16
"""Indexes read in parallel while marking (each read is a round trip on S3)."""
SWEEP_BATCH = 1000
"""Chunks per batch delete (S3's DeleteObjects takes at most 1000 keys)."""
SWEEP_GROUP = SWEEP_BATCH * DELETE_WORKERS
"""Chunks deleted between two checks of the gc lock."""


class GcRepository(Protocol):
    """What gc needs of a ``chunks`` repository."""

    @property
    def store(self) -> Store: ...

    @property
    def leases(self) -> Leases: ...

    @property
    def location(self) -> str: ...

    @property
    def marker(self) -> RepoMarker: ...

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...


def _take_lock(leases: Leases, wait: float) -> Lease:
    """The gc lock, once no writer or reader lease is live.

    :raise LeaseError: another gc runs, or writers/readers are still live after ``wait`` seconds
    """
    deadline = time.monotonic() + wait
    while True:
        lease = leases.take(GC_SERIES, "gc", "a gc")
        busy = leases.live(WRITERS) + leases.live(READERS)
        if not busy:
            return lease
        lease.release()  # never hold the lock while waiting: writers would refuse meanwhile
        if time.monotonic() >= deadline:
            raise LeaseError(
                f"{len(busy)} run(s) are using the repository; first: {busy[0][1].describe()}",
                hint="run gc when they have finished, or pass --wait SECONDS",
            )
        time.sleep(min(RETRY_SECONDS, max(0.0, deadline - time.monotonic())) or 0.1)


def _mark(repo: GcRepository, workers: int = MARK_WORKERS) -> tuple[set[bytes], list[Manifest]]:
    """Every chunk id an index of a complete backup names, and those backups. Indexes are read on ``workers``
    threads, and an index whose sha256 was read already (a backup of a VM that had not changed) is not read
    again.

    :raise RepositoryError: a manifest or index is damaged (nothing is deleted then)
    """
    damaged: list[Damaged] = []
    manifests = repo.backups(damaged=damaged)
    if damaged:
        raise RepositoryError(
            f"gc stopped before deleting anything: {damaged[0].vm}/{damaged[0].backup_id}: "
            f"{damaged[0].error.message}",
            hint="run `vmsnap verify`; delete that backup or restore its manifest, then gc again",
        )
    todo: dict[str, tuple[Manifest, str]] = {}
    for manifest in manifests:
        for record in manifest.disks:
            todo.setdefault(record.sha256, (manifest, record.name))
    referenced: set[bytes] = set()
    lock = threading.Lock()

    def mark(item: tuple[Manifest, str]) -> None:
        manifest, disk = item
        try:
            ids = repo.index(manifest, disk).referenced()
        except RepositoryError as err:
            raise RepositoryError(
                f"gc stopped before deleting anything: {manifest.vm}/{manifest.backup_id}/{disk}: "
                f"{err.message}",
                hint="run `vmsnap verify`; delete that backup or restore its index, then gc again",
            ) from err
        with lock:
            referenced.update(ids)

    BoundedPool(mark, workers=workers, depth=2 * workers).run(todo.values())
    return referenced, manifests


def _backup_dirs(store: Store) -> dict[tuple[str, str], list[str]]:
    """(vm, backup id) → the keys of every backup directory."""
    dirs: dict[tuple[str, str], list[str]] = {}
    for stored in store.list("vms/"):
        parts = split_backup_key(stored.key)
        if parts is not None:
            dirs.setdefault((parts[0], parts[1]), []).append(stored.key)
    return dirs


def _partial(dirs: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    return {name: keys for name, keys in dirs.items() if not any(k.endswith("/" + MANIFEST) for k in keys)}


def _fence(store: Store, dirs: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    """Put a tombstone at the manifest key of every backup directory without a manifest (``if_absent``: a
    writer that sealed first keeps its backup); the fenced directories and their keys."""
    fenced = {}
    for (vm, backup_id), keys in sorted(_partial(dirs).items()):
        tombstone = encode_tombstone("gc fenced its unfinished run")
        if store.put(manifest_key(vm, backup_id), tombstone, if_absent=True):
            fenced[(vm, backup_id)] = keys
    return fenced


def _abandoned(
    store: Store, dirs: dict[tuple[str, str], list[str]], complete: set[tuple[str, str]]
) -> dict[tuple[str, str], list[str]]:
    """Directories whose manifest key holds a tombstone but which still hold other objects (a gc died
    between fencing them and deleting them): those other objects."""
    found = {}
    for (vm, backup_id), keys in dirs.items():
        key = manifest_key(vm, backup_id)
        others = [k for k in keys if k != key]
        if (vm, backup_id) in complete or key not in keys or not others:
            continue
        try:
            if is_tombstone(store.get(key)):
                found[(vm, backup_id)] = others
        except NotFoundError:
            continue
    return found


def _delete(store: Store, keys: list[str]) -> None:
    """Delete ``keys``: in batches where the store can (S3's DeleteObjects), else on parallel workers."""
    if store.capabilities.batch_delete:
        batches = [keys[start : start + SWEEP_BATCH] for start in range(0, len(keys), SWEEP_BATCH)]
        BoundedPool(store.delete_many, workers=DELETE_WORKERS, depth=DELETE_WORKERS).run(batches)
        return
    BoundedPool(store.delete, workers=DELETE_WORKERS, depth=2 * DELETE_WORKERS).run(keys)


def _sweep(store: Store, keys: list[str], lease: Lease) -> None:
    """Delete ``keys`` in groups, checking before each that the gc lock is still this process's (the step
    ``gc-mid-sweep`` is before the group that holds the middle key, before its check)."""
    half = len(keys) // 2
    for start in range(0, len(keys), SWEEP_GROUP):
        part = keys[start : start + SWEEP_GROUP]
        if start <= half < start + len(part):
            crash_point("gc-mid-sweep")
        lease.check()  # a writer took the lock over (this gc was stopped past its lease): stop here
        _delete(store, part)


def collect(repo: GcRepository, *, wait: float = 0.0, dry_run: bool = False) -> GcReport:
    """Run gc on ``repo`` (see the module docstring).

    :param wait: seconds to wait for running writers and readers
    :param dry_run: say what would be freed, change nothing
    :raise LeaseError: others are using the repository (after ``wait``), another gc runs, or this gc's lock
        was taken over while it was stopped (it stops deleting then)
    :raise RepositoryError: a manifest or index is damaged (nothing deleted)
    """
    validate_seconds(wait, "gc wait")
    lease = _take_lock(repo.leases, wait)
    try:
        crash_point("gc-locked")
        store = repo.store
        locking = _locking(repo)
        history = _history(repo, locking) if locking.versioning else None
        dirs = _backup_dirs(store)
        if dry_run:
            unfinished = _partial(dirs)
        else:
            bump_generation(store)  # before the first delete: every host's cache of known chunks is now stale
            unfinished = _fence(store, dirs)
            crash_point("gc-fenced")
        referenced, manifests = _mark(repo)
        complete = {(m.vm, m.backup_id) for m in manifests}
        unfinished.update(_abandoned(store, dirs, complete))
        if history is not None:
            unfinished_names = {f"{vm}/{backup_id}" for vm, backup_id in unfinished}
            return _collect_versions(repo, history, referenced, complete, unfinished_names, lease, dry_run)
        chunks = list_chunks(store)
        garbage = [stored for stored, chunk_id in chunks if chunk_id not in referenced]
        report = GcReport(
            chunks_kept=len(chunks) - len(garbage),
            chunks_freed=len(garbage),
            bytes_freed=sum(g.size for g in garbage),
            partial_backups=tuple(sorted(f"{vm}/{backup_id}" for vm, backup_id in unfinished)),
            dry_run=dry_run,
        )
        if dry_run:
            return report
        crash_point("gc-marked")
        for (vm, backup_id), keys in sorted(unfinished.items()):
            tombstone = manifest_key(vm, backup_id)
            for key in sorted(keys):
                if key != tombstone:
                    store.delete(key)
        _sweep(store, [stored.key for stored in garbage], lease)
        crash_point("gc-swept")
        present = {chunk_id for _, chunk_id in chunks}
        # the records of chunks that are back (healed) or that no backup names any more
        clear_records(store, [c for c in quarantined_ids(store) if c in present or c not in referenced])
        bump_generation(store)  # no cache made while this gc deleted outlives it
        lease.check()
        return report
    finally:
        lease.release()


def _locking(repo: GcRepository) -> BucketLocking:
    """Whether the store keeps versions (and locks them). Where it may not say (credentials without
    s3:GetBucketVersioning) an unlocked repository is collected as in a store without versions (deletes
    that free nothing if it keeps them); a locked one is not collected at all.

    :raise StoreError: the store failed, or would not say for a locked repository
    """
    store = repo.store
    if not store.capabilities.versions:
        return BucketLocking()
    try:
        return store.locking()
    except StoreError as err:
        if repo.marker.lock is not None:
            raise
        log.warning("gc of %s: %s; collecting as in a bucket without versions", repo.location, err.message)
        return BucketLocking()


def _history(repo: GcRepository, locking: BucketLocking) -> tuple[VersionHistory, LockOracle]:
    """Every version in the store, checked for tampering (see :mod:`vmsnap.repo.chunks.versions_gc`).

    :raise RepositoryError: the repository was tampered with (nothing is written or deleted then)
    """
    history = group(repo.store.list_versions(""))
    oracle = LockOracle(repo.store, locking, repo.marker.lock, dt.datetime.now(dt.UTC))
    check_untouched(history, repo.marker.lock, locked=oracle.ask)
    return history, oracle


def _collect_versions(
    repo: GcRepository,
    listed: tuple[VersionHistory, LockOracle],
    referenced: set[bytes],
    complete: set[tuple[str, str]],
    unfinished: set[str],
    lease: Lease,
    dry_run: bool,
) -> GcReport:
    """The sweep of a store that keeps versions (see the module docstring), after the fence and the mark:
    the versions of the listing ``listed`` that no lock holds, in groups of :data:`SWEEP_GROUP` with the gc
    lock checked before each."""
    store = repo.store
    history, oracle = listed
    crash_point("gc-marked")
    sweep = sweep_versions(
        store,
        history,
        referenced,
        complete,
        unfinished,
        oracle,
        dry_run=dry_run,
        check=lease.check,
        group_size=SWEEP_GROUP,
    )
    if not dry_run:
        crash_point("gc-swept")
        # the records of chunks that are back (healed) or that no backup names any more
        clear_records(store, [c for c in quarantined_ids(store) if c in sweep.present or c not in referenced])
        bump_generation(store)  # no cache made while this gc deleted outlives it
        lease.check()
    return GcReport(
        chunks_kept=sweep.chunks_kept,
        chunks_freed=sweep.chunks_freed,
        bytes_freed=sweep.bytes_freed,
        partial_backups=sweep.partial_backups,
        dry_run=dry_run,
        versions_freed=sweep.versions_freed,
        locked_versions=sweep.locked_versions,
        locked_bytes=sweep.locked_bytes,
        next_unlock=sweep.next_unlock,
    )
