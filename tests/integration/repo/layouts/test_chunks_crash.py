"""A chunks backup killed at each step, and one that fills the store's filesystem: no manifest, nothing
half-visible; ``recover`` leaves no lease, partial backup, journal or work directory; the next backup works
and stores nothing again that the dead run had stored."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningVm
from tests.integration.cli_helpers import (
    backup,
    block_state,
    capture,
    cli,
    cli_process,
    listed,
    restore_and_compare,
    vm_args,
    write,
)
from tests.integration.repo.chunks.mounts import tmpfs
from tests.integration.repo.layouts.helpers import chunks_clean, partial_backups, random_file
from vmsnap.backup.config import CRASH_ENV, CRASH_POINTS

DISKS = ("disk0", "disk1")
AFTER_DISK0 = ("mid-export", "after-export", "after-delete", "before-manifest")
BEFORE_SYNC = "chunks-before-sync"
"""In the pipeline of the first disk: its chunks are written but not yet durable (nor visible)."""
CASES = [("backup", point) for point in (*CRASH_POINTS, BEFORE_SYNC)] + [("external", "mid-export")]


@pytest.mark.parametrize(("strategy", "point"), CASES)
def test_kill_at_each_step_then_recover(
    two_disk_vm: RunningVm,
    tmp_path: Path,
    state_dir: Path,
    capsys: pytest.CaptureFixture[str],
    strategy: str,
    point: str,
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 2M")
    write(vm, "disk1", "write -P 0x12 4M 1M")
    good = backup(capsys, vm, repo, "--strategy", strategy)
    write(vm, "disk0", "write -P 0x21 1M 1M")
    mode = ["--incremental"] if strategy == "backup" else []
    dead = cli_process(
        "backup", "--repo", repo, *vm_args(vm), "--strategy", strategy, *mode, env={CRASH_ENV: point}
    )
    assert dead.code == -signal.SIGKILL, dead.err
    assert list(state_dir.rglob("journal.json"))  # the dead run's journal, in the local state directory
    assert listed(capsys, repo) == [good["backup_id"]]  # no manifest: the dead run's backup does not exist
    write(vm, "disk1", "write -P 0x5e 3M 1M")

    result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
    assert result.code == 0, result.err
    assert not result.json()["clean"]
    assert block_state(vm) == original
    assert chunks_clean(repo, state_dir)  # no lease, partial backup, journal or work directory
    assert cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json").json()["clean"]

    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    following = backup(capsys, vm, repo, "--strategy", strategy, *mode)
    new_chunks = {d["name"]: d["chunks"]["new_chunks"] for d in following["disks"]}
    assert new_chunks["disk1"] == 1  # the chunk the guest wrote after the dead run
    if point in AFTER_DISK0:
        assert new_chunks["disk0"] == 0  # the dead run had stored disk0's changed chunk: not again
    if point == BEFORE_SYNC:
        assert new_chunks["disk0"] == 1  # it had not made it durable: it was never there, stored now
    restore_and_compare(capsys, repo, following["backup_id"], tmp_path / "restored", expected)
    assert listed(capsys, repo) == [good["backup_id"], following["backup_id"]]
    assert block_state(vm) == original


def test_a_full_store_filesystem_fails_cleanly_and_the_next_backup_works(
    two_disk_vm: RunningVm, tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    with tmpfs(tmp_path / "small", "size=12m,mode=0700") as small:
        repo = small / "repo"
        write(vm, "disk0", "write -P 0x31 0 1M")
        good = backup(capsys, vm, repo)
        for n, disk in enumerate(DISKS):
            data = random_file(tmp_path / f"random-{disk}", 12 << 20)
            write(vm, disk, f"write -s {data} {n}M 12M")
        expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
        result = cli(capsys, "backup", "--repo", repo, *vm_args(vm), "--incremental")
        assert result.code == 1
        assert "full" in result.error_line and "free space" in result.error_line, result.err
        assert listed(capsys, repo) == [good["backup_id"]]
        assert partial_backups(repo) == []  # nothing half-visible
        assert chunks_clean(repo, state_dir)
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        made = backup(capsys, vm, repo, "--incremental")
        restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "r", expected)
        assert cli(capsys, "verify", "--repo", repo).code == 0
