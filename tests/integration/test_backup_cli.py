"""End to end through the CLI on a running two-disk QEMU: backup → write more → incremental → restore →
compare with what the disks held at each backup; every strategy and transport pair that makes sense here."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.cli_helpers import (
    backup,
    block_state,
    capture,
    cli,
    cli_on_a_terminal,
    listed,
    no_leftovers,
    qcow2_repo,
    restore_and_compare,
    vm_args,
    wait_until_qmp_listens,
    write,
)
from tests.integration.repo.layouts.helpers import random_file
from tests.integration.strategies.loop_btrfs import LoopBtrfs, loop_btrfs  # noqa: F401 (fixture)
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.vm.machine import QemuMachine

DISKS = ("disk0", "disk1")
# DESIGN.md's shape, plus freeze_ms (how long the guest was frozen; null when it was not)
BACKUP_KEYS = {"vm", "backup_id", "kind", "strategy", "transport", "disks", "seconds", "freeze_ms"}
DISK_KEYS = {"name", "file", "virtual_size", "bytes_written", "sha256"}


def test_backup_strategy_full_then_incrementals_restore_each_moment(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    before = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 4M", "write -P 0x12 16M 1M")
    write(vm, "disk1", "write -P 0x21 1M 2M")
    expected = [{d: capture(vm, d, tmp_path / f"b1-{d}.qcow2") for d in DISKS}]
    first = backup(capsys, vm, repo)
    assert set(first) == BACKUP_KEYS
    assert all(set(d) == DISK_KEYS for d in first["disks"])
    assert (first["vm"], first["kind"], first["strategy"], first["transport"]) == (
        "testvm",
        "full",
        "backup",
        "none",
    )

    write(vm, "disk0", "write -P 0x31 2M 64k", "write -z 16M 64k")
    write(vm, "disk1", "write -P 0x41 40M 1M", "discard 1M 64k")
    expected.append({d: capture(vm, d, tmp_path / f"b2-{d}.qcow2") for d in DISKS})
    second = backup(capsys, vm, repo, "--incremental")
    assert second["kind"] == "incremental"

    write(vm, "disk1", "write -P 0x51 0 64k")
    expected.append({d: capture(vm, d, tmp_path / f"b3-{d}.qcow2") for d in DISKS})
    third = backup(capsys, vm, repo, "--incremental")
    assert third["kind"] == "incremental"

    ids = [first["backup_id"], second["backup_id"], third["backup_id"]]
    assert listed(capsys, repo) == ids == sorted(ids)
    manifests = {b["backup_id"]: b for b in cli(capsys, "list", "--repo", repo, "--json").json()["backups"]}
    assert manifests[ids[1]]["parent"] == ids[0] and manifests[ids[2]]["parent"] == ids[1]
    # an incremental holds only the changed clusters: far less than the full backup
    full_size = sum(d["bytes_written"] for d in first["disks"])
    assert sum(d["bytes_written"] for d in third["disks"]) < full_size / 4
    for backup_id, reference in zip(ids, expected, strict=True):
        restore_and_compare(capsys, repo, backup_id, tmp_path / f"restore-{backup_id}", reference)
    for reader in ("qemu", "libqcow"):
        result = cli(capsys, "verify", "--repo", repo, "--reader", reader, "--json")
        assert result.code == 0, result.err
        assert result.json()["ok"] and len(result.json()["checked"]) == 3
    # the VM runs on its original chain, nothing of vmsnap's left in QEMU or the repository
    assert block_state(vm) == before
    assert no_leftovers(repo)
    for path in (repo / "testvm").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


@pytest.mark.parametrize(
    ("strategy", "transport"),
    [
        ("external", "copy"),
        ("external", "nbd"),
        ("external", "rsync"),
        ("internal", "nbd"),
        ("backup", "nbd"),  # pull mode: fleecing + NBD export, read by the nbd transport
    ],
)
def test_strategy_and_transport_pairs_back_up_and_restore(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str, transport: str
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    before = block_state(vm)
    write(vm, "disk0", "write -P 0x61 0 2M")
    write(vm, "disk1", "write -P 0x62 8M 1M")
    expected1 = {d: capture(vm, d, tmp_path / f"1-{d}.qcow2") for d in DISKS}
    first = backup(capsys, vm, repo, "--strategy", strategy, "--transport", transport)
    assert (first["strategy"], first["transport"], first["kind"]) == (strategy, transport, "full")
    write(vm, "disk0", "write -P 0x63 1M 2M")
    expected2 = {d: capture(vm, d, tmp_path / f"2-{d}.qcow2") for d in DISKS}
    second = backup(capsys, vm, repo, "--strategy", strategy, "--transport", transport)
    restore_and_compare(capsys, repo, first["backup_id"], tmp_path / "r1", expected1)
    restore_and_compare(capsys, repo, second["backup_id"], tmp_path / "r2", expected2)
    assert block_state(vm) == before
    assert no_leftovers(repo)


def test_pull_mode_incremental_reads_only_dirty_extents_over_nbd(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    before = block_state(vm)
    write(vm, "disk0", "write -P 0x81 0 8M")
    write(vm, "disk1", "write -P 0x82 0 8M")
    full = backup(capsys, vm, repo, "--transport", "nbd")
    write(vm, "disk0", "write -P 0x83 1M 64k", "write -z 4M 64k")
    expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
    inc = backup(capsys, vm, repo, "--transport", "nbd", "--incremental")
    assert (inc["kind"], inc["transport"]) == ("incremental", "nbd")
    assert sum(d["bytes_written"] for d in inc["disks"]) < sum(d["bytes_written"] for d in full["disks"]) / 4
    restore_and_compare(capsys, repo, inc["backup_id"], tmp_path / "r", expected)
    assert cli(capsys, "verify", "--repo", repo, "--reader", "libqcow").code == 0
    assert block_state(vm) == before
    assert no_leftovers(repo)


def test_an_incremental_without_a_usable_bitmap_falls_back_to_full_and_says_why(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    write(vm, "disk0", "write -P 0x95 0 1M")
    backup(capsys, vm, repo)
    qmp = vm.machine.qmp()
    try:  # as if QEMU had been restarted without writing its persistent bitmaps
        qmp.execute("block-dirty-bitmap-remove", {"node": "fmt-disk1", "name": "vmsnap"})
    finally:
        vm.machine.close()
    write(vm, "disk1", "write -P 0x96 0 1M")
    expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
    result = cli(capsys, "backup", "--repo", repo, *vm_args(vm), "--incremental", "--json")
    assert result.code == 0, result.err
    made = result.json()
    assert made["kind"] == "full"
    assert "full backup" in result.err and "bitmap" in result.err
    manifest = cli(capsys, "list", "--repo", repo, "--json").json()["backups"][-1]
    assert manifest["parent"] is None
    restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "r", expected)
    following = backup(capsys, vm, repo, "--incremental")  # the chain goes on from the new full
    assert following["kind"] == "incremental"


def test_help_has_an_example_for_each_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("backup", "restore", "list", "verify", "prune", "recover"):
        result = cli(capsys, command, "--help")
        assert result.code == 0
        assert re.search(f"examples?:\n  vmsnap {command}", result.out)


def test_prune_through_the_cli_keeps_what_the_last_backup_needs(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    write(vm, "disk0", "write -P 0x71 0 1M")
    full = backup(capsys, vm, repo, "--disk", "disk0")
    write(vm, "disk0", "write -P 0x72 0 64k")
    inc = backup(capsys, vm, repo, "--disk", "disk0", "--incremental")
    expected = {"disk0": capture(vm, "disk0", tmp_path / "e.qcow2")}
    result = cli(capsys, "prune", "--repo", repo, "--vm", "testvm", "--keep-last", "1", "--json")
    assert result.code == 0, result.err
    pruned = result.json()["pruned"][0]
    assert pruned["removed"] == [] and pruned["needed"] == [full["backup_id"]]
    assert listed(capsys, repo) == [full["backup_id"], inc["backup_id"]]
    restore_and_compare(capsys, repo, inc["backup_id"], tmp_path / "r", expected)
    third = backup(capsys, vm, repo, "--disk", "disk0")  # a new full: the old chain may go
    result = cli(capsys, "prune", "--repo", repo, "--keep-last", "1", "--json")
    assert result.json()["pruned"][0]["removed"] == [full["backup_id"], inc["backup_id"]]
    assert listed(capsys, repo) == [third["backup_id"]]
    bad = cli(capsys, "prune", "--repo", repo, "--keep-last", "0")
    assert bad.code == 2 and "keep at least one" in bad.error_line


def test_list_and_json_outputs_are_single_objects(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = qcow2_repo(tmp_path / "repo")
    made = backup(capsys, two_disk_vm, repo, "--quiesce", "auto")
    for argv in (
        ["list", "--repo", repo, "--json"],
        ["verify", "--repo", repo, "--vm", "testvm", "--backup", made["backup_id"], "--json"],
    ):
        result = cli(capsys, *argv)
        assert result.code == 0, result.err
        json.loads(result.out)  # exactly one JSON document
    human = cli(capsys, "list", "--repo", repo)
    assert made["backup_id"] in human.out


def test_btrfs_strategy_backs_up_a_vm_on_a_btrfs_subvolume(
    loop_btrfs: LoopBtrfs,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    subvolume = loop_btrfs.subvolume()
    images = {"disk0": make_image(subvolume / "disk0.qcow2"), "disk1": make_image(subvolume / "disk1.qcow2")}
    drives = [DriveSpec(images["disk0"], "disk0"), DriveSpec(images["disk1"], "disk1", bus="scsi")]
    process = QemuProcess(tmp_path, drives, name="testvm").start()
    vm = RunningVm(process, QemuMachine(process.qmp_socket, name="testvm"), images, tmp_path)  # no I/O yet
    try:
        wait_until_qmp_listens(process.qmp_socket)
        repo = qcow2_repo(tmp_path / "repo")
        before = block_state(vm)
        write(vm, "disk0", "write -P 0x91 0 3M")
        write(vm, "disk1", "write -P 0x92 5M 1M")
        expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
        made = backup(capsys, vm, repo, "--strategy", "btrfs", "--transport", "copy")
        assert (made["strategy"], made["transport"]) == ("btrfs", "copy")
        write(vm, "disk0", "write -P 0x93 0 1M")  # after the backup: must not show in the restore
        restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "r", expected)
        assert block_state(vm) == before
        assert no_leftovers(repo)
        snapshots = loop_btrfs.mount / ".vmsnap"  # the strategy's snapshot sets: the backup's is deleted
        assert not snapshots.exists() or list(snapshots.iterdir()) == []
    finally:
        vm.machine.close()
        process.stop()
        process.kill()


def test_progress_shows_a_bar_per_disk_with_rate_on_a_terminal_and_nothing_with_json(
    two_disk_vm: RunningVm, tmp_path: Path
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")  # pull mode through the nbd transport (qcow2 layout)
    write(vm, "disk0", "write -P 0x31 0 16M")
    write(vm, "disk1", "write -P 0x32 0 16M")
    shown = cli_on_a_terminal("backup", "--repo", repo, *vm_args(vm), "--transport", "nbd")
    assert shown.code == 0, shown.err
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.err)  # without colours and cursor moves
    for disk in DISKS:  # each disk's bar ends complete: 100 %, bytes done of all, a rate, no time left
        assert re.search(rf"{disk}\s+━+\s+100%\s+([\d.]+)/\1 MiB\s+[\d.,]+ MiB/s\s+0:00:00", screen), screen
    assert "backed up testvm" in shown.out
    quiet = cli_on_a_terminal("backup", "--repo", repo, *vm_args(vm), "--transport", "nbd", "--json")
    assert quiet.code == 0, quiet.err
    assert quiet.err == ""
    assert json.loads(quiet.out)["kind"] == "full"


def test_progress_of_a_chunks_backup_shows_what_was_read_stored_and_deduplicated(
    two_disk_vm: RunningVm, tmp_path: Path
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"  # a new directory: a chunks repository, read by its pipeline
    for disk in DISKS:  # four different 4 MiB chunks of random data per disk: nothing compresses
        chunks = [random_file(tmp_path / f"{disk}-{n}", 4 << 20) for n in range(4)]
        write(vm, disk, *[f"write -s {chunk} {4 * n}M 4M" for n, chunk in enumerate(chunks)])
    figures = re.compile(r"(disk\d)\s+━+.*read (\d+) MiB · stored (\d+) MiB · dedup (\d+) MiB")
    seen = []
    for _ in range(2):  # a full backup, then another full one: everything is in the store already
        shown = cli_on_a_terminal("backup", "--repo", repo, *vm_args(vm))
        assert shown.code == 0, shown.err
        screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.err)
        last = {m[1]: tuple(int(n) for n in m.groups()[1:]) for m in figures.finditer(screen)}
        assert tuple(sorted(last)) == DISKS, screen
        seen.append(last)
    for disk in DISKS:
        (read, stored, dedup), (read2, stored2, dedup2) = seen[0][disk], seen[1][disk]
        assert read >= 16 and dedup == 0 and stored >= 16, seen  # stored whole: random data
        assert read2 >= 16 and stored2 == 0 and dedup2 == 16, seen


def test_restore_define_checks_the_backup_before_writing_anything(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, out = tmp_path / "repo", tmp_path / "restored"
    backup(capsys, two_disk_vm, repo)  # of a bare QEMU: no libvirt definition is kept with it
    restore = ["restore", "--repo", repo, "--vm", "testvm", "--to", out]
    result = cli(capsys, *restore, "--define", "testvm-copy")
    assert result.code == 1 and "has no saved libvirt definition" in result.error_line
    result = cli(capsys, *restore, "--define", "../x")
    assert result.code == 2 and "domain name" in result.error_line
    assert not out.exists()
