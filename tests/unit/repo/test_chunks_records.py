"""The pieces of a chunks repository that need no VM: the marker, leases (take, take over, renew, lose), the
known-chunks cache and its gc generation, and manifest authentication — all on a real LocalStore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest

from vmsnap.errors import ChecksumMismatchError, LeaseError, RepositoryError, UsageError
from vmsnap.repo.chunks.blob import ChunkId, chunk_key
from vmsnap.repo.chunks.ids import id_hash_of
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
from vmsnap.repo.chunks.leases import (
    GC_SERIES,
    LEASE_SECONDS,
    READERS,
    WRITERS,
    LeaseRecord,
    Leases,
    lease_seconds,
    writer_series,
)
from vmsnap.repo.chunks.quarantine import (
    MISSING,
    absent_quarantined,
    clear,
    decode_record,
    quarantine,
    quarantine_key,
    quarantined_ids,
    read_record,
)
from vmsnap.repo.chunks.records import (
    decode_manifest,
    encode_manifest,
    encode_tombstone,
    is_tombstone,
    tombstone_reason,
)
from vmsnap.repo.layout import layout_class
from vmsnap.repo.manifest import CHUNKS_FORMAT, INDEX_DIGEST, ChunkStats, DiskRecord, Manifest
from vmsnap.repo.marker import MARKER, RepoMarker
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores.local import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", create=True)


def _opened(directory: Path, marker: dict[str, object]) -> RepoMarker:
    """The marker as opening a repository reads it: parsed, then judged by its layout's rules."""
    directory.mkdir()
    (directory / MARKER).write_text(json.dumps(marker))
    located = Repository.locate(directory)
    assert located.marker is not None
    return located.marker


@pytest.mark.parametrize(
    ("chunk_id", "version", "keyed"), [("sha256", 2, "hmac-sha256"), ("blake3", 3, "blake3-keyed")]
)
def test_markers_round_trip_and_old_or_odd_ones_are_judged(
    tmp_path: Path, chunk_id: str, version: int, keyed: str
) -> None:
    marker = layout_class("chunks").new_marker(key_id="ab" * 16, chunk_id=chunk_id)
    data = marker.to_json()
    # a new encrypted repository seals its metadata whatever its chunk id hash: format 4
    assert data["encryption"] == {
        "cipher": "aes-256-gcm",
        "chunk_id": keyed,
        "key_id": "ab" * 16,
        "metadata": "sealed-1",
    }
    assert (data["format"], data["layout"], data["chunk_size"], data["compression"]) == (
        4,
        "chunks",
        4 << 20,
        "zstd",
    )
    assert data.get("chunk_id") == (None if chunk_id == "sha256" else chunk_id)
    assert marker.sealed and RepoMarker.from_bytes(json.dumps(data).encode(), where="m") == marker
    assert _opened(tmp_path / "good", data) == marker
    assert id_hash_of(marker) == chunk_id
    # an encrypted repository made before sealed metadata (format 2: sha256, 3: blake3), opened as it is
    old = {
        **data,
        "format": version,
        "encryption": {k: v for k, v in data["encryption"].items() if k != "metadata"},
    }
    read = _opened(tmp_path / "old", old)
    assert (read.format, read.sealed, read.key_id, id_hash_of(read)) == (version, False, "ab" * 16, chunk_id)
    assert read.to_json() == old
    # an unencrypted one has nothing to seal: format 2 or 3
    unencrypted = layout_class("chunks").new_marker(chunk_id=chunk_id)
    assert (unencrypted.to_json()["format"], unencrypted.sealed) == (version, False)
    # format 4 says how its metadata is sealed, and formats 2 and 3 do not claim it
    for n, bad in enumerate(
        (
            {**data, "encryption": old["encryption"]},
            {**old, "encryption": data["encryption"]},
            {**data, "encryption": None},
        )
    ):
        with pytest.raises(RepositoryError, match="damaged"):
            _opened(tmp_path / f"unsealed{n}", bad)
    assert RepoMarker.from_bytes(b'{"format": 1}', where="m").layout == "qcow2"
    other = "hmac-sha256" if chunk_id == "blake3" else "blake3-keyed"  # the other hash's keyed id
    for base, named in ((old, 3), (data, 4)):  # unsealed (naming its id hash: format 3) and sealed
        for n, bad in enumerate(
            (
                {**base, "chunk_size": 1 << 20},
                {**base, "id": "../x"},
                {**base, "compression": "lz4"},
                {**base, "format": named, "chunk_id": "md5"},
                {**base, "format": named, "chunk_id": "../x"},
                {**base, "encryption": {**base["encryption"], "chunk_id": other}},
                {**base, "layout": "qcow2", "format": named, "chunk_id": "blake3"},
            )
        ):
            with pytest.raises(RepositoryError, match="damaged"):
                _opened(tmp_path / f"bad{named}-{n}", bad)
    with pytest.raises(RepositoryError, match="has format 5"):
        RepoMarker.from_bytes(json.dumps({**data, "format": 5}).encode(), where="m")
    with pytest.raises(UsageError, match="unknown chunk id hash"):
        layout_class("chunks").new_marker(chunk_id="md5")
    with pytest.raises(UsageError, match="the qcow2 layout has no chunk ids") as caught:
        layout_class("qcow2").new_marker(chunk_id="blake3")
    assert "use --layout chunks" in str(caught.value)
    with pytest.raises(UsageError, match="cannot be encrypted") as caught:
        layout_class("qcow2").new_marker(key_id="ab" * 16)
    assert "use --layout chunks with --encrypt" in str(caught.value)
    with pytest.raises(UsageError, match="unknown repository layout"):
        layout_class("zip")
    with pytest.raises(UsageError, match="unknown compression"):
        layout_class("chunks").new_marker(compression="lz4")
    plain = layout_class("qcow2").new_marker()
    assert (plain.to_json()["chunk_size"], plain.to_json()["compression"]) == (None, None)
    # what a layout does not use is dropped; what it needs must be there
    odd = RepoMarker(2, "qcow2", "ab" * 16, "zstd", "cd" * 16, 4 << 20)
    assert layout_class("qcow2").accept_marker(odd) == RepoMarker(2, "qcow2", "ab" * 16)
    with pytest.raises(ValueError, match="chunk size"):
        layout_class("chunks").accept_marker(RepoMarker(2, "chunks", "ab" * 16))


