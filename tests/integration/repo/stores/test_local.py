"""LocalStore keeps the Store contract (tests/integration/repo/stores/contract.py)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.repo.stores.contract import StoreContract
from vmsnap.errors import StoreError, UsageError
from vmsnap.repo.stores import local
from vmsnap.repo.stores.local import LocalStore


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store", create=True)

    @pytest.fixture
    def store_location(self, store: LocalStore) -> str:
        return store.url

    @pytest.fixture
    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    @pytest.fixture
    def unreachable_store(self, tmp_path: Path) -> LocalStore:
        """A store whose directory was removed after it was opened."""
        store = LocalStore(tmp_path / "gone", create=True)
        shutil.rmtree(tmp_path / "gone")
        return store

    def test_invalid_keys_touch_nothing_outside_the_root(self, tmp_path: Path) -> None:
        store = LocalStore(tmp_path / "inner" / "store", create=True)
        for bad in ("../escaped", "../../escaped", str(tmp_path / "escaped-abs")):
            with pytest.raises(UsageError):
                store.put(bad, b"x")
        assert sorted(p.name for p in (tmp_path / "inner").iterdir()) == ["store"]
        assert not list(tmp_path.glob("escaped*"))


# ---------------------------------------------------------------------------------------- durable=False


def _temporaries(store: LocalStore) -> list[Path]:
    return [p for p in store.root.rglob(".tmp-*") if p.is_file()]


def test_queued_puts_are_invisible_until_their_batch_is_durable(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    keys = [f"chunks/{i:04x}/{i:064x}" for i in range(local.BATCH_FILES - 1)]
    for key in keys:
        assert store.put(key, key.encode(), if_absent=True, durable=False) is True
    assert not any(store.exists(key) for key in keys) and list(store.list()) == []
    assert len(_temporaries(store)) == len(keys)  # written whole, waiting for one fsync each
    store.sync()
    assert all(store.get(key) == key.encode() for key in keys) and not _temporaries(store)
    more = [f"chunks/ffff/{i:064x}" for i in range(local.BATCH_FILES)]
    for key in more:  # a full batch lands without sync()
        store.put(key, b"x", if_absent=True, durable=False)
    assert all(store.exists(key) for key in more) and not _temporaries(store)


def test_a_batch_that_cannot_be_made_durable_leaves_nothing_and_sync_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    for i in range(3):
        store.put(f"chunks/0000/{i:064x}", b"queued", durable=False)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.os, "fsync", full)
    with pytest.raises(StoreError, match="No space left"):
        store.sync()
    monkeypatch.undo()
    assert list(store.list()) == [] and not _temporaries(store)
    store.sync()  # the error was reported once; nothing is queued any more
    assert store.put("chunks/0000/" + "ab" * 32, b"again", durable=False) is True
    store.sync()
    assert store.get("chunks/0000/" + "ab" * 32) == b"again"


def test_the_put_that_fills_a_batch_that_fails_raises_and_sync_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    monkeypatch.setattr(local, "BATCH_FILES", 2)
    store.put("chunks/0000/a", b"one", durable=False)
    monkeypatch.setattr(local.os, "link", _refuse_link)
    with pytest.raises(StoreError, match="Input/output error"):
        store.put("chunks/0000/b", b"two", if_absent=True, durable=False)
    with pytest.raises(StoreError):
        store.sync()  # the first put had returned True: its caller learns here that it did not land
    assert not store.exists("chunks/0000/b") and not _temporaries(store)


def _refuse_link(source: object, target: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_objects_are_whole_when_the_filesystem_refuses_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    real_open = os.open

    def no_direct(path: object, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(local.os, "open", no_direct)
    data = os.urandom(4 * 1024 * 1024 + 8)
    assert store.put("chunks/0000/big", data, durable=False) is True
    store.put("chunks/0000/durable", data)
    store.sync()
    assert store.get("chunks/0000/big") == data == store.get("chunks/0000/durable")
