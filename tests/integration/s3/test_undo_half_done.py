"""A backup whose own undo got half-way (found by the soak): the S3 server is killed while a running VM's
disks are exported from internal snapshots; the backup fails, its undo deletes the snapshots but cannot
remove the partial backup (the server is away), so the journal stays. Once the server is back, ``recover``
must finish the undo — it used to try to delete the snapshots again and fail for ever on "has no internal
snapshot" — and the next backup restores to what the disks held."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningVm
from tests.integration.cli_helpers import (
    block_state,
    capture,
    cli,
    cli_started,
    same_content,
    vm_args,
    wait_stopped,
    write,
)
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.processes import CRASH_ENV

pytestmark = pytest.mark.timeout(600)

DISKS = ("disk0", "disk1")


def _internal_snapshots(vm: RunningVm) -> dict[str, str]:
    """``qemu-img snapshot -l`` of each disk's image (read with -U while QEMU runs)."""
    return {
        disk: subprocess.run(
            ["qemu-img", "snapshot", "-l", "-U", str(image)], capture_output=True, text=True, check=True
        ).stdout
        for disk, image in vm.images.items()
    }


def test_recover_finishes_an_undo_that_deleted_the_snapshots_but_not_the_partial_backup(
    two_disk_vm: RunningVm, own_seaweed: SeaweedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    url = f"s3://{BUCKET}/half-undone"
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 2M")
    write(vm, "disk1", "write -P 0x12 5M 1M")
    first = cli(capsys, "backup", "--repo", url, *vm_args(vm), "--strategy", "internal", "--json")
    assert first.code == 0, first.err
    first_id = first.json()["backup_id"]
    write(vm, "disk0", "write -P 0x21 1M 1M")

    running = cli_started(
        "backup", "--repo", url, *vm_args(vm), "--strategy", "internal", env={CRASH_ENV: "stop:mid-export"}
    )
    wait_stopped(running)
    own_seaweed.kill()
    os.kill(running.pid, signal.SIGCONT)
    _, err = running.communicate(timeout=300)
    assert running.returncode == 1, err
    assert "undoing the run failed too" in err, err  # its snapshots are gone, its partial backup is not
    assert all("backup-" not in listing for listing in _internal_snapshots(vm).values())

    own_seaweed.restart()
    result = cli(capsys, "recover", *vm_args(vm), "--repo", url, "--json")
    assert result.code == 0, result.err
    assert any(a.startswith("removed the unfinished backup") for a in result.json()["actions"]), result.out
    again = cli(capsys, "recover", *vm_args(vm), "--repo", url, "--json")
    assert again.code == 0 and again.json()["clean"], again.out
    listing = cli(capsys, "list", "--repo", url, "--json")
    assert [b["backup_id"] for b in listing.json()["backups"]] == [first_id]

    write(vm, "disk1", "write -P 0x31 9M 1M")
    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    made = cli(capsys, "backup", "--repo", url, *vm_args(vm), "--strategy", "internal", "--json")
    assert made.code == 0, made.err
    out = tmp_path / "restored"
    backup_id = made.json()["backup_id"]
    restored = cli(capsys, "restore", "--repo", url, "--vm", "testvm", "--backup", backup_id, "--to", out)
    assert restored.code == 0, restored.err
    for disk, reference in expected.items():
        assert same_content(out / f"{disk}.qcow2", reference), f"{disk} differs from what the disk held"
    assert block_state(vm) == original
    assert all("backup-" not in listing for listing in _internal_snapshots(vm).values())
