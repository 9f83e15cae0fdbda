"""The contract every Store keeps (fsspec-style): each store's test module subclasses :class:`StoreContract`
and provides four fixtures:

- ``store``: a fresh, empty store of that kind, for this test alone;
- ``store_location``: what :func:`~vmsnap.repo.stores.open_store` takes to open that same store in another
  process (a path, an ``s3://`` URL);
- ``child_env``: the environment such a process needs (the AWS chain, for S3; never a secret in argv);
- ``unreachable_store``: a store of that kind whose backend is gone, to prove keys are checked before any I/O.

The guarantees tested are those of :mod:`vmsnap.repo.stores.base`: atomic and conditional puts (also raced by
threads and by processes), exact gets, reads into a caller's buffer (``get_into``), NotFoundError for a
missing key, listing by prefix with sizes, key validation, large objects, parallel writers, a writer killed
(SIGKILL) mid-put leaving the whole object or none, and puts made durable by ``sync()`` (``durable=False``):
never partial, there after ``sync()``, never replacing an object, a writer killed before its ``sync()``
leaving whole objects or none.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.repo.stores.store_worker import seeded_bytes
from vmsnap.buffers import aligned_buffer, is_aligned
from vmsnap.errors import NotFoundError, StoreError, UnsupportedError, UsageError
from vmsnap.repo.stores import Store, StoreCapabilities, open_store, scheme_of, store_class
from vmsnap.repo.stores.retaining import retention_after

WORKER = Path(__file__).with_name("store_worker.py")
MiB = 1024 * 1024

BAD_KEYS = (
    "",
    "/abs",
    "../x",
    "a/../b",
    "a/./b",
    "./a",
    "a//b",
    "a/",
    ".hidden",
    "a/.",
    "with space",
    "tab\tkey",
    "back\\slash",
    "new\nline",
    "caf\u00e9",
    "x" * 1025,
)
"""Keys check_key refuses: escapes, empty parts, hidden first parts, characters outside [A-Za-z0-9._+-]."""

BAD_PREFIXES = ("/abs", "../x", "a//", ".x/", "a/../b/")


class Worker:
    """One ``store_worker.py`` process (see its docstring), killed by its pid if it still runs at the end."""

    def __init__(self, location: str, key: str, size: int, seed: int, mode: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), location, key, str(size), str(seed), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )

    def expect(self, line: str) -> None:
        assert self.process.stdout is not None
        got = self.process.stdout.readline().strip()
        if got != line:
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"worker said {got!r}, not {line!r}; stderr: {err[-2000:]}")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self) -> dict[str, object]:
        out, err = self.process.communicate(timeout=120)
        lines = out.strip().splitlines()
        assert lines, f"worker printed nothing; stderr: {err[-2000:]}"
        result: dict[str, object] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.communicate()


def _start_workers(specs: list[tuple[str, str, int, int, str]], env: dict[str, str]) -> list[Worker]:
    workers: list[Worker] = []
    try:
        for spec in specs:
            workers.append(Worker(*spec, env=env))
        for worker in workers:
            worker.expect("ready")
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


def _race_if_absent(store: Store, key: str, datas: list[bytes]) -> list[bool]:
    """Every thread waits at a barrier, then puts its data under ``key`` with if_absent."""
    start = threading.Barrier(len(datas))

    def attempt(data: bytes) -> bool:
        start.wait()
        return store.put(key, data, if_absent=True)

    with ThreadPoolExecutor(len(datas)) as pool:
        return list(pool.map(attempt, datas))


def _listing(store: Store, prefix: str = "") -> dict[str, int]:
    return {obj.key: obj.size for obj in store.list(prefix)}


class StoreContract:
    """Subclasses provide the fixtures ``store``, ``store_location``, ``child_env``, ``unreachable_store``."""

    # ------------------------------------------------------------------------------------------ basics

    def test_is_a_store_with_a_url(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    @pytest.mark.parametrize("size", [0, 1, 4096, 64 * 1024, 64 * 1024 + 1, MiB + 3, 4 * MiB + 8])
    def test_put_then_get_returns_the_same_bytes(self, store: Store, size: int) -> None:
        data = seeded_bytes(size, size)
        assert store.put("vms/vm1/b1/disk0.index", data) is True
        got = store.get("vms/vm1/b1/disk0.index")
        assert isinstance(got, bytes) and got == data
        assert store.exists("vms/vm1/b1/disk0.index")
        assert _listing(store) == {"vms/vm1/b1/disk0.index": size}

    @pytest.mark.parametrize("size", [0, 4096, 64 * 1024 + 1, 4 * MiB + 36])
    def test_get_into_reads_the_object_into_a_buffer(self, store: Store, size: int) -> None:
        data = seeded_bytes(size, size + 7)
        store.put("chunks/00ff/00ffee", memoryview(bytearray(data)))  # a view, as the pipeline hands one
        raw = memoryview(aligned_buffer(4 * MiB + 3 * 4096))
        assert is_aligned(raw)
        for start in (0, 5):  # a buffer on a page (O_DIRECT where the store can) and one that is not
            buffer = raw[start:]
            buffer[: size + 1] = b"\xaa" * (size + 1)
            assert store.get_into("chunks/00ff/00ffee", buffer) == size
            assert buffer[:size] == data
        if size:
            with pytest.raises(StoreError, match="more than"):
                store.get_into("chunks/00ff/00ffee", memoryview(bytearray(size - 1)))
        with pytest.raises(NotFoundError):
            store.get_into("chunks/00ff/missing", raw)

    def test_keys_of_every_allowed_character(self, store: Store) -> None:
        keys = ["A-Z_a+z.0-9", "chunks/00ff/00ff" + "ab" * 31, "-lead/_x/+y/9.z", "a" * 200 + "/b"]
        for number, key in enumerate(keys):
            assert store.put(key, str(number).encode()) is True
        assert {key: store.get(key) for key in keys} == {key: str(n).encode() for n, key in enumerate(keys)}
        assert set(_listing(store)) == set(keys)

    def test_put_replaces_an_object_whole(self, store: Store) -> None:
        assert store.put("manifest.json", seeded_bytes(300_000, 1)) is True
        assert store.put("manifest.json", b"short") is True
        assert store.get("manifest.json") == b"short"
        assert _listing(store) == {"manifest.json": 5}

    # --------------------------------------------------------------------------------------- if_absent

    def test_if_absent_writes_only_when_the_key_is_free(self, store: Store) -> None:
        assert store.put("vms/vm1/b1/manifest.json", b"first", if_absent=True) is True
        assert store.put("vms/vm1/b1/manifest.json", b"second!", if_absent=True) is False
        assert store.get("vms/vm1/b1/manifest.json") == b"first"
        assert _listing(store) == {"vms/vm1/b1/manifest.json": 5}
        assert store.put("vms/vm1/b1/manifest.json", b"third", if_absent=False) is True
        assert store.get("vms/vm1/b1/manifest.json") == b"third"

    def test_if_absent_writes_again_after_a_delete(self, store: Store) -> None:
        assert store.put("locks/gc", b"one", if_absent=True) is True
        store.delete("locks/gc")
        assert store.put("locks/gc", b"two", if_absent=True) is True
        assert store.get("locks/gc") == b"two"

    def test_if_absent_race_between_threads_has_one_winner(self, store: Store) -> None:
        threads = 8  # SeaweedFS makes contended conditional puts wait in steps of 1 s: keep this small
        for round_ in range(2):
            key = f"locks/race-{round_}"
            datas = [seeded_bytes(64 * 1024, 100 * round_ + i) for i in range(threads)]
            results = _race_if_absent(store, key, datas)
            assert Counter(results) == {True: 1, False: threads - 1}, results
            assert store.get(key) == datas[results.index(True)]

    def test_if_absent_race_between_processes_has_one_winner(
        self, store: Store, store_location: str, child_env: dict[str, str]
    ) -> None:
        count, size = 4, 256 * 1024
        workers = _start_workers(
            [(store_location, "locks/writer", size, seed, "put-if-absent") for seed in range(count)],
            child_env,
        )
        try:
            for worker in workers:
                worker.go()
            results = [worker.result() for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
        assert all(set(result) == {"written"} for result in results), results
        written = [result["written"] for result in results]
        assert written.count(True) == 1 and written.count(False) == count - 1, written
        assert store.get("locks/writer") == seeded_bytes(size, written.index(True))

    # ---------------------------------------------------------------------------------- missing, delete

    def test_get_of_a_missing_key_is_not_found(self, store: Store) -> None:
        with pytest.raises(NotFoundError) as caught:
            store.get("vms/vm1/nothing-here")
        assert not isinstance(caught.value, StoreError)
        assert "\n" not in str(caught.value)
        assert "nothing-here" in str(caught.value)
        assert store.exists("vms/vm1/nothing-here") is False

    def test_delete_removes_and_tolerates_a_missing_key(self, store: Store) -> None:
        store.delete("never/was")
        store.put("a/b", b"x")
        store.put("a/c", b"y")
        store.delete("a/b")
        assert not store.exists("a/b")
        with pytest.raises(NotFoundError):
            store.get("a/b")
        store.delete("a/b")
        assert _listing(store) == {"a/c": 1}

    def test_delete_many_removes_them_all_and_tolerates_missing_keys(self, store: Store) -> None:
        keys = [f"chunks/00{n:02x}/00{n:02x}" + "ab" * 30 for n in range(40)]
        for key in keys:
            store.put(key, b"x")
        store.put("vms/keep", b"kept")
        store.delete_many([*keys[:30], "never/was"])
        assert _listing(store) == {**{key: 1 for key in keys[30:]}, "vms/keep": 4}
        store.delete_many(iter(keys[30:]))
        store.delete_many([])
        assert _listing(store) == {"vms/keep": 4}

    # ------------------------------------------------------------------- registry and capabilities

    def test_the_registry_opens_the_same_store_from_its_location(
        self, store: Store, store_location: str
    ) -> None:
        again = open_store(store_location)
        try:
            assert type(again) is type(store)
            assert again.url == store.url
            assert store_class(scheme_of(store_location)) is type(store)
            store.put("vms/seen", b"by both")
            assert again.get("vms/seen") == b"by both"
        finally:
            again.close()

    def test_capabilities_are_data_and_conditional_writes_hold(self, store: Store) -> None:
        capabilities = store.capabilities
        assert isinstance(capabilities, StoreCapabilities)
        assert capabilities.conditional_put in ("store", "server")
        assert capabilities.writable
        assert capabilities.transfer_threads >= 0 and isinstance(capabilities.reads_into, bool)
        store.check_conditional_writes()  # a store that keeps the if_absent guarantee passes its own probe
        assert _listing(store) == {}  # and the probe leaves nothing behind

    def test_versions_and_locks_are_asked_for_never_assumed(self, store: Store) -> None:
        # what the kind of store can do (capabilities) bounds what this one is configured for (locking)
        capabilities, locking = store.capabilities, store.locking()
        assert not locking.versioning or capabilities.versions
        assert not locking.object_lock or capabilities.retention_locks
        lock = retention_after("compliance", 60)
        if not capabilities.versions:
            with pytest.raises(UnsupportedError, match="keeps no earlier versions"):
                list(store.list_versions(""))
        if not capabilities.retention_locks:
            with pytest.raises(UnsupportedError, match="cannot lock objects"):
                store.put("locked", b"x", retention=lock)
        elif not locking.object_lock:
            with pytest.raises(StoreError, match="Object Lock"):
                store.put("locked", b"x", retention=lock)
        assert not store.exists("locked")

    # ------------------------------------------------------------------------------------------- list

    def test_list_by_prefix_with_sizes(self, store: Store) -> None:
        objects = {"vms/a/1": 1, "vms/a/2": 22, "vms/ab/3": 333, "chunks/00ff/00ffaa": 4444, "top": 0}
        for key, size in objects.items():
            store.put(key, seeded_bytes(size, size))
        assert _listing(store) == objects
        assert _listing(store, "vms/a/") == {"vms/a/1": 1, "vms/a/2": 22}
        assert _listing(store, "vms/a") == {"vms/a/1": 1, "vms/a/2": 22, "vms/ab/3": 333}
        assert _listing(store, "vms/a/2") == {"vms/a/2": 22}
        assert _listing(store, "chunks/") == {"chunks/00ff/00ffaa": 4444}
        assert _listing(store, "nothing/") == {}
        assert _listing(store, "t") == {"top": 0}

    def test_list_of_an_empty_store_is_empty(self, store: Store) -> None:
        assert _listing(store) == {}

    # ----------------------------------------------------------------------------------- invalid keys

    @pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
    def test_invalid_keys_are_refused_before_any_io(self, unreachable_store: Store, bad: str) -> None:
        for call in (
            lambda: unreachable_store.get(bad),
            lambda: unreachable_store.put(bad, b"x"),
            lambda: unreachable_store.put(bad, b"x", if_absent=True),
            lambda: unreachable_store.exists(bad),
            lambda: unreachable_store.delete(bad),
        ):
            with pytest.raises(UsageError):
                call()

    @pytest.mark.parametrize("bad", BAD_PREFIXES, ids=repr)
    def test_invalid_prefixes_are_refused_before_any_io(self, unreachable_store: Store, bad: str) -> None:
        with pytest.raises(UsageError):
            list(unreachable_store.list(bad))

    def test_the_store_is_unreachable_for_valid_keys(self, unreachable_store: Store) -> None:
        """The counterpart of the two tests above: the same store fails a valid key with a StoreError or
        NotFoundError, so their UsageErrors came from the check, not from the backend."""
        with pytest.raises((StoreError, NotFoundError)):
            unreachable_store.get("a/valid/key")

    def test_invalid_keys_leave_the_store_untouched(self, store: Store) -> None:
        for bad in BAD_KEYS:
            with pytest.raises(UsageError):
                store.put(bad, b"escape")
        assert _listing(store) == {}

    # ---------------------------------------------------------------------------------- size, threads

    def test_large_object(self, store: Store) -> None:
        data = seeded_bytes(8 * MiB + 17, 8)
        assert store.put("chunks/big/object", data) is True
        assert store.get("chunks/big/object") == data
        assert _listing(store, "chunks/") == {"chunks/big/object": len(data)}

    def test_concurrent_puts_of_different_keys(self, store: Store) -> None:
        keys = [f"chunks/{i % 4:04x}/{i:064x}" for i in range(32)]
        datas = {key: seeded_bytes(256 * 1024 + i, i) for i, key in enumerate(keys)}
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(lambda key: store.put(key, datas[key]), keys))
        assert _listing(store) == {key: len(data) for key, data in datas.items()}
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(lambda key: store.get(key) == datas[key], keys))

    # ---------------------------------------------------------------------------------- durable=False

    def test_unsynced_puts_are_whole_or_absent_and_all_there_after_sync(self, store: Store) -> None:
        sizes = [1, 4096, 64 * 1024 + 1, MiB, 4 * MiB + 8]
        datas = {f"chunks/{i:04x}/{i:064x}": seeded_bytes(size, i) for i, size in enumerate(sizes)}
        for key, data in datas.items():
            assert store.put(key, data, if_absent=True, durable=False) is True
        listed = _listing(store, "chunks/")
        for key, data in datas.items():  # before sync(): any of them may be there, but only whole
            if store.exists(key):
                assert store.get(key) == data and listed.get(key) == len(data)
            else:
                assert key not in listed
        store.sync()
        assert _listing(store, "chunks/") == {key: len(data) for key, data in datas.items()}
        assert all(store.get(key) == data for key, data in datas.items())
        store.sync()  # nothing queued: nothing to do

    def test_an_unsynced_put_never_replaces_an_object(self, store: Store) -> None:
        assert store.put("chunks/0000/first", b"there before") is True
        assert store.put("chunks/0000/first", b"late", if_absent=True, durable=False) is False
        assert store.put("chunks/0000/second", b"queued", if_absent=True, durable=False) is True
        assert store.put("chunks/0000/second", b"another writer", if_absent=True) in (True, False)
        store.sync()
        assert store.get("chunks/0000/first") == b"there before"
        assert store.get("chunks/0000/second") in (b"queued", b"another writer")  # one object, written once
        assert _listing(store, "chunks/0000/")["chunks/0000/second"] == len(store.get("chunks/0000/second"))

    def test_unsynced_puts_from_many_threads_are_there_after_sync(self, store: Store) -> None:
        keys = [f"chunks/{i % 8:04x}/{i:064x}" for i in range(80)]  # more than a local batch
        datas = {key: seeded_bytes(70 * 1024 + i, i) for i, key in enumerate(keys)}
        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(lambda key: store.put(key, datas[key], if_absent=True, durable=False), keys))
        store.sync()
        assert _listing(store) == {key: len(data) for key, data in datas.items()}
        assert all(store.get(key) == data for key, data in datas.items())

    def test_a_writer_killed_before_sync_leaves_whole_objects_or_none(
        self, store: Store, store_location: str, child_env: dict[str, str]
    ) -> None:
        """A worker queues puts (``durable=False``) and is killed before it calls sync(): every key it put
        is either whole or absent, and can be written afterwards."""
        size, count = 256 * 1024, 5
        (worker,) = _start_workers([(store_location, "chunks/unsynced", size, 3, "put-unsynced")], child_env)
        try:
            worker.go()
            worker.expect("putting")
            worker.expect("queued")
        finally:
            worker.kill()
        keys = [f"chunks/unsynced/{n}" for n in range(count)]
        listed = _listing(store, "chunks/")
        assert set(listed) <= set(keys), listed
        for number, key in enumerate(keys):
            if store.exists(key):
                assert store.get(key) == seeded_bytes(size, 3 + number), f"{key}: a partial object is visible"
                assert listed[key] == size
        for key in keys:
            assert store.put(key, b"again", if_absent=False) is True
            assert store.get(key) == b"again"

    # ------------------------------------------------------------------------------------------ crash

    def test_a_writer_killed_mid_put_leaves_the_whole_object_or_none(
        self, store: Store, store_location: str, child_env: dict[str, str]
    ) -> None:
        """SIGKILL at several moments after the put began; whatever the moment, a reader sees all or nothing,
        and the key can be written afterwards."""
        size = 32 * MiB
        delays = (0.0, 0.005, 0.02, 0.1, 0.3, 0.8)
        seen: list[str] = []
        for number, delay in enumerate(delays):
            key = f"chunks/kill/{number}"
            (worker,) = _start_workers([(store_location, key, size, number, "put")], child_env)
            try:
                worker.go()
                worker.expect("putting")
                time.sleep(delay)
            finally:
                worker.kill()
            listed = _listing(store, "chunks/kill/")
            if store.exists(key):
                assert store.get(key) == seeded_bytes(size, number), f"{key}: a partial object is visible"
                assert listed.get(key) == size
                seen.append("whole")
            else:
                assert key not in listed
                seen.append("none")
            assert set(listed) <= {f"chunks/kill/{n}" for n in range(number + 1)}, listed
        for number in range(len(delays)):
            assert store.put(f"chunks/kill/{number}", b"again") is True
            assert store.get(f"chunks/kill/{number}") == b"again"
        print(f"killed writers left: {seen}")
