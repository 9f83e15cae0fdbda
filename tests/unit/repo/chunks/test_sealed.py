"""Sealed metadata (vmsnap.repo.chunks.sealed) over a real LocalStore: plain keys in, nothing readable out."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsnap.errors import ChecksumMismatchError
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.chunks.sealed import MIN_SIZE, SEALED_PART, SealedStore, size_class
from vmsnap.repo.stores.local import LocalStore

KEY = RepositoryKey.from_master(bytes(range(32)))
OTHER = RepositoryKey.from_master(bytes(range(1, 33)))


@pytest.fixture
def raw(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", create=True)


def sealed(store: LocalStore, key: RepositoryKey = KEY) -> SealedStore:
    return SealedStore(store, lambda: key)


def test_keys_and_objects_round_trip_and_say_nothing(raw: LocalStore) -> None:
    store = sealed(raw)
    objects = {
        "vms/secret-vm/20250101T000000.000000Z-abcd/manifest.json": b'{"vm": "secret-vm"}',
        "vms/secret-vm/20250101T000000.000000Z-abcd/bigdisk.index": b"I" * 5000,
        "vms/secret-vm/20250101T000000.000000Z-abcd/attached.machine.json": b"state",
        "vms/secret-vm/needs-full": b"{}",
        "vms/other/20250102T000000.000000Z-0123/manifest.json": b"m2",
        "locks/writers/secret-vm/000000000001": b"lease",
        "chunks/abcd/" + "ab" * 32: b"blob",
        "gc-generation": b"g\n",
    }
    for key, data in objects.items():
        assert store.put(key, data, if_absent=True)
        assert not store.put(key, b"again", if_absent=True)  # the same plain key: the same sealed key
    for key, data in objects.items():
        assert store.get(key) == data and store.exists(key)
    assert sorted(s.key for s in store.list("")) == sorted(objects)
    assert sorted(s.key for s in store.list("vms/secret-vm/")) == sorted(
        k for k in objects if k.startswith("vms/secret-vm/")
    )
    backup = "vms/secret-vm/20250101T000000.000000Z-abcd/"
    assert [s.key for s in store.list(backup + "attached.")] == [backup + "attached.machine.json"]
    assert [s.key for s in store.list("chunks/ab")] == ["chunks/abcd/" + "ab" * 32]
    stored = {s.key: s.size for s in raw.list("")}
    text = b"".join(raw.get(k) for k in stored) + "".join(stored).encode()
    for word in (
        b"secret-vm",
        b"2025",
        b"bigdisk",
        b"machine",
        b"manifest",
        b"needs-full",
        b"writers",
        b"lease",
    ):
        assert word not in text, word
    for key, size in stored.items():
        if key.startswith(("v/", "l/")):
            assert all(len(part) == SEALED_PART for part in key.split("/")[1:]), key
            big = key == store.seal_key("vms/secret-vm/20250101T000000.000000Z-abcd/bigdisk.index")
            assert size == (8192 if big else MIN_SIZE), key
        else:
            assert key in ("gc-generation", "chunks/abcd/" + "ab" * 32)


def test_a_swapped_truncated_or_foreign_object_fails_its_check(raw: LocalStore) -> None:
    store = sealed(raw)
    one, two = "vms/vm/1/manifest.json", "vms/vm/2/manifest.json"
    store.put(one, b"first")
    store.put(two, b"second")
    first, second = store.seal_key(one), store.seal_key(two)
    swapped = raw.get(first)
    raw.put(first, raw.get(second))
    raw.put(second, swapped)
    for key in (one, two):
        with pytest.raises(ChecksumMismatchError, match=f"{key} fails its authentication check") as caught:
            store.get(key)
        assert "\n" not in str(caught.value)
    raw.put(first, swapped[:-1])
    with pytest.raises(ChecksumMismatchError, match="fails its authentication check"):
        store.get(one)
    raw.put(first, b"plain")
    with pytest.raises(ChecksumMismatchError, match="not a sealed object"):
        store.get(one)
    other = sealed(raw, OTHER)
    other.put("vms/intruder/1/manifest.json", b"x")
    # a key sealed with another key, or a part moved under another parent, is not listed
    assert sorted(s.key for s in store.list("vms/")) == [one, two]
    raw.put(first.rsplit("/", 1)[0] + "/" + second.rsplit("/", 1)[1], b"moved")
    assert sorted(s.key for s in store.list("vms/")) == [one, two]
    with pytest.raises(ChecksumMismatchError):  # another key finds nothing under its keys, and opens nothing
        other.open_object(two, raw.get(second))


def test_size_classes() -> None:
    assert size_class(0) == size_class(4000) == MIN_SIZE
    assert size_class(5000) == 8192 and size_class(8192) == 16384
    assert size_class(1 << 20) == 2 << 20
