"""A backup killed between its manifest put and its journal's "committed" (found by the soak): the backup is
complete, so ``recover`` (or the next backup) keeps it instead of failing for ever on "is complete; not
discarding it"; it restores to what the disks held, and the next incremental builds on it."""

from __future__ import annotations

import signal
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
from vmsnap.backup.config import CRASH_ENV

DISKS = ("disk0", "disk1")


@pytest.mark.parametrize("undo", ["recover", "next backup"])
def test_a_backup_killed_after_its_manifest_is_kept(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], undo: str
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"  # a new directory: a chunks repository
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 2M")
    write(vm, "disk1", "write -P 0x12 5M 1M")
    first = backup(capsys, vm, repo)
    write(vm, "disk0", "write -P 0x21 1M 1M")
    at_kill = {d: capture(vm, d, tmp_path / f"kill-{d}.qcow2") for d in DISKS}

    dead = cli_process(
        "backup", "--repo", repo, *vm_args(vm), "--incremental", env={CRASH_ENV: "after-manifest"}
    )
    assert dead.code == -signal.SIGKILL, dead.err
    ids = listed(capsys, repo)
    assert len(ids) == 2 and ids[0] == first["backup_id"]  # its manifest is there: it is listed
    sealed = ids[1]
    write(vm, "disk1", "write -P 0x31 9M 1M")  # the guest goes on writing

    if undo == "recover":
        result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
        assert result.code == 0, result.err
        assert f"kept backup {sealed}: it was sealed before the run died" in result.json()["actions"]
        assert cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json").json()["clean"]
    assert listed(capsys, repo) == ids
    restore_and_compare(capsys, repo, sealed, tmp_path / "sealed", at_kill)

    now = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    following = backup(capsys, vm, repo, "--incremental")
    assert following["kind"] == "incremental"
    latest = cli(capsys, "list", "--repo", repo, "--json").json()["backups"][-1]
    assert latest["parent"] == sealed  # the dirty bitmap moved on with the sealed backup
    restore_and_compare(capsys, repo, following["backup_id"], tmp_path / "following", now)
    assert listed(capsys, repo) == [*ids, following["backup_id"]]
    assert block_state(vm) == original
