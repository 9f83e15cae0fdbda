"""Helpers for the tests of repository layouts: what a chunks repository holds, a worker process to stop or
kill, and random (incompressible) or marked guest data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from vmsnap.repo.chunks.leases import LeaseRecord
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.chunks.sealed import SealedStore
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores.base import Store
from vmsnap.repo.stores.local import LocalStore

SECRET = b"vmsnap-plaintext-marker:" + b"0123456789abcdef" * 4
"""A line the encryption test writes into the guest's disks, then looks for in every stored byte."""


def store_keys(repo: Path) -> list[str]:
    """Every object key of a chunks repository in a directory (temporary files skipped)."""
    return sorted(
        str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def stored_path(repo: Path, key: str, key_file: Path | None = None) -> Path:
    """The file of a chunks repository in a directory that holds what the layout calls ``key``
    (``vms/<vm>/<backup>/manifest.json``, …): under its sealed key in an encrypted repository of format 4."""
    layout = Repository.open(repo, key_file=key_file)
    assert isinstance(layout, ChunksRepository)
    store = layout.store
    return repo / (store.seal_key(key) if isinstance(store, SealedStore) else key)


def partial_backups(repo: Path, vm: str = "testvm") -> list[str]:
    """Backup directories of ``vm`` without a manifest."""
    vm_dir = repo / "vms" / vm
    if not vm_dir.is_dir():
        return []
    return sorted(p.name for p in vm_dir.iterdir() if p.is_dir() and not (p / "manifest.json").exists())


def held_leases(store: Store) -> list[str]:
    """The keys of the lease objects in ``store`` that are held (a released one stays per lease series)."""
    held = []
    for stored in store.list("locks/"):
        record = LeaseRecord.from_bytes(store.get(stored.key))
        if record is None or record.state != "released":
            held.append(stored.key)
    return held


def chunks_clean(repo: Path, state: Path, vm: str = "testvm") -> bool:
    """Nothing of a run is left: no partial backup, no held lease, no journal, no work directory."""
    work = [p for p in state.rglob("work/*/*") if p.is_dir()]
    journals = list(state.rglob("journal.json"))
    held = held_leases(LocalStore(repo))
    return not partial_backups(repo, vm) and not held and not work and not journals


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def random_file(path: Path, size: int) -> Path:
    """``size`` random bytes at ``path`` (for qemu-io ``write -s``: incompressible guest data)."""
    return write_file(path, os.urandom(size))


@attrs.define
class Worker:
    """A :mod:`tests.integration.repo.layouts.worker` process (stop it, continue it, wait for it)."""

    process: subprocess.Popen[str]

    @classmethod
    def start(
        cls, command: str, args: dict[str, Any], env: dict[str, str] | None = None, *, host: str | None = None
    ) -> Worker:
        """``host``: run it as another host (a UTS namespace of its own with that host name), whose leases
        this host judges by their expiry, not by its process."""
        argv = [sys.executable, "-m", "tests.integration.repo.layouts.worker", command, json.dumps(args)]
        if host is not None:
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv]
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        return cls(process)

    def wait_stopped(self, timeout: float = 60) -> None:
        """Until the process has stopped itself (SIGSTOP): fails if it exits instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the worker ended instead of stopping: {self.process.stderr.read()}")  # type: ignore[union-attr]
            state = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T":
                return
            time.sleep(0.02)
        raise AssertionError("the worker did not stop")

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def finish(self, timeout: float = 120) -> tuple[int, Any, str]:
        """(exit code, the JSON it printed or None, stderr)."""
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, json.loads(out) if out.strip() else None, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def iter_files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())
