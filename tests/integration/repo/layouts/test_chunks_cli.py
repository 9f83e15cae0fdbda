"""The chunks layout end to end through the CLI on real QEMU: a new directory becomes a chunks repository;
backup → change → incremental (or second full) → restore → byte compare, for each strategy that runs here
(QEMU's backup job in pull mode, internal, external, btrfs on a loop device, a powered-off image)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.cli_helpers import (
    backup,
    block_state,
    capture,
    cli,
    listed,
    restore_and_compare,
    same_content,
    vm_args,
    wait_until_qmp_listens,
    write,
)
from tests.integration.repo.layouts.helpers import chunks_clean, store_keys
from tests.integration.strategies.loop_btrfs import LoopBtrfs, loop_btrfs  # noqa: F401 (fixture)
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import QemuMachine

DISKS = ("disk0", "disk1")


def test_backup_job_pull_full_then_incrementals_read_only_what_changed(
    two_disk_vm: RunningVm, tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    before = block_state(vm)
    write(vm, "disk0", "write -P 0x11 0 4M", "write -P 0x12 16M 1M")
    write(vm, "disk1", "write -P 0x21 1M 2M")
    expected = [{d: capture(vm, d, tmp_path / f"b1-{d}.qcow2") for d in DISKS}]
    first = backup(capsys, vm, repo)
    marker = json.loads((repo / "vmsnap-repo.json").read_text())
    assert (marker["format"], marker["layout"], marker["encryption"]) == (3, "chunks", None)
    assert marker["chunk_id"] == "blake3"  # what a new repository's chunk ids are
    assert (first["kind"], first["strategy"], first["transport"]) == ("full", "backup", "nbd")  # pull mode

    write(vm, "disk0", "write -P 0x31 2M 64k", "write -z 16M 64k")
    write(vm, "disk1", "write -P 0x41 40M 1M", "discard 1M 64k")
    expected.append({d: capture(vm, d, tmp_path / f"b2-{d}.qcow2") for d in DISKS})
    second = backup(capsys, vm, repo, "--incremental")
    assert second["kind"] == "incremental"
    write(vm, "disk1", "write -P 0x51 0 64k")
    expected.append({d: capture(vm, d, tmp_path / f"b3-{d}.qcow2") for d in DISKS})
    third = backup(capsys, vm, repo, "--incremental")
    assert third["kind"] == "incremental"
    # the incremental read only the chunks the dirty bitmap marks: one 4 MiB chunk of disk1 (0 to 64k)
    third_disks = {d["name"]: d["chunks"] for d in third["disks"]}
    assert third_disks["disk0"]["bytes_read"] == 0 and third_disks["disk1"]["bytes_read"] <= 4 << 20
    assert third_disks["disk0"]["unchanged_chunks"] == 16

    ids = [first["backup_id"], second["backup_id"], third["backup_id"]]
    backups = cli(capsys, "list", "--repo", repo, "--json").json()["backups"]
    assert [b["backup_id"] for b in backups] == ids
    assert backups[2]["parent"] == ids[1] and backups[2]["layout"] == "chunks"
    for backup_id, reference in zip(ids, expected, strict=True):
        restore_and_compare(capsys, repo, backup_id, tmp_path / f"restore-{backup_id}", reference)
    result = cli(capsys, "verify", "--repo", repo, "--json")
    assert result.code == 0 and result.json()["ok"] and len(result.json()["checked"]) == 3, result.err
    assert block_state(vm) == before
    assert chunks_clean(repo, state_dir)
    for path in repo.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    # every backup a complete index: the oldest may go, the others still restore
    assert Repository.open(repo).prune("testvm", 1).removed == (ids[0], ids[1])
    restore_and_compare(capsys, repo, ids[2], tmp_path / "after-prune", expected[2])


@pytest.mark.parametrize("strategy", ["internal", "external"])
def test_file_sources_of_other_strategies(
    two_disk_vm: RunningVm, tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str], strategy: str
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    before = block_state(vm)
    write(vm, "disk0", "write -P 0x61 0 2M")
    write(vm, "disk1", "write -P 0x62 8M 1M")
    expected1 = {d: capture(vm, d, tmp_path / f"1-{d}.qcow2") for d in DISKS}
    first = backup(capsys, vm, repo, "--strategy", strategy)
    assert (first["strategy"], first["transport"], first["kind"]) == (strategy, "nbd", "full")  # qemu-nbd
    write(vm, "disk0", "write -P 0x63 1M 2M")
    expected2 = {d: capture(vm, d, tmp_path / f"2-{d}.qcow2") for d in DISKS}
    second = backup(capsys, vm, repo, "--strategy", strategy)
    # a second full backup stores only the chunk that changed
    assert sum(d["chunks"]["new_chunks"] for d in second["disks"]) == 1
    restore_and_compare(capsys, repo, first["backup_id"], tmp_path / "r1", expected1)
    restore_and_compare(capsys, repo, second["backup_id"], tmp_path / "r2", expected2)
    assert block_state(vm) == before
    assert chunks_clean(repo, state_dir)


def test_a_transport_or_push_is_refused_by_the_chunks_layout(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    for transport in ("copy", "nbd", "none"):
        result = cli(capsys, "backup", "--repo", repo, *vm_args(two_disk_vm), "--transport", transport)
        assert result.code == 2, result.err
        assert "the chunks layout reads the export itself" in result.error_line
    assert not repo.exists() or store_keys(repo) == []  # refused before anything was written


def test_a_powered_off_image_backs_up_and_restores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "disk0.qcow2", "32M")
    qemu_io_file(image, "write -P 0x71 0 3M", "write -P 0x72 20M 1M")
    repo = tmp_path / "repo"
    for strategy in ("auto", "internal"):  # auto: QEMU's backup job offline (it writes an image we read)
        result = cli(capsys, "backup", "--repo", repo, "--image", image, "--strategy", strategy, "--json")
        assert result.code == 0, result.err
        out = tmp_path / f"r-{strategy}"
        restored = cli(capsys, "restore", "--repo", repo, "--vm", "disk0", "--to", out)
        assert restored.code == 0, restored.err
        assert same_content(out / "disk0.qcow2", image)
    assert len(listed(capsys, repo, "--vm", "disk0")) == 2


def qemu_io_file(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def test_btrfs_strategy_into_a_chunks_repository(
    loop_btrfs: LoopBtrfs,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    subvolume = loop_btrfs.subvolume()
    images = {"disk0": make_image(subvolume / "disk0.qcow2"), "disk1": make_image(subvolume / "disk1.qcow2")}
    drives = [DriveSpec(images["disk0"], "disk0"), DriveSpec(images["disk1"], "disk1", bus="scsi")]
    process = QemuProcess(tmp_path, drives, name="testvm").start()
    vm = RunningVm(process, QemuMachine(process.qmp_socket, name="testvm"), images, tmp_path)
    try:
        wait_until_qmp_listens(process.qmp_socket)
        repo = tmp_path / "repo"
        write(vm, "disk0", "write -P 0x91 0 3M")
        write(vm, "disk1", "write -P 0x92 5M 1M")
        expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
        made = backup(capsys, vm, repo, "--strategy", "btrfs")
        assert made["strategy"] == "btrfs"
        write(vm, "disk0", "write -P 0x93 0 1M")  # after the backup: must not show in the restore
        qmp = vm.machine.qmp()
        qemu_io(qmp, "disk0", "flush")
        vm.machine.close()
        restore_and_compare(capsys, repo, made["backup_id"], tmp_path / "r", expected)
    finally:
        vm.machine.close()
        process.stop()
        process.kill()
