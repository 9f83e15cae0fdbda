"""``kill -9`` of a ``vmsnap backup`` process at each step, then ``vmsnap recover`` (or the next backup): the
VM runs on its original chain with every write kept, nothing partial is listed, the next backup succeeds."""

from __future__ import annotations

import contextlib
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
    no_leftovers,
    processes_matching,
    qcow2_repo,
    restore_and_compare,
    vm_args,
    write,
)
from vmsnap.backup.config import CRASH_ENV
from vmsnap.backup.recover import _orphan_patterns, stop_orphans
from vmsnap.lab.guest import LabGuest, fsck_image, read_image_file
from vmsnap.lab.qemu import qemu_io
from vmsnap.repo.journal import Journal
from vmsnap.repo.repository import Repository

DISKS = ("disk0", "disk1")

CASES = [
    ("backup", "after-start"),
    ("backup", "after-create"),  # the backup jobs still run in QEMU when the process dies
    ("backup", "mid-export"),
    ("backup", "after-delete"),
    ("backup", "before-manifest"),
    ("external", "after-create"),  # the guest now writes into an overlay that must be committed back
    ("external", "mid-export"),
    ("internal", "mid-export"),  # a qemu-nbd serves the snapshot
    ("backup+nbd", "mid-export"),  # pull mode: fleecing nodes, a filter above the disk, an NBD export
]


