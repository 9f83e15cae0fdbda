"""The store as it was at a time (AsOfStore) and what a key's versions say (key_history), on an in-memory
versioned store."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.unit.repo.stores.versioned_fake import VersionedFake
from vmsnap.errors import NotFoundError, StoreError
from vmsnap.repo.stores.history import AsOfStore, key_history


def test_the_view_reads_the_newest_version_at_the_time_and_ignores_later_deletes_and_overwrites() -> None:
    store = VersionedFake()
    store.put("a", b"a1")
    store.put("gone", b"g")
    store.tick()
    store.put("a", b"a2")
    store.delete("gone")
    moment = store.tick()
    store.put("b", b"b1")  # written during the second the view is at: counts
    store.tick()
    store.delete("a")  # the attack
    store.put("b", b"garbage")
    store.put("late", b"l")
    view = AsOfStore(store, moment)
    assert view.get("a") == b"a2" and view.get("b") == b"b1"
    assert [(o.key, o.size) for o in view.list("")] == [("a", 2), ("b", 2)]
    assert not view.exists("gone") and not view.exists("late")
    with pytest.raises(NotFoundError, match="did not exist at that time"):
        view.get("late")
    assert view.first_written("late") == moment + dt.timedelta(seconds=1)
    assert view.url == "fake://versions?as-of=2026-12-01T00:00:02Z"
    assert not view.capabilities.writable
    for write in (lambda: view.put("c", b"c"), lambda: view.delete("a"), lambda: view.delete_many(["a"])):
        with pytest.raises(StoreError, match="nothing can be written"):
            write()


def test_a_keys_history_says_when_it_was_deleted_or_overwritten_with_other_content() -> None:
    store = VersionedFake()
    store.put("k", b"1")
    first = store.now
    assert key_history(store, "k").damaged_at is None
    store.put("k", b"1")  # the same content again (a resent put): not an overwrite
    assert key_history(store, "k").damaged_at is None
    overwritten = store.tick()
    store.put("k", b"2")
    assert key_history(store, "k").overwritten_at == overwritten
    deleted = store.tick()
    store.delete("k")
    history = key_history(store, "k")
    assert (history.first_written, history.deleted_at) == (first, deleted)
    assert key_history(store, "nothing").first_written is None