def test_a_lease_is_exclusive_renewed_and_released(store: LocalStore) -> None:
    leases = Leases(store, ttl=0.4)
    series = writer_series("vm1")
    lease = leases.take(series, "writer", "a backup of vm1")
    assert lease.key == "locks/writers/vm1/000000000001"
    with pytest.raises(LeaseError, match="a backup of vm1") as info:
        leases.take(series, "writer", "another")
    assert "\n" not in str(info.value)
    first = lease.record.expires
    time.sleep(0.5)  # past the first expiry: the heartbeat renewed it
    assert leases.read(lease.key) is not None and leases.read(lease.key).expires > first  # type: ignore[union-attr]
    assert [k for k, _ in leases.live(WRITERS)] == [series]
    lease.check()
    lease.release()
    assert leases.holder(series) is None and leases.live(WRITERS) == []
    released = leases.read(lease.key)
    assert released is not None and released.state == "released"  # one small object stays per series
    again = leases.take(series, "writer", "the next backup")
    assert again.key.endswith("000000000002") and [s.key for s in store.list(series + "/")] == [again.key]
    again.release()


def _dead_record(what: str) -> dict[str, object]:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale: dict[str, object] = json.loads(LeaseRecord.mine("writer", what, 60).to_bytes())
    stale["pid"] = int(dead.stdout)
    stale["pid_start"] = "1"
    return stale


def test_a_dead_processes_lease_is_taken_over_at_once_and_the_loser_notices(store: LocalStore) -> None:
    leases = Leases(store, ttl=60)
    series = writer_series("vm1")
    store.put(f"{series}/000000000007", json.dumps(_dead_record("a dead backup")).encode())
    assert not leases.head(series).live()  # type: ignore[union-attr]
    lease = leases.take(series, "writer", "a backup")  # taken over: the next number, the dead entry removed
    assert lease.key == f"{series}/000000000008" and [s.key for s in store.list(series + "/")] == [lease.key]
    # another process (here: a hand-made record) takes it over in turn: the holder notices
    store.put(f"{series}/000000000009", LeaseRecord.mine("writer", "someone else", 60).to_bytes())
    with pytest.raises(LeaseError, match="lost the lease"):
        lease.check()
    lease.release()
    assert leases.head(series).record.what == "someone else"  # type: ignore[union-attr]  # left alone


