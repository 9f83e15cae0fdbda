"""The first backup into a new repository, killed before the repository exists (0.2 s in, and at each crash
point before its marker is there), then ``vmsnap recover --repo NEW``: it exits 0, says what it found (one
line per thing; ``--json`` one object), leaves the VM as it was, and the next backup into NEW works."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import RunningVm
from tests.integration.cli_helpers import (
    backup,
    block_state,
    capture,
    cli,
    cli_process,
    cli_started,
    restore_and_compare,
    vm_args,
    wait_stopped,
    write,
)
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.backup.config import CRASH_ENV, EARLY_CRASH_POINTS
from vmsnap.repo.repository import Repository

DISKS = ("disk0", "disk1")
EARLY = ["0.2s", *EARLY_CRASH_POINTS]


def _kill(vm: RunningVm, repo: Path | str, point: str) -> None:
    """``vmsnap backup --repo REPO`` of ``vm``, killed with SIGKILL 0.2 s in or at crash point ``point``."""
    if point == "0.2s":
        run = cli_started("backup", "--repo", repo, *vm_args(vm))
        time.sleep(0.2)
        os.killpg(run.pid, signal.SIGKILL)
        try:
            run.wait(10)
        finally:
            run.communicate()
        return
    dead = cli_process("backup", "--repo", repo, *vm_args(vm), env={CRASH_ENV: point})
    assert dead.code == -signal.SIGKILL, dead.err


@pytest.mark.parametrize("point", EARLY)
def test_a_first_backup_killed_before_its_repository_exists_is_recovered(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], point: str
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "new"
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 2M")
    _kill(vm, repo, point)

    result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
    assert result.code == 0, result.err
    report = result.json()  # exactly one object
    assert set(report) == {"vm", "clean", "actions", "found"} and report["vm"] == "testvm"
    if point == "before-repository":
        assert report["actions"] == []
        assert f"no vmsnap repository at {repo} (no such directory): nothing to undo in it" in report["found"]
    elif point == "before-marker":
        assert report["actions"] == []
        assert (
            f"no vmsnap repository at {repo} (an empty directory): nothing to undo in it" in report["found"]
        )
    elif point == "store-put-unnamed":
        [removed] = report["actions"]
        assert removed.startswith(f"removed {repo}/.tmp-") and "half-written marker" in removed
        assert (
            f"no vmsnap repository at {repo} (an empty directory): nothing to undo in it" in report["found"]
        )
        assert list(repo.iterdir()) == []
    assert "the machine has no guest agent channel: nothing can have frozen it" in report["found"]
    assert block_state(vm) == original  # no fleecing node, job, export or overlay; the VM runs

    human = cli(capsys, "recover", *vm_args(vm), "--repo", repo)
    assert human.code == 0, human.err
    lines = human.out.splitlines()
    assert "testvm: nothing to recover" in lines
    assert any(line.startswith(f"no vmsnap repository at {repo}") for line in lines) or point == "0.2s"

    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    made = backup(capsys, vm, repo)  # NEW is usable: the dead run left nothing in the way
    restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "restored", expected)
    assert block_state(vm) == original


@pytest.mark.parametrize("point", ["0.2s", "before-marker"])
def test_a_first_backup_into_a_new_s3_prefix_killed_early_is_recovered(
    two_disk_vm: RunningVm,
    s3_env: SeaweedServer,
    s3_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    point: str,
) -> None:
    vm = two_disk_vm
    repo = f"s3://{BUCKET}/{s3_prefix}"
    original = block_state(vm)
    write(vm, "disk1", "write -P 0x22 1M 1M")
    _kill(vm, repo, point)

    result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
    assert result.code == 0, result.err
    report = result.json()
    if point == "before-marker":
        assert report["actions"] == []
        assert (
            f"no vmsnap repository at {repo} (nothing is stored there): nothing to undo in it"
            in report["found"]
        )
    assert block_state(vm) == original

    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    made = backup(capsys, vm, repo)  # type: ignore[arg-type]
    restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "restored", expected)  # type: ignore[arg-type]


def test_recover_leaves_the_marker_that_a_live_init_is_writing(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vmsnap init`` stopped with its marker written into its temporary file, not yet under its name; a
    ``recover --repo`` of the same directory then (it takes no lock for a repository not yet made) must not
    take that file for a dead run's: the init goes on and makes the repository."""
    repo = tmp_path / "new"
    init = cli_started("init", "--repo", repo, env={CRASH_ENV: "stop:store-put-unnamed"})
    try:
        wait_stopped(init)
        [temp] = list(repo.iterdir())
        assert temp.name.startswith(".tmp-")
        result = cli(capsys, "recover", *vm_args(two_disk_vm), "--repo", repo, "--json")
        assert result.code == 0, result.err
        assert result.json()["actions"] == []
        assert temp.exists()
        os.kill(init.pid, signal.SIGCONT)
        _, err = init.communicate(timeout=60)
        assert init.returncode == 0, err
    finally:
        if init.poll() is None:
            os.killpg(init.pid, signal.SIGKILL)
            init.wait(10)
    assert Repository.missing(repo) is None
    expected = {d: capture(two_disk_vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    made = backup(capsys, two_disk_vm, repo)
    restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "restored", expected)
