"""What gc does in a store that keeps versions, on an in-memory one: which versions it plans to delete, that
it keeps every locked one (and a delete marker over one), that it deletes nothing in a dry run, and that it
stops on a deleted locked manifest or an overwritten chunk."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.unit.repo.stores.versioned_fake import VersionedFake
from vmsnap.errors import RepositoryError
from vmsnap.repo.chunks.blob import ChunkId, chunk_key
from vmsnap.repo.chunks.versions_gc import LockOracle, check_untouched, group, plan_sweep, sweep_versions
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.stores.base import Retention
from vmsnap.repo.stores.history import before

POLICY = LockPolicy.of(1, extend_days=1)
A, B, C = (ChunkId(bytes([n]) * 32) for n in (1, 2, 3))
OLD = "vms/vm/20261101T000000.000000Z-aaaa/"
NEW = "vms/vm/20261130T000000.000000Z-bbbb/"
DEAD = "vms/vm/20261130T100000.000000Z-cccc/"
FENCED = "vms/vm/20261130T110000.000000Z-dddd/"
COMPLETE = {("vm", "20261130T000000.000000Z-bbbb")}
"""What gc's mark found sealed: the new backup (a tombstone at the fenced run's manifest key is none)."""
LEASE = "locks/writers/vm/000000000002"


def _locked(store: VersionedFake, days: float) -> Retention:
    return Retention("compliance", store.now + dt.timedelta(days=days))


def _repository(store: VersionedFake) -> None:
    """A pruned backup (old: chunk A; its locks ended before prune), a kept one (new: chunks B, C), a dead
    run's (index only), a run gc fenced (its writer.json, deleted, and a tombstone at its manifest key),
    leases."""
    store.put(chunk_key(A), b"a", retention=_locked(store, 1))
    store.put(OLD + "disk.index", b"i", retention=_locked(store, 1))
    store.put(OLD + "manifest.json", b"m", retention=_locked(store, 1))
    store.tick(2 * 86400)
    store.put(chunk_key(B), b"b", retention=_locked(store, 40))
    store.put(chunk_key(C), b"c", retention=_locked(store, 40))
    store.put(NEW + "disk.index", b"i", retention=_locked(store, 30))
    store.put(NEW + "manifest.json", b"m", retention=_locked(store, 30))
    store.put(DEAD + "disk.index", b"i", retention=_locked(store, 30))
    store.put(FENCED + "writer.json", b"w")
    store.delete(FENCED + "writer.json")
    store.put(FENCED + "manifest.json", b"tombstone", retention=_locked(store, 30))
    store.put("locks/writers/vm/000000000001", b"1")
    store.delete("locks/writers/vm/000000000001")  # taken over: the entry below the new head is removed
    store.put(LEASE, b"2")
    store.put(LEASE, b"3")  # renewed
    store.put("locks/readers/x", b"r")
    store.delete("locks/readers/x")
    store.delete(OLD + "manifest.json")  # prune, once the old backup's lock had ended
    store.delete(OLD + "disk.index")


def _oracle(store: VersionedFake) -> LockOracle:
    return LockOracle(store, store.locking(), POLICY, store.now)


def test_the_plan_takes_garbage_whole_and_only_the_history_of_what_is_kept() -> None:
    store = VersionedFake()
    _repository(store)
    history = group(store.list_versions(""))
    candidates, whole, kept = plan_sweep(history, {B, C}, COMPLETE)
    assert kept == 2
    assert whole == {chunk_key(A), OLD + "disk.index", OLD + "manifest.json", DEAD + "disk.index",
                     FENCED + "writer.json", "locks/readers/x", "locks/writers/vm/000000000001"}  # fmt: skip
    planned = {(v.key, v.deleted) for v in candidates}
    assert (LEASE, False) in planned and len([v for v in candidates if v.key == LEASE]) == 1
    assert not {k for k, _ in planned} & {chunk_key(B), chunk_key(C), NEW + "manifest.json"}
    assert FENCED + "manifest.json" not in {k for k, _ in planned}  # the tombstone stays


def test_the_sweep_keeps_what_is_locked_and_the_delete_markers_over_it() -> None:
    store = VersionedFake()
    _repository(store)
    history = group(store.list_versions(""))
    oracle = _oracle(store)
    unfinished = {"vm/20261130T100000.000000Z-cccc", "vm/20261130T110000.000000Z-dddd"}
    dry = sweep_versions(store, history, {B, C}, COMPLETE, unfinished, oracle, dry_run=True)
    assert store.deleted_versions == [] and dry.versions_freed > 0
    checks: list[int] = []
    done = sweep_versions(
        store, history, {B, C}, COMPLETE, unfinished, _oracle(store), dry_run=False,
        check=lambda: checks.append(1), group_size=2,
    )  # fmt: skip
    assert done.chunks_freed == 1 and done.locked_versions == 1  # the dead run's index, locked
    assert done.partial_backups == ("vm/20261130T110000.000000Z-dddd",)  # the other's index is held
    assert len(checks) == (done.versions_freed + 1) // 2 + 1  # before each group of 2 (the markers last)
    assert not store.exists(chunk_key(A)) and chunk_key(A) not in store.keys
    assert OLD + "manifest.json" not in store.keys and "locks/readers/x" not in store.keys
    assert len(store.keys[LEASE]) == 1 and store.exists(chunk_key(B))
    assert "locks/writers/vm/000000000001" not in store.keys and FENCED + "writer.json" not in store.keys
    assert store.get(FENCED + "manifest.json") == b"tombstone"
    assert len(store.keys[DEAD + "disk.index"]) == 1  # locked: kept (no delete marker was over it)
    assert done.present == frozenset({B, C})


def test_gc_stops_on_a_deleted_locked_manifest_or_an_overwritten_chunk() -> None:
    store = VersionedFake()
    _repository(store)
    oracle = _oracle(store)
    check_untouched(group(store.list_versions("")), POLICY, locked=oracle.ask)  # prune's own deletes: fine
    store.tick()
    store.delete(NEW + "manifest.json")
    with pytest.raises(RepositoryError, match=r"was deleted at .* while locked until"):
        check_untouched(group(store.list_versions("")), POLICY, locked=_oracle(store).ask)
    other = VersionedFake()
    _repository(other)
    other.put(chunk_key(C), b"c")  # the same content again: a resent put
    check_untouched(group(other.list_versions("")), POLICY, locked=_oracle(other).ask)
    other.put(chunk_key(C), b"ransom")
    with pytest.raises(RepositoryError, match="was overwritten at") as stopped:
        check_untouched(group(other.list_versions("")), POLICY, locked=_oracle(other).ask)
    assert f"--as-of {before(other.now)}" in str(stopped.value)
