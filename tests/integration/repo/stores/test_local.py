"""LocalStore keeps the Store contract (tests/integration/repo/stores/contract.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.repo.stores.contract import StoreContract
from vmsnap.errors import UsageError
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
