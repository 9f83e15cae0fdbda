"""Fixtures for the restore tests: a GPT disk (ext4, xfs, btrfs, an empty partition) with known files, backed
up as a qcow2 chain (full + incremental), built once per session; private run directories that are emptied
(and checked) after each test."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.integration.restore.images import (
    Tree,
    build_gpt,
    change_through_daemon,
    read_table,
    run,
    write_v2,
)
from tests.parallel import built_once
from vmsnap.image.digest import image_chunks, write_chunks_file
from vmsnap.restore.commands import instant_dir, mounts_dir
from vmsnap.restore.mount import mounted, recover, umount
from vmsnap.restore.state import stop_daemons_under
from vmsnap.runner import LocalRunner


@attrs.frozen
class BackedUpDisk:
    """A disk and its backups: ``base.qcow2`` (full, v1 files) ← ``inc.qcow2`` (incremental, v2 files)."""

    directory: Path
    raw_v1: Path
    base: Path
    inc: Path
    raw_v2: Path
    chunks_v2: Path
    table: dict[int, tuple[int, int]]
    v1: dict[str, Tree]
    v2: dict[str, Tree]


@pytest.fixture(scope="session")
def backed_up_disk(tmp_path_factory: pytest.TempPathFactory) -> BackedUpDisk:
    """Built once per run (about 10 s) for every xdist worker: the raw disk, its qcow2 chain, and v2 as raw
    + chunk digests. Shared read-only: a test that changes an image copies it first (:func:`copy_chain`)."""
    return built_once(tmp_path_factory, "restore-disk", _build_backed_up_disk)


def _build_backed_up_disk(d: Path) -> BackedUpDisk:
    raw = d / "disk-v1.raw"
    v1 = build_gpt(raw)
    table = read_table(raw)
    base = d / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    inc = d / "inc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(inc))
    v2 = change_through_daemon(
        inc, table, lambda name, root: write_v2(root, f"t{name[1:]}"), {"p1": "", "p2": "", "p3": ""}
    )
    raw_v2 = d / "disk-v2.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(inc), str(raw_v2))
    chunks = d / "disk-v2.chunks"
    write_chunks_file(chunks, image_chunks(raw_v2, "raw"))
    for path in (raw, base, inc, raw_v2, chunks):
        path.chmod(0o600)
    return BackedUpDisk(d, raw, base, inc, raw_v2, chunks, table, v1, v2)


def empty_dirs(parent: Path, *names: str) -> list[Path]:
    """Empty directories ``parent/NAME`` (mountpoints), made now."""
    made = [parent / name for name in names]
    for path in made:
        path.mkdir()
    return made


def copy_chain(disk: BackedUpDisk, target: Path) -> Path:
    """A private copy of the chain (to damage); returns the copy's top image."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("base.qcow2", "inc.qcow2"):
        shutil.copyfile(disk.directory / name, target / name)
    return target / "inc.qcow2"


@attrs.frozen
class Leftovers:
    """What a mount may leave on this host, looked up from scratch."""

    mounts: list[str]
    loops: list[str]
    processes: list[int]
    entries: list[str]


def leftovers(run_dir: Path, mountpoints: list[Path], pids: list[int]) -> Leftovers:
    roots = [str(run_dir), *(str(m) for m in mountpoints)]
    mount_lines = Path("/proc/self/mounts").read_text().splitlines()
    found_mounts = [line for line in mount_lines if any(f" {root}" in line for root in roots)]
    text = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True, check=True).stdout
    loops = json.loads(text).get("loopdevices", []) if text.strip() else []
    found_loops = [
        f"{lo['name']} {lo.get('back-file')}" for lo in loops if str(run_dir) in str(lo.get("back-file"))
    ]
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "\nState:\tZ" not in _status(pid)]
    entries = [p.name for p in run_dir.iterdir() if p.name != ".lock"] if run_dir.is_dir() else []
    return Leftovers(found_mounts, found_loops, alive, entries)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


def daemon_pids(run_dir: Path) -> list[int]:
    """Pids of every daemon recorded under ``run_dir`` (any depth)."""
    pids = []
    for record in run_dir.rglob("daemon.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids.append(int(json.loads(record.read_text())["pid"]))
    return pids


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A private run directory with a short path (unix sockets live there); every mount left in it is
    undone afterwards, lazily, so one failing test cannot leak loop devices into the next."""
    path = Path(tempfile.mkdtemp(prefix="vr-", dir="/tmp"))
    try:
        yield path
    finally:
        for state in mounted(run_dir=path):
            with contextlib.suppress(Exception):
                umount(Path(state["mountpoint"]), run_dir=path, lazy=True)
        recover(run_dir=path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``VMSNAP_RUN_DIR`` for the CLI (in this process and in the processes it starts): a short private
    directory; every mount and instant-restore server a test leaves in it is undone afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vrr-", dir="/tmp"))
    monkeypatch.setenv("VMSNAP_RUN_DIR", str(path))
    try:
        yield path
    finally:
        for state in mounted(run_dir=mounts_dir(path)):
            with contextlib.suppress(Exception):
                umount(Path(state["mountpoint"]), run_dir=mounts_dir(path), lazy=True)
        recover(run_dir=mounts_dir(path))
        servers = instant_dir(path)
        for entry in servers.iterdir() if servers.is_dir() else []:
            if entry.is_dir():
                stop_daemons_under(entry, runner=LocalRunner())
        shutil.rmtree(path, ignore_errors=True)
