"""LocalStore (vmsnap.repo.stores.local) on real filesystems: the Store guarantees, if_absent raced by several
processes (exactly one wins, whole contents only), 0600 files and 0700 directories under any umask, a full
tmpfs (StoreError, nothing half-visible) and a read-only one. Mounting needs root (else: skip)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.repo.chunks.mounts import tmpfs
from vmsnap.errors import NotFoundError, StoreError, UsageError
from vmsnap.repo.chunks.blob import ChunkCodec
from vmsnap.repo.chunks.pipeline import backup_disk
from vmsnap.repo.chunks.readers import FileReader
from vmsnap.repo.stores.base import Store, StoredObject
from vmsnap.repo.stores.local import LocalStore

MiB = 1024 * 1024


def all_names(root: Path) -> set[str]:
    """Every file under root, dot files included (what a crash or a failure could leave behind)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_the_store_contract(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo", create=True)
    assert isinstance(store, Store) and store.url == str(tmp_path / "repo")
    assert store.put("vms/vm1/b1/disk0.index", b"one") is True
    assert store.get("vms/vm1/b1/disk0.index") == b"one"
    assert store.put("vms/vm1/b1/disk0.index", b"two") is True  # plain put replaces
    assert store.put("vms/vm1/b1/disk0.index", b"three", if_absent=True) is False
    assert store.get("vms/vm1/b1/disk0.index") == b"two"
    assert store.put("vms/vm10/x", b"") and store.get("vms/vm10/x") == b""
    store.put("chunks/abcd/abcdef", b"12345")
    store.put("chunks/ab12/ab12ef", b"1")
    store.put("chunks/ffff/ffffff", b"1")
    (store.root / "chunks" / "abcd" / ".tmp-leftover").write_bytes(b"crash")
    assert sorted(store.list("chunks/ab"), key=lambda o: o.key) == [
        StoredObject("chunks/ab12/ab12ef", 1),
        StoredObject("chunks/abcd/abcdef", 5),
    ]
    assert {o.key for o in store.list("vms/vm1")} == {"vms/vm1/b1/disk0.index", "vms/vm10/x"}
    assert {o.key for o in store.list("vms/vm1/")} == {"vms/vm1/b1/disk0.index"}
    assert len(list(store.list())) == 5 and list(store.list("nothing/")) == []
    assert store.exists("chunks/abcd/abcdef") and not store.exists("chunks/abcd") and not store.exists("nope")
    with pytest.raises(NotFoundError):
        store.get("chunks/abcd/missing")
    with pytest.raises(NotFoundError):
        store.get("chunks/abcd")  # a directory is no object
    store.delete("chunks/abcd/abcdef")
    store.delete("chunks/abcd/abcdef")  # twice: no error
    assert not store.exists("chunks/abcd/abcdef")
    for bad in ("../x", "/etc/passwd", "a//b", ".tmp-x", "a/./b", "a/../b", "", "a/b/"):
        with pytest.raises(UsageError):
            store.put(bad, b"x")
        with pytest.raises(UsageError):
            store.get(bad)
    with pytest.raises(UsageError):
        list(store.list("../"))


def test_a_missing_root_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such directory"):
        LocalStore(tmp_path / "absent")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError):
        LocalStore(tmp_path / "file")


