"""LocalStore keeps the Store contract (tests/integration/repo/stores/contract.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.repo.stores.contract import StoreContract
from vmsnap.errors import UsageError
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
