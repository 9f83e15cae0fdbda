"""``gc`` of a ``chunks`` repository: delete the chunks no backup's index names, and the partial backups of
runs that died — never a chunk a kept or running backup needs.

1. **Lock**: ``locks/gc`` is taken (``put(if_absent)``), then the writer and reader leases are listed; while
   any is live, gc lets go of its lock and refuses (or, with ``wait``, tries again until the time is up).
   Writers and readers check ``locks/gc`` after writing their own lease, so neither misses the other (see
   :mod:`vmsnap.repo.chunks.leases`): no backup, prune, restore, verify or copy runs while gc holds it.
2. **Mark**: every manifest is read and checked, and every index it names is read and checked; the ids they
   name are kept. A damaged manifest or index stops gc before anything is deleted (its chunks could be
   needed; run ``verify``, then delete or repair that backup).
3. **Sweep**: the gc generation is replaced (so every host's cache of known chunks is dropped), the partial
   backups (directories without a manifest: with no live writer, their runs are dead) are deleted, then every
   chunk not marked. A gc killed at any point has deleted only what no backup needs; the next one finishes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from vmsnap.errors import LeaseError, RepositoryError
from vmsnap.model import validate_seconds
from vmsnap.processes import crash_point
from vmsnap.repo.chunks.index import ChunkIndex
from vmsnap.repo.chunks.known import bump_generation, list_chunks
from vmsnap.repo.chunks.leases import GC_KEY, READERS, WRITERS, Lease, Leases
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.records import split_backup_key
from vmsnap.repo.manifest import MANIFEST, Damaged, Manifest
from vmsnap.repo.reports import GcReport
from vmsnap.repo.stores.base import Store

RETRY_SECONDS = 2.0
"""How often a waiting gc looks again for running writers and readers."""
DELETE_WORKERS = 8
MARK_WORKERS = 16
"""Indexes read in parallel while marking (each read is a round trip on S3)."""
SWEEP_BATCH = 1000
"""Chunks per batch delete (S3's DeleteObjects takes at most 1000 keys)."""


class GcRepository(Protocol):
    """What gc needs of a ``chunks`` repository."""

    @property
    def store(self) -> Store: ...

    @property
    def leases(self) -> Leases: ...

    @property
    def location(self) -> str: ...

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...


def _take_lock(leases: Leases, wait: float) -> Lease:
    """The gc lock, once no writer or reader lease is live.

    :raise LeaseError: another gc runs, or writers/readers are still live after ``wait`` seconds
    """
    deadline = time.monotonic() + wait
    while True:
        lease = leases.take(GC_KEY, "gc", "a gc")
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


def _mark(repo: GcRepository, workers: int = MARK_WORKERS) -> set[bytes]:
    """Every chunk id an index of a complete backup names. Indexes are read on ``workers`` threads, and an
    index whose sha256 was read already (a backup of a VM that had not changed) is not read again.

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
    return referenced


def _partial_backups(store: Store) -> dict[str, list[str]]:
    """``vm/backup-id`` → the keys of every backup directory without a manifest."""
    dirs: dict[str, list[str]] = {}
    for stored in store.list("vms/"):
        parts = split_backup_key(stored.key)
        if parts is not None:
            dirs.setdefault(f"{parts[0]}/{parts[1]}", []).append(stored.key)
    return {name: keys for name, keys in dirs.items() if not any(k.endswith("/" + MANIFEST) for k in keys)}


def _sweep(store: Store, keys: list[str]) -> None:
    """Delete ``keys``: in batches where the store can (S3's DeleteObjects), else on parallel workers."""
    half = len(keys) // 2
    delete_many: Callable[[Iterable[str]], None] | None = getattr(store, "delete_many", None)
    if delete_many is not None:
        batches = [keys[start : start + SWEEP_BATCH] for start in range(0, len(keys), SWEEP_BATCH)]

        def delete_batch(item: tuple[int, list[str]]) -> None:
            if item[0] * SWEEP_BATCH <= half < (item[0] + 1) * SWEEP_BATCH:
                crash_point("gc-mid-sweep")
            delete_many(item[1])

        BoundedPool(delete_batch, workers=DELETE_WORKERS, depth=DELETE_WORKERS).run(enumerate(batches))
        return

    def delete(item: tuple[int, str]) -> None:
        if item[0] == half:
            crash_point("gc-mid-sweep")
        store.delete(item[1])

    BoundedPool(delete, workers=DELETE_WORKERS, depth=2 * DELETE_WORKERS).run(enumerate(keys))


def collect(repo: GcRepository, *, wait: float = 0.0, dry_run: bool = False) -> GcReport:
    """Run gc on ``repo`` (see the module docstring).

    :param wait: seconds to wait for running writers and readers
    :param dry_run: say what would be freed, delete nothing
    :raise LeaseError: others are using the repository (after ``wait``), or another gc runs
    :raise RepositoryError: a manifest or index is damaged (nothing deleted)
    """
    validate_seconds(wait, "gc wait")
    lease = _take_lock(repo.leases, wait)
    try:
        crash_point("gc-locked")
        referenced = _mark(repo)
        store = repo.store
        partial = _partial_backups(store)
        chunks = list_chunks(store)
        garbage = [stored for stored, chunk_id in chunks if chunk_id not in referenced]
        kept = len(chunks) - len(garbage)
        report = GcReport(
            chunks_kept=kept,
            chunks_freed=len(garbage),
            bytes_freed=sum(g.size for g in garbage),
            partial_backups=tuple(sorted(partial)),
            dry_run=dry_run,
        )
        if dry_run:
            return report
        bump_generation(store)  # before the first delete: every host's cache of known chunks is now stale
        for keys in partial.values():
            for key in sorted(keys):
                store.delete(key)
        _sweep(store, [stored.key for stored in garbage])
        lease.check()
        return report
    finally:
        lease.release()
