"""Bad input through the CLI, each a one-line error with the right exit code and nothing lost: unknown or
foreign repositories, missing/locked/corrupt images, a full target filesystem, unknown backup ids, names with
'/' or '..', a manifest whose checksum does not match, a chain with a missing parent."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.cli_helpers import (
    backup,
    block_state,
    capture,
    cli,
    listed,
    no_leftovers,
    qcow2_repo,
    restore_and_compare,
    same_content,
    vm_args,
    write,
)

DISKS = ("disk0", "disk1")
MiB = 1024 * 1024


def holds_pattern(image: Path, pattern: int, length: int) -> bool:
    """True when the first ``length`` bytes of ``image``'s guest-visible content all read as byte ``pattern``
    (``qemu-io read -P`` in a process of its own: QEMU 7.2 prints an HMP ``qemu-io``'s result on its own
    stdout, not in the monitor's reply, so the monitor cannot tell)."""
    read = subprocess.run(
        ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern:#x} 0 {length}", str(image)],
        capture_output=True,
        text=True,
    )
    return read.returncode == 0 and f"read {length}/{length} bytes" in read.stdout


def test_unknown_repository_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    for argv in (
        ["list", "--repo", missing],
        ["verify", "--repo", missing],
        ["restore", "--repo", missing, "--vm", "vm1", "--to", tmp_path / "out"],
        ["prune", "--repo", missing, "--keep-last", "2"],
    ):
        result = cli(capsys, *argv)
        assert result.code == 1
        assert "no vmsnap repository" in result.error_line
    assert not missing.exists()
    assert not (tmp_path / "out").exists()


def test_repository_of_another_format_or_a_foreign_directory_is_left_alone(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    future = tmp_path / "future"
    future.mkdir()
    (future / "vmsnap-repo.json").write_text('{"format": 7}')
    for argv in (["list", "--repo", future], ["backup", "--repo", future, *vm_args(two_disk_vm)]):
        result = cli(capsys, *argv)
        assert result.code == 1
        assert "format 7" in result.error_line
    assert sorted(p.name for p in future.iterdir()) == ["vmsnap-repo.json"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8meow")
    result = cli(capsys, "backup", "--repo", foreign, *vm_args(two_disk_vm))
    assert result.code == 1
    assert "not empty and not a vmsnap repository" in result.error_line
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


@pytest.mark.parametrize(
    "argv",
    [
        ["restore", "--vm", "../etc", "--to", "OUT"],
        ["restore", "--vm", "vm1", "--backup", "../../x", "--to", "OUT"],
        ["list", "--vm", "a/b"],
        ["verify", "--vm", ".."],
        ["prune", "--vm", "../vm1", "--keep-last", "1"],
    ],
)
def test_names_with_slash_or_dots_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "vmsnap-repo.json").write_text('{"format": 1}')
    result = cli(
        capsys, argv[0], "--repo", repo, *[str(tmp_path / "out") if a == "OUT" else a for a in argv[1:]]
    )
    assert result.code == 2
    assert "invalid" in result.error_line
    assert sorted(p.name for p in repo.iterdir()) == ["vmsnap-repo.json"]
    assert not (tmp_path / "out").exists()


def test_bad_vm_and_disk_names_and_options_on_backup(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = qcow2_repo(tmp_path / "repo")
    before = block_state(two_disk_vm)
    cases = [
        (["--name", "../evil"], 2, "invalid VM name"),
        (["--disk", "../disk0"], 2, "invalid disk name"),
        (["--disk", "disk9"], 1, "no disk 'disk9'"),
        (["--strategy", "externl"], 1, "did you mean 'external'"),
        (["--strategy", "external", "--incremental"], 2, "--incremental needs --strategy backup"),
        (["--strategy", "external", "--transport", "none"], 2, "only for strategy backup"),
        (["--quiesce", "on"], 1, "no guest agent answers"),
    ]
    for extra, code, message in cases:
        result = cli(capsys, "backup", "--repo", repo, *vm_args(two_disk_vm), *extra)
        assert (result.code, message in result.error_line) == (code, True), (extra, result.err)
    assert block_state(two_disk_vm) == before
    assert not repo.exists() or no_leftovers(repo)


def test_missing_corrupt_and_locked_images(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = qcow2_repo(tmp_path / "repo")
    result = cli(capsys, "backup", "--repo", repo, "--image", tmp_path / "absent.qcow2")
    assert result.code == 1
    assert "does not exist" in result.error_line
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\xff" * 4000)
    result = cli(capsys, "backup", "--repo", repo, "--image", garbage)
    assert result.code == 1
    assert "garbage.qcow2" in result.error_line
    # the running VM's own image, taken as a powered-off one: QEMU's lock refuses the snapshot
    write(two_disk_vm, "disk0", "write -P 0x42 0 1M")
    before = block_state(two_disk_vm)
    image = two_disk_vm.images["disk0"]
    result = cli(capsys, "backup", "--repo", repo, "--image", image, "--strategy", "internal")
    assert result.code == 1
    assert "lock" in result.error_line
    assert block_state(two_disk_vm) == before
    assert holds_pattern(capture(two_disk_vm, "disk0", tmp_path / "after.qcow2"), 0x42, 1 * MiB)
    assert listed(capsys, repo) == []
    assert no_leftovers(repo, "disk0")


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 on a loop device we create, mounted at tmp_path/small; unmounted and detached after."""
    backing = tmp_path / "small.img"
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", "24M", str(backing)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(backing)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.parametrize("strategy", ["backup", "external"])
def test_a_full_target_filesystem_fails_cleanly_and_keeps_earlier_backups(
    two_disk_vm: RunningVm,
    tmp_path: Path,
    small_filesystem: Path,
    capsys: pytest.CaptureFixture[str],
    strategy: str,
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(small_filesystem / "repo")
    original = block_state(vm)
    write(vm, "disk0", "write -P 0x01 0 1M")
    expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
    good = backup(capsys, vm, repo, "--strategy", strategy)
    write(vm, "disk0", "write -P 0x02 0 30M")  # more than the filesystem holds
    result = cli(capsys, "backup", "--repo", repo, *vm_args(vm), "--strategy", strategy)
    assert result.code == 1
    line = result.error_line
    assert "No space left" in line or "full" in line, line
    assert block_state(vm) == original
    assert no_leftovers(repo)
    assert listed(capsys, repo) == [good["backup_id"]]
    restore_and_compare(capsys, repo, good["backup_id"], tmp_path / "r", expected)
    # the VM kept the data the failed backup could not store
    assert holds_pattern(capture(vm, "disk0", tmp_path / "after.qcow2"), 0x02, 30 * MiB)


def test_checksum_mismatch_missing_parent_and_unknown_backup_id(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = qcow2_repo(tmp_path / "repo")
    write(vm, "disk0", "write -P 0x0a 0 1M")
    full = backup(capsys, vm, repo)
    write(vm, "disk0", "write -P 0x0b 0 64k")
    expected = {d: capture(vm, d, tmp_path / f"e-{d}.qcow2") for d in DISKS}
    inc = backup(capsys, vm, repo, "--incremental")

    result = cli(
        capsys, "restore", "--repo", repo, "--vm", "testvm", "--backup", "20200101T000000.000000Z-0000"
    )
    assert result.code == 2  # --to missing: a usage error
    unknown = "20200101T000000.000000Z-0000"
    result = cli(
        capsys, "restore", "--repo", repo, "--vm", "testvm", "--backup", unknown, "--to", tmp_path / "x"
    )
    assert result.code == 1
    assert "no backup '20200101T000000.000000Z-0000'" in result.error_line
    assert inc["backup_id"] in result.error_line  # names the latest that exists

    # a manifest whose checksum does not match what the image holds
    manifest_path = repo / "testvm" / inc["backup_id"] / "manifest.json"
    pristine = manifest_path.read_text()
    data = json.loads(pristine)
    data["disks"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(data))
    result = cli(capsys, "verify", "--repo", repo, "--reader", "qemu")
    assert result.code == 1
    assert "sha256" in result.error_line and inc["backup_id"] in result.error_line
    result = cli(
        capsys,
        "restore",
        "--repo",
        repo,
        "--vm",
        "testvm",
        "--backup",
        inc["backup_id"],
        "--to",
        tmp_path / "bad",
    )
    assert result.code == 1
    assert "sha256" in result.error_line
    assert not list((tmp_path / "bad").iterdir())  # nothing half-restored left behind
    manifest_path.write_text(pristine)

    # a chain whose parent is gone
    parked = tmp_path / "parked"
    shutil.move(repo / "testvm" / full["backup_id"], parked)
    for argv in (
        ["restore", "--repo", repo, "--vm", "testvm", "--to", tmp_path / "chain"],
        ["verify", "--repo", repo, "--vm", "testvm"],
    ):
        result = cli(capsys, *argv)
        assert result.code == 1
        assert "missing" in result.error_line
    # putting the parent back makes everything good again: nothing was lost
    shutil.move(parked, repo / "testvm" / full["backup_id"])
    assert cli(capsys, "verify", "--repo", repo, "--reader", "libqcow").code == 0
    restore_and_compare(capsys, repo, inc["backup_id"], tmp_path / "ok", expected)
    # a damaged manifest: list shows the rest, names the damaged one, and exits 1
    (repo / "testvm" / full["backup_id"] / "manifest.json").write_text("{")
    result = cli(capsys, "list", "--repo", repo, "--json")
    assert result.code == 1
    data = json.loads(result.out)
    assert [b["backup_id"] for b in data["backups"]] == [inc["backup_id"]]
    assert [d["backup_id"] for d in data["damaged"]] == [full["backup_id"]]
    assert "damaged manifest" in result.error_line


def test_restore_of_an_offline_image_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "data.qcow2", "16M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 1M 2M", str(image)], check=True, capture_output=True
    )
    reference = tmp_path / "reference.qcow2"
    shutil.copy(image, reference)
    repo = qcow2_repo(tmp_path / "repo")
    result = cli(capsys, "backup", "--repo", repo, "--image", image, "--json")
    assert result.code == 0, result.err
    made = result.json()
    assert (made["vm"], made["strategy"], made["transport"]) == ("data", "backup", "none")
    result = cli(capsys, "restore", "--repo", repo, "--vm", "data", "--to", tmp_path / "out", "--json")
    assert result.code == 0, result.err
    assert same_content(tmp_path / "out" / "data.qcow2", reference)
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True).stdout
    )
    assert "snapshots" not in info or not info["snapshots"]
    # and the internal strategy on the same image: its temporary snapshot is deleted again
    result = cli(capsys, "backup", "--repo", repo, "--image", image, "--strategy", "internal", "--json")
    assert result.code == 0, result.err
    result = cli(capsys, "restore", "--repo", repo, "--vm", "data", "--to", tmp_path / "out2")
    assert result.code == 0, result.err
    assert same_content(tmp_path / "out2" / "data.qcow2", reference)
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True).stdout
    )
    assert "snapshots" not in info or not info["snapshots"]