def test_files_are_0600_and_directories_0700_under_any_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = LocalStore(tmp_path / "a" / "repo", create=True)
        store.put("vms/vm1/b1/manifest.json", b"{}")
        store.put("chunks/0000/00", b"x", if_absent=True)
    finally:
        os.umask(old)
    for path in [store.root, *store.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


RACER = """
import json, os, sys, time
from pathlib import Path
from vmsnap.repo.stores.local import LocalStore
root, go, me, keys = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = LocalStore(root)
(go.parent / f"ready-{me}").write_bytes(b"")
while not go.exists():
    time.sleep(0.001)
won = {}
for k in range(keys):
    won[k] = store.put(f"race/k{k}", bytes([me]) * 65536, if_absent=True)
    store.put("race/plain", bytes([me]) * (1 << 20))
print(json.dumps(won))
"""


def test_if_absent_race_between_processes_has_exactly_one_winner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo", create=True)
    go, writers, keys = tmp_path / "go", 6, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(store.root), str(go), str(me), str(keys)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for me in range(1, writers + 1)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < writers and time.monotonic() < deadline:
            time.sleep(0.01)  # every interpreter started and waits on the go file
        go.write_bytes(b"")
        results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs)
    for k in range(keys):
        winners = [me for me, won in enumerate(results, start=1) if won[str(k)]]
        assert len(winners) == 1, (k, winners)
        assert store.get(f"race/k{k}") == bytes([winners[0]]) * 65536
    plain = store.get("race/plain")
    assert len(plain) == 1 << 20 and plain == bytes([plain[0]]) * (1 << 20)  # one writer's whole object
    assert not [name for name in all_names(store.root) if "/." in name or name.startswith(".")]


def test_a_full_filesystem_is_a_store_error_and_leaves_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=2m,mode=0700") as root:
        store = LocalStore(root)
        store.put("first", random.Random(1).randbytes(MiB + MiB // 2))
        before = all_names(root)
        with pytest.raises(StoreError) as info:
            store.put("vms/vm1/b1/disk0.index", random.Random(2).randbytes(MiB))
        assert "No space left" in info.value.message and str(root) in info.value.message
        assert "full" in info.value.hint and "\n" not in str(info.value)
        assert not store.exists("vms/vm1/b1/disk0.index") and all_names(root) == before
        with pytest.raises(StoreError):
            store.put("first", random.Random(3).randbytes(MiB), if_absent=False)
        assert store.get("first") == random.Random(1).randbytes(MiB + MiB // 2)  # the old object, intact
        source = tmp_path / "disk.raw"
        source.write_bytes(random.Random(4).randbytes(3 * 4 * MiB))
        with FileReader(source) as reader, pytest.raises(StoreError, match="No space left"):
            backup_disk(reader, store, ChunkCodec(), workers=2)
        assert not [name for name in all_names(root) if "/." in name or name.startswith(".")]


def test_a_read_only_filesystem_is_a_store_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m,mode=0700") as root:
        store = LocalStore(root)
        with pytest.raises(StoreError) as info:
            store.put("chunks/0000/00", b"x")
        assert "read-only" in info.value.hint


@pytest.mark.parametrize("filesystem", ["ext4", "tmpfs"])
def test_get_into_reads_what_put_wrote_with_o_direct_or_without(tmp_path: Path, filesystem: str) -> None:
    """On ext4 a page-aligned buffer is filled with O_DIRECT, on tmpfs (no O_DIRECT) through the page
    cache; either way exactly the object's bytes (written from views of page-aligned frames, as the chunk
    pipeline hands them)."""
    from vmsnap.buffers import aligned_buffer

    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tmpfs(tmp_path / "mnt", "size=64m")) if filesystem == "tmpfs" else tmp_path
        store = LocalStore(root / "repo", create=True)
        frame = memoryview(aligned_buffer(4 * MiB + 4096))
        for size in (10, 64 * 1024 - 1, 4 * MiB + 8, 4 * MiB + 36):
            data = random.randbytes(size)
            frame[:size] = data
            assert store.put(f"chunks/k{size}", frame[:size], if_absent=True, durable=False)
        store.sync()
        aligned = memoryview(aligned_buffer(4 * MiB + 8192))
        unaligned = memoryview(bytearray(4 * MiB + 8192))[1:]
        for size in (10, 64 * 1024 - 1, 4 * MiB + 8, 4 * MiB + 36):
            expected = store.get(f"chunks/k{size}")
            assert len(expected) == size
            for buffer in (aligned, unaligned):
                assert store.get_into(f"chunks/k{size}", buffer) == size
                assert bytes(buffer[:size]) == expected
        with pytest.raises(StoreError, match="more than expected"):
            store.get_into(f"chunks/k{4 * MiB + 36}", memoryview(bytearray(100)))
        with pytest.raises(NotFoundError):
            store.get_into("chunks/nothing", aligned)