@pytest.mark.parametrize(("strategy", "point"), CASES)
def test_kill_at_each_step_then_recover(
    two_disk_vm: RunningVm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    strategy: str,
    point: str,
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 2M")
    write(vm, "disk1", "write -P 0x12 4M 1M")
    strategy, _, transport = strategy.partition("+")
    choice = ["--strategy", strategy, *(["--transport", transport] if transport else [])]
    good = backup(capsys, vm, repo, *choice)
    write(vm, "disk0", "write -P 0x21 1M 1M")
    mode = ["--incremental"] if strategy == "backup" else []
    dead = cli_process("backup", "--repo", repo, *vm_args(vm), *choice, *mode, env={CRASH_ENV: point})
    assert dead.code == -signal.SIGKILL, dead.err
    journal = Journal.load(repo / "testvm" / ".journal.json")
    assert journal is not None
    patterns = _orphan_patterns(journal)
    request.addfinalizer(lambda: stop_orphans(patterns))  # also when an assertion below fails
    orphans = processes_matching(patterns)
    if strategy == "internal":
        assert orphans, "the dead run's qemu-nbd should still be serving the snapshot"
    assert listed(capsys, repo) == [good["backup_id"]]  # the dead run's backup is not listed
    # the guest goes on writing while the dead run's snapshot is still in place
    write(vm, "disk1", "write -P 0x5e 3M 1M")

    result = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["actions"] and not report["clean"]
    assert block_state(vm) == original  # same files, nodes; no job left
    assert no_leftovers(repo)
    assert processes_matching(patterns) == []
    again = cli(capsys, "recover", *vm_args(vm), "--repo", repo, "--json")
    assert again.code == 0 and again.json()["clean"]

    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    following = backup(capsys, vm, repo, *choice, *mode)
    if strategy == "backup" and point != "after-start":
        assert following["kind"] == "full"  # the dead run had moved the dirty bitmap on
    restore_and_compare(capsys, repo, following["backup_id"], tmp_path / "restored", expected)
    assert listed(capsys, repo) == [good["backup_id"], following["backup_id"]]
    assert block_state(vm) == original


@pytest.mark.parametrize("strategy", ["external", "backup"])
def test_sigterm_undoes_the_run_at_once(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x41 0 1M")
    stopped = cli_process(
        "backup", "--repo", repo, *vm_args(vm), "--strategy", strategy, env={CRASH_ENV: "term:after-create"}
    )
    assert stopped.code == 130, stopped.err
    assert stopped.err.strip().endswith("vmsnap: interrupted")
    assert block_state(vm) == original  # undone by the process itself: no recover needed
    assert no_leftovers(repo)
    assert listed(capsys, repo) == []


def test_the_next_backup_recovers_by_itself(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x31 0 1M")
    dead = cli_process(
        "backup", "--repo", repo, *vm_args(vm), "--strategy", "external", env={CRASH_ENV: "mid-export"}
    )
    assert dead.code == -signal.SIGKILL
    write(vm, "disk0", "write -P 0x32 512k 64k")  # lands in the dead run's overlay
    expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
    result = cli(capsys, "backup", "--repo", repo, *vm_args(vm), "--strategy", "external", "--json")
    assert result.code == 0, result.err
    assert "recovered a dead run" in result.err
    assert block_state(vm) == original
    restore_and_compare(capsys, repo, result.json()["backup_id"], tmp_path / "r", expected)


def test_a_run_meeting_the_lock_says_so(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repository.open(tmp_path / "repo", create=True, layout="qcow2")
    before = block_state(two_disk_vm)
    with repo.lock("testvm"):
        result = cli(capsys, "backup", "--repo", repo.root, *vm_args(two_disk_vm))
        assert result.code == 1
        assert "another vmsnap run holds" in result.error_line
        recover = cli(capsys, "recover", *vm_args(two_disk_vm), "--repo", repo.root)
        assert recover.code == 1
    assert block_state(two_disk_vm) == before
    assert listed(capsys, repo.root) == []


@pytest.mark.guest
def test_killed_while_the_guest_is_frozen_then_recovered(
    lab_guest: LabGuest, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    guest = lab_guest
    request.addfinalizer(lambda: _leave_thawed(guest))  # the lab guest is shared by the session
    guest.write_file("/mnt/data/before.txt", b"before\n")
    _sync(guest)
    selector = ["--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket)]
    repo = qcow2_repo(tmp_path / "repo")
    first = cli(capsys, "backup", "--repo", repo, *selector, "--quiesce", "on", "--json")
    assert first.code == 0, first.err
    manifests = cli(capsys, "list", "--repo", repo, "--json").json()["backups"]
    assert manifests[0]["quiesced"] is True
    # dies with the guest frozen and the backup jobs running
    dead = cli_process(
        "backup",
        "--repo",
        repo,
        *selector,
        "--quiesce",
        "on",
        "--incremental",
        env={CRASH_ENV: "after-create"},
    )
    assert dead.code == -signal.SIGKILL, dead.err
    result = cli(capsys, "recover", *selector, "--repo", repo, "--json")
    assert result.code == 0, result.err
    assert guest.is_thawed()
    guest.write_file("/mnt/data/after.txt", b"after\n")
    _sync(guest)
    following = cli(capsys, "backup", "--repo", repo, *selector, "--quiesce", "on", "--incremental", "--json")
    assert following.code == 0, following.err
    made = following.json()
    assert made["kind"] == "full"  # the dead run had moved the dirty bitmap on
    out = tmp_path / "restored"
    restored = cli(capsys, "restore", "--repo", repo, "--vm", made["vm"], "--to", out)
    assert restored.code == 0, restored.err
    image = out / "data.qcow2"
    assert fsck_image(image).clean
    assert read_image_file(image, "/after.txt") == b"after\n"
    assert read_image_file(image, "/before.txt") == b"before\n"
    assert no_leftovers(repo, made["vm"])


def _sync(guest: LabGuest) -> None:
    """sync in the guest and flush QEMU's cache, through the machine's current agent (LabGuest.sync's runner
    keeps the agent of before a ``machine.close()``, which then waits for the socket); free both sockets."""
    assert guest.agent.run("sync").exit_code == 0
    for drive in guest.drives:
        qemu_io(guest.machine.qmp(), drive.id, "flush")
    guest.machine.close()


def _leave_thawed(guest: LabGuest) -> None:
    with contextlib.suppress(Exception):
        if not guest.is_thawed():
            guest.agent.fsfreeze_thaw()
    guest.machine.close()


def test_qemu_died_too_recover_offline_with_the_images(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    dead = cli_process(
        "backup", "--repo", repo, *vm_args(vm), "--strategy", "external", env={CRASH_ENV: "after-create"}
    )
    assert dead.code == -signal.SIGKILL
    write(vm, "disk0", "write -P 0x77 0 1M")  # goes into the dead run's overlay
    assert [Path(f).name for _, _, f, _ in block_state(vm)[:2]] != ["disk0.qcow2", "disk1.qcow2"]
    vm.process.kill()  # and now the VM dies as well
    images = [vm.images["disk0"], vm.images["disk1"]]
    argv = ["recover", "--repo", repo, "--name", "testvm", "--json"]
    result = cli(capsys, *argv, *[a for image in images for a in ("--image", image)])
    assert result.code == 0, result.err
    assert not list(tmp_path.glob("*.vmsnap-*"))  # overlays committed back and removed
    assert no_leftovers(repo)
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 0 1M", str(images[0])], capture_output=True, text=True
    )
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout  # the write was kept
    for image in images:  # standalone again, nothing hanging off them
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True
        )
        assert "backing-filename" not in info.stdout