def test_a_stale_holder_renewing_below_the_head_never_holds_again(store: LocalStore) -> None:
    """A holder stopped past its lease may still rewrite its own entry (its renewal was under way): that
    entry is below the head, so it holds nothing, even once the new holder has released."""
    leases = Leases(store, ttl=60)
    series = writer_series("vm1")
    stale = leases.take(series, "writer", "a stopped backup")
    stale._stop.set()  # (its heartbeat: this test plays its part)
    store.put(f"{series}/000000000002", LeaseRecord.mine("writer", "the next backup", 60).to_bytes())
    store.put(stale.key, stale.record.to_bytes())  # the stopped holder's renewal lands late
    with pytest.raises(LeaseError, match="took the lease over"):
        stale.check()
    store.put(
        f"{series}/000000000002", attrs.evolve(LeaseRecord.mine("w", "n", 60), state="released").to_bytes()
    )
    assert leases.holder(series) is None
    with pytest.raises(LeaseError):
        stale.check()


def test_an_expired_gc_lock_of_another_host_is_fenced_and_a_live_one_respected(store: LocalStore) -> None:
    record = json.loads(LeaseRecord.mine("gc", "a gc elsewhere", 60).to_bytes())
    record.update(host="elsewhere", expires=time.time() - 1)
    store.put(f"{GC_SERIES}/000000000001", json.dumps(record).encode())
    leases = Leases(store)
    assert leases.gc_running() is None
    fenced = leases.fence(GC_SERIES)
    assert fenced is not None and fenced.what == "a gc elsewhere"
    assert leases.head(GC_SERIES).record.state == "released"  # type: ignore[union-attr]
    assert leases.fence(GC_SERIES) is None  # nothing left to fence
    record["expires"] = time.time() + 60  # a live one of another host is respected
    store.put(f"{GC_SERIES}/000000000009", json.dumps(record).encode())
    assert leases.fence(GC_SERIES) is None
    with (
        pytest.raises(LeaseError, match="collecting garbage"),
        leases.holding(writer_series("vm1"), "writer", "b"),
    ):
        pass
    assert leases.holder(writer_series("vm1")) is None  # the writer let go of its lease again


def test_a_reader_lease_has_a_key_of_its_own_and_goes_away(store: LocalStore) -> None:
    leases = Leases(store, ttl=60)
    with leases.holding(None, "reader", "a restore") as lease:
        assert lease.key.startswith(READERS) and [k for k, _ in leases.live(READERS)] == [lease.key]
    assert list(store.list(READERS)) == []


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


def test_a_quarantined_chunk_is_recorded_and_moved_aside_only_while_it_holds_what_verify_read(
    store: LocalStore,
) -> None:
    bad, good, gone = (bytes([n]) * 32 for n in (1, 2, 3))
    store.put(chunk_key(bad), b"rotten blob")
    assert quarantine(store, ChunkId(bad), "its content does not match its id", b"rotten blob")
    assert not store.exists(chunk_key(bad))
    record, blob = decode_record(store.get(quarantine_key(bad)))  # type: ignore[misc]
    assert (record.chunk, record.problem, blob) == (
        bad.hex(),
        "its content does not match its id",
        b"rotten blob",
    )
    store.put(chunk_key(good), b"stored again meanwhile")
    assert not quarantine(store, ChunkId(good), "damaged", b"what verify read")  # not what verify read: stays
    assert store.get(chunk_key(good)) == b"stored again meanwhile"
    assert not quarantine(store, ChunkId(gone), MISSING, None)
    assert read_record(store, gone) is not None and read_record(store, gone).missing  # type: ignore[union-attr]
    assert quarantined_ids(store) == {bad, good, gone}
    assert absent_quarantined(store) == {bad, gone}  # the one that is there again is no longer set aside
    clear(store, [good])
    assert quarantined_ids(store) == {bad, gone}


def test_a_tombstone_is_no_manifest() -> None:
    raw = encode_tombstone("gc fenced its unfinished run")
    assert is_tombstone(raw) and tombstone_reason(raw) == "gc fenced its unfinished run"
    assert not is_tombstone(encode_manifest(_manifest(), None))
    assert not is_tombstone(b"\xff" * 10) and not is_tombstone(b'{"vmsnap": "something else"}')
