"""LocalStore's answers to faults vmsnap cannot make for real on demand: an fsync that fails with ENOSPC
after the data was written, a link(2) that fails with EIO, a filesystem that refuses O_DIRECT (os functions
replaced, so unit tests). A real full filesystem and a read-only one are in
tests/integration/repo/chunks/test_local_store.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vmsnap.errors import StoreError
from vmsnap.repo.stores import local
from vmsnap.repo.stores.local import LocalStore


def _temporaries(store: LocalStore) -> list[Path]:
    return [p for p in store.root.rglob(".tmp-*") if p.is_file()]


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
