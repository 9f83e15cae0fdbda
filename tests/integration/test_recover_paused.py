"""A backup killed while a strategy had the vCPUs paused (found by the soak: the ``backup`` strategy's pull
fleecing pauses them while its filters go in): ``recover`` (or the next backup) resumes them, and only
when they ran before the backup."""

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


def _status(vm: RunningVm) -> str:
    qmp = vm.machine.qmp()
    try:
        return qmp.status()
    finally:
        vm.machine.close()


@pytest.mark.parametrize("undo", ["recover", "next backup"])
def test_a_backup_killed_while_the_vcpus_are_paused_is_resumed(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], undo: str
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"  # a new directory: a chunks repository, read through pull fleecing
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 2M")
    dead = cli_process("backup", "--repo", repo, *vm_args(vm), env={CRASH_ENV: "fleecing-paused"})
    assert dead.code == -signal.SIGKILL, dead.err
    assert _status(vm) == "paused"  # what the dead run left

    if undo == "recover":
        result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
        assert result.code == 0, result.err
        assert (
            "resumed the VM's vCPUs (the dead run had paused them to snapshot)" in (result.json()["actions"])
        )
        assert _status(vm) == "running"
        assert block_state(vm) == original
    write(vm, "disk1", "write -P 0x21 3M 1M")
    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    made = backup(capsys, vm, repo)
    assert _status(vm) == "running"
    assert listed(capsys, repo) == [made["backup_id"]]
    restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "restored", expected)
    assert block_state(vm) == original


def test_a_vm_paused_before_the_backup_stays_paused(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    qmp = vm.machine.qmp()
    qmp.stop()
    vm.machine.close()
    dead = cli_process("backup", "--repo", repo, *vm_args(vm), env={CRASH_ENV: "fleecing-paused"})
    assert dead.code == -signal.SIGKILL, dead.err
    result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
    assert result.code == 0, result.err
    assert not [a for a in result.json()["actions"] if "resumed" in a]
    assert _status(vm) == "paused"  # the user's pause is the user's
