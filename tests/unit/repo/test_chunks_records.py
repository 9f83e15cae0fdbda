"""The pieces of a chunks repository that need no VM: the marker, leases (take, take over, renew, lose), the
known-chunks cache and its gc generation, and manifest authentication — all on a real LocalStore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsnap.errors import ChecksumMismatchError, LeaseError, RepositoryError, UsageError
from vmsnap.repo.chunks.blob import chunk_key
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.chunks.known import (
    GENERATION_KEY,
    KnownChunks,
    RecordingStore,
    bump_generation,
    drop_known_caches,
    list_chunks,
    read_generation,
)
from vmsnap.repo.chunks.leases import GC_KEY, LEASE_SECONDS, LeaseRecord, Leases, lease_seconds, writer_key
from vmsnap.repo.chunks.records import decode_manifest, encode_manifest
from vmsnap.repo.manifest import CHUNKS_FORMAT, INDEX_DIGEST, ChunkStats, DiskRecord, Manifest
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.stores.local import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", create=True)


@pytest.mark.parametrize(
    ("chunk_id", "version", "keyed"), [("sha256", 2, "hmac-sha256"), ("blake3", 3, "blake3-keyed")]
)
def test_markers_round_trip_and_old_or_odd_ones_are_judged(chunk_id: str, version: int, keyed: str) -> None:
    marker = RepoMarker.new("chunks", key_id="ab" * 16, chunk_id=chunk_id)
    data = marker.to_json()
    assert data["encryption"] == {"cipher": "aes-256-gcm", "chunk_id": keyed, "key_id": "ab" * 16}
    assert (data["format"], data["layout"], data["chunk_size"], data["compression"]) == (
        version,
        "chunks",
        4 << 20,
        "zstd",
    )
    assert data.get("chunk_id") == (None if chunk_id == "sha256" else chunk_id)  # format 2 stays format 2
    assert RepoMarker.from_bytes(json.dumps(data).encode(), where="m") == marker
    assert RepoMarker.from_bytes(json.dumps(data).encode(), where="m").chunk_id == chunk_id
    assert RepoMarker.from_bytes(b'{"format": 1}', where="m").layout == "qcow2"
    other = "hmac-sha256" if chunk_id == "blake3" else "blake3-keyed"  # the other hash's keyed id
    for bad in (
        {**data, "chunk_size": 1 << 20},
        {**data, "id": "../x"},
        {**data, "compression": "lz4"},
        {**data, "format": 3, "chunk_id": "md5"},
        {**data, "encryption": {**data["encryption"], "chunk_id": other}},
    ):
        with pytest.raises(RepositoryError, match="damaged"):
            RepoMarker.from_bytes(json.dumps(bad).encode(), where="m")
    with pytest.raises(RepositoryError, match="has format 4"):
        RepoMarker.from_bytes(json.dumps({**data, "format": 4}).encode(), where="m")
    with pytest.raises(UsageError, match="unknown chunk id hash"):
        RepoMarker.new("chunks", chunk_id="md5")
    with pytest.raises(UsageError, match="cannot be encrypted"):
        RepoMarker.new("qcow2", key_id="ab" * 16)
    with pytest.raises(UsageError, match="unknown repository layout"):
        RepoMarker.new("zip")


def test_a_lease_is_exclusive_renewed_and_released(store: LocalStore) -> None:
    leases = Leases(store, ttl=0.4)
    key = writer_key("vm1")
    lease = leases.take(key, "writer", "a backup of vm1")
    with pytest.raises(LeaseError, match="a backup of vm1") as info:
        leases.take(key, "writer", "another")
    assert "\n" not in str(info.value)
    first = lease.record.expires
    time.sleep(0.5)  # past the first expiry: the heartbeat renewed it
    assert leases.read(key) is not None and leases.read(key).expires > first  # type: ignore[union-attr]
    assert [k for k, _ in leases.live("locks/vms/")] == [key]
    lease.check()
    lease.release()
    assert not store.exists(key)


def test_a_dead_processes_lease_is_taken_over_at_once_and_the_loser_notices(store: LocalStore) -> None:
    leases = Leases(store, ttl=60)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = json.loads(LeaseRecord.mine("writer", "a dead backup", 60).to_bytes())
    stale["pid"] = int(dead.stdout)
    stale["pid_start"] = "1"
    store.put(writer_key("vm1"), json.dumps(stale).encode())
    assert not leases.read(writer_key("vm1")).live()  # type: ignore[union-attr]
    lease = leases.take(writer_key("vm1"), "writer", "a backup")  # taken over
    # another process (here: a hand-made record) takes it over in turn: the holder notices
    store.put(writer_key("vm1"), LeaseRecord.mine("writer", "someone else", 60).to_bytes())
    with pytest.raises(LeaseError, match="lost the lease"):
        lease.check()
    lease.release()
    assert store.exists(writer_key("vm1"))  # not ours any more: left alone


def test_an_expired_lease_of_another_host_is_taken_over(store: LocalStore) -> None:
    record = json.loads(LeaseRecord.mine("gc", "a gc elsewhere", 60).to_bytes())
    record.update(host="elsewhere", expires=time.time() - 1)
    store.put(GC_KEY, json.dumps(record).encode())
    leases = Leases(store)
    assert leases.gc_running() is None
    leases.take(GC_KEY, "gc", "a gc").release()
    record["expires"] = time.time() + 60  # a live one of another host is respected
    store.put(GC_KEY, json.dumps(record).encode())
    with (
        pytest.raises(LeaseError, match="collecting garbage"),
        leases.holding(writer_key("vm1"), "writer", "b"),
    ):
        pass
    assert not store.exists(writer_key("vm1"))  # the writer let go of its lease again


def test_known_chunks_cache_follows_the_gc_generation(store: LocalStore, tmp_path: Path) -> None:
    a, b, c = (bytes([n]) * 32 for n in (1, 2, 3))
    store.put(chunk_key(a), b"blob")
    cache = tmp_path / "known"
    known = KnownChunks(store, cache)
    assert read_generation(store) == "0"
    assert known.load("0") == {a} and known.listed
    recording = RecordingStore(store, known)
    recording.put(chunk_key(b), b"blob", if_absent=True)
    known.close()
    store.put(chunk_key(c), b"blob")  # stored by another host: not known here, and that is fine
    again = KnownChunks(store, cache)
    assert again.load("0") == {a, b} and not again.listed  # from the cache, no listing
    again.close()
    with open(cache, "ab") as torn:  # a torn last append is dropped, not misread
        torn.write(b"\x07" * 5)
    assert KnownChunks(store, cache).load("0") == {a, b}
    generation = bump_generation(store)
    assert store.get(GENERATION_KEY).decode().strip() == generation
    fresh = KnownChunks(store, cache)
    assert fresh.load(generation) == {a, b, c} and fresh.listed  # a gc ran: listed again
    assert KnownChunks(store, cache).load("stale", list_if_stale=False) == set()
    assert KnownChunks(store, cache).load(generation) == {a, b, c}  # (the stale one left the cache alone)


def test_a_chunk_found_missing_makes_every_cache_stale_without_a_gc(
    store: LocalStore, tmp_path: Path
) -> None:
    """drop_known_caches (verify, when a chunk went missing) renews the epoch, not the gc generation: the
    cache is listed again, and a backup running meanwhile (which compares generations) is not disturbed."""
    a, b = (bytes([n]) * 32 for n in (1, 2))
    for chunk_id in (a, b):
        store.put(chunk_key(chunk_id), b"blob")
    cache = tmp_path / "known"
    assert KnownChunks(store, cache).load("0") == {a, b}
    store.delete(chunk_key(b))  # behind vmsnap's back
    assert KnownChunks(store, cache).load("0") == {a, b}  # the cache cannot know
    drop_known_caches(store)
    assert read_generation(store) == "0"
    fresh = KnownChunks(store, cache)
    assert fresh.load("0") == {a} and fresh.listed


def test_chunks_are_listed_by_prefix_and_other_keys_ignored(store: LocalStore) -> None:
    ids = [bytes([n]) * 32 for n in (0x01, 0x7F, 0xAB, 0xFF)]
    for chunk_id in ids:
        store.put(chunk_key(chunk_id), b"x" * chunk_id[0])
    store.put("chunks/readme", b"not a chunk")
    found = list_chunks(store)
    assert sorted(c for _, c in found) == sorted(ids)
    assert {s.size for s, _ in found} == {0x01, 0x7F, 0xAB, 0xFF}


@pytest.mark.parametrize(("value", "seconds"), [("", LEASE_SECONDS), ("4", 4.0), (" 30.5 ", 30.5)])
def test_the_lease_lifetime_comes_from_the_environment(value: str, seconds: float) -> None:
    assert lease_seconds({"VMSNAP_LEASE_SECONDS": value}) == seconds
    assert lease_seconds({}) == LEASE_SECONDS


@pytest.mark.parametrize("value", ["0.5", "-3", "soon", "nan", "inf"])
def test_a_lease_lifetime_that_is_none_is_refused(value: str) -> None:
    with pytest.raises(UsageError, match="VMSNAP_LEASE_SECONDS"):
        lease_seconds({"VMSNAP_LEASE_SECONDS": value})


def _manifest() -> Manifest:
    stats = ChunkStats(4096, 4096, 1, 100, 0, 0, 0)
    disk = DiskRecord("disk0", "disk0.index", 1 << 20, 100, "ab" * 32, stats)
    return Manifest(
        "vm1", "20260101T000000.000000Z-0000", "full", None, "backup", "nbd", "2026-01-01T00:00:00Z", False,
        "vmsnap", (disk,), format=CHUNKS_FORMAT, digest=INDEX_DIGEST,
    )  # fmt: skip


def test_manifests_are_authenticated_in_an_encrypted_repository() -> None:
    key = RepositoryKey.from_master(os.urandom(32))
    manifest = _manifest()
    raw = encode_manifest(manifest, key)
    assert decode_manifest(raw, manifest.vm, manifest.backup_id, key, where="m") == manifest
    data = json.loads(raw)
    data["disks"][0]["virtual_size"] = 2 << 20
    with pytest.raises(ChecksumMismatchError, match="authentication"):
        decode_manifest(json.dumps(data).encode(), manifest.vm, manifest.backup_id, key, where="m")
    with pytest.raises(ChecksumMismatchError, match="another key"):
        decode_manifest(
            raw, manifest.vm, manifest.backup_id, RepositoryKey.from_master(os.urandom(32)), where="m"
        )
    plain = encode_manifest(manifest, None)
    with pytest.raises(ChecksumMismatchError):  # a MAC stripped off is no MAC
        decode_manifest(plain, manifest.vm, manifest.backup_id, key, where="m")
    with pytest.raises(RepositoryError, match="not encrypted"):
        decode_manifest(raw, manifest.vm, manifest.backup_id, None, where="m")
    with pytest.raises(RepositoryError, match="says vm1"):
        decode_manifest(plain, "vm2", manifest.backup_id, None, where="m")
