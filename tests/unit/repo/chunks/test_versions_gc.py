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


def _locked(store: VersionedFake, days: float) -> Retention:
    return Retention("compliance", store.now + dt.timedelta(days=days))


def _repository(store: VersionedFake) -> None:
    """A pruned backup (old: chunk A; its locks ended before prune), a kept one (new: chunks B, C), a dead
    run's (index only), leases."""
    store.put(chunk_key(A), b"a", retention=_locked(store, 1))
    store.put(OLD + "disk.index", b"i", retention=_locked(store, 1))
    store.put(OLD + "manifest.json", b"m", retention=_locked(store, 1))
    store.tick(2 * 86400)
    store.put(chunk_key(B), b"b", retention=_locked(store, 40))
    store.put(chunk_key(C), b"c", retention=_locked(store, 40))
    store.put(NEW + "disk.index", b"i", retention=_locked(store, 30))
    store.put(NEW + "manifest.json", b"m", retention=_locked(store, 30))
    store.put(DEAD + "disk.index", b"i", retention=_locked(store, 30))
    store.put("locks/vms/vm", b"1")
    store.put("locks/vms/vm", b"2")
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
    candidates, whole, partial, kept = plan_sweep(history, {B, C})
    assert kept == 2 and partial == {"vm/20261130T100000.000000Z-cccc"}  # the pruned one is not partial
    assert whole == {chunk_key(A), OLD + "disk.index", OLD + "manifest.json", DEAD + "disk.index",
                     "locks/readers/x"}  # fmt: skip
    planned = {(v.key, v.deleted) for v in candidates}
    assert ("locks/vms/vm", False) in planned and len([v for v in candidates if v.key == "locks/vms/vm"]) == 1
    assert not {k for k, _ in planned} & {chunk_key(B), chunk_key(C), NEW + "manifest.json"}


def test_the_sweep_keeps_what_is_locked_and_the_delete_markers_over_it() -> None:
    store = VersionedFake()
    _repository(store)
    history = group(store.list_versions(""))
    oracle = _oracle(store)
    dry = sweep_versions(store, history, {B, C}, oracle, dry_run=True)
    assert store.deleted_versions == [] and dry.versions_freed > 0
    done = sweep_versions(store, history, {B, C}, _oracle(store), dry_run=False)
    assert done.chunks_freed == 1 and done.locked_versions == 1  # the dead run's index, locked
    assert done.partial_backups == ()
    assert not store.exists(chunk_key(A)) and chunk_key(A) not in store.keys
    assert OLD + "manifest.json" not in store.keys and "locks/readers/x" not in store.keys
    assert len(store.keys["locks/vms/vm"]) == 1 and store.exists(chunk_key(B))
    assert len(store.keys[DEAD + "disk.index"]) == 1  # locked: kept (no delete marker was over it)


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
