"""Which chunk locks a backup extends at seal (ChunkLocks.secure), on an in-memory store that keeps versions
and locks: none that the previous backup's chunk_lock covers, every other reused one in one batch, none a
second time in one process; the marker every time."""

from __future__ import annotations

import time

import attrs

from tests.unit.repo.stores.versioned_fake import VersionedFake
from vmsnap.repo.chunks.blob import ChunkId, chunk_key
from vmsnap.repo.chunks.retain import ChunkLocks, is_mutable, is_write_once, retention_rule
from vmsnap.repo.locking import DAY, LockPolicy
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.stores.history import format_time, parse_time
from vmsnap.repo.stores.retaining import retention_after

POLICY = LockPolicy.of(10, extend_days=2)


def _ids(*names: int) -> set[ChunkId]:
    return {ChunkId(bytes([n]) * 32) for n in names}


def _store(*names: int) -> VersionedFake:
    store = VersionedFake()
    store.put("vmsnap-repo.json", b"{}")
    for chunk_id in _ids(*names):
        store.put(chunk_key(chunk_id), b"c", retention=retention_after("compliance", POLICY.chunk_seconds))
    return store


def _previous(chunk_lock: float) -> Manifest:
    return Manifest("vm", "1", "full", None, "s", "t", "c", False, None, (), chunk_lock=_iso(chunk_lock))


def _iso(moment: float) -> str:
    import datetime as dt

    return format_time(dt.datetime.fromtimestamp(int(moment), dt.UTC))


def _extended(store: VersionedFake) -> list[str]:
    return sorted(key for key, _ in store.extended if key.startswith("chunks/"))


def test_a_first_backup_extends_every_chunk_it_found_not_those_it_stored() -> None:
    store = _store(1, 2, 3)
    locks = ChunkLocks(store, POLICY)
    sealed = locks.secure(
        named=_ids(1, 2, 3, 4), stored=_ids(4), started=time.time(), previous=None, previous_ids=None
    )
    assert _extended(store) == sorted(chunk_key(c) for c in _ids(1, 2, 3))
    assert [key for key, _ in store.extended if not key.startswith("chunks/")] == ["vmsnap-repo.json"]
    assert parse_time(sealed.chunk_lock) >= sealed.manifest.until  # the manifest's lock ends no later
    assert sealed.manifest.until.timestamp() >= time.time() + POLICY.seconds


def test_the_previous_backups_chunk_lock_spares_its_chunks_until_it_falls_short() -> None:
    store = _store(1, 2, 3, 9)
    locks = ChunkLocks(store, POLICY)
    now = time.time()
    covering = _previous(now + POLICY.chunk_seconds - 60)
    sealed = locks.secure(
        named=_ids(1, 2, 9), stored=set(), started=now, previous=covering, previous_ids=_ids(1, 2, 3)
    )
    assert _extended(store) == [chunk_key(c) for c in _ids(9)]  # another VM's chunk: extended
    assert sealed.chunk_lock == covering.chunk_lock  # no later than what the previous backup's covers
    store.extended.clear()
    short = _previous(now + POLICY.seconds - 60)  # falls short of a new backup's lock
    fresh = ChunkLocks(store, POLICY)
    fresh.secure(named=_ids(1, 2, 3), stored=set(), started=now, previous=short, previous_ids=_ids(1, 2, 3))
    assert _extended(store) == sorted(chunk_key(c) for c in _ids(1, 2, 3))
    store.extended.clear()
    fresh.secure(named=_ids(1, 2, 3), stored=set(), started=now, previous=short, previous_ids=_ids(1, 2, 3))
    assert _extended(store) == []  # extended a moment ago by this process: not again


def test_chunks_stored_by_a_backup_that_ran_longer_than_the_extension_are_extended() -> None:
    store = _store(1)
    locks = ChunkLocks(store, POLICY)
    started = time.time() - 3 * DAY  # a backup that took three days: its first chunks fall short
    locks.secure(named=_ids(1), stored=_ids(1), started=started, previous=None, previous_ids=None)
    assert _extended(store) == [chunk_key(c) for c in _ids(1)]
    assert attrs.asdict(POLICY)["extend_days"] == 2


def test_what_is_locked_and_what_is_never_locked() -> None:
    policy = LockPolicy.of(1, extend_days=1)
    rule = retention_rule(policy)
    backup = "vms/vm1/20261201T000000.000000Z-abcd/"
    written_once = [chunk_key(ChunkId(bytes(32))), "vmsnap-repo.json", backup + "manifest.json",
                    backup + "disk0.index", backup + "boot-verify-20261201T000000.000000Z.json"]  # fmt: skip
    mutable = ["locks/writers/vm1/000000000003", "locks/collector/000000000001", "locks/readers/h-1-ab",
               "gc-generation", "known-chunks-epoch", "vms/vm1/needs-full", backup + "writer.json",
               "quarantine/0000/" + "00" * 32]  # fmt: skip
    assert all(is_write_once(k) and not is_mutable(k) and rule(k) for k in written_once)
    assert all(is_mutable(k) and not is_write_once(k) and rule(k) is None for k in mutable)
    assert rule(backup + "manifest.json") == policy.seconds
    assert rule(written_once[0]) == rule("vmsnap-repo.json") == policy.chunk_seconds
