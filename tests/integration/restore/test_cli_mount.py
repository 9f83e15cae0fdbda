"""``vmsnap mount``/``umount``/``recover`` end to end: backups taken by ``vmsnap backup`` of a GPT disk (ext4,
xfs, btrfs), the files changed afterwards, each backup mounted and compared file by file and mode by mode
with its moment; the bad inputs, each one line with its exit status; nothing left behind."""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_helpers import cli, cli_process
from tests.integration.restore.conftest import BackedUpDisk, daemon_pids, empty_dirs
from tests.integration.restore.images import (
    Layout,
    MiB,
    change_through_daemon,
    loop,
    partition,
    pattern,
    run,
    snapshot,
    write_v2,
)
from tests.integration.restore.test_mount import assert_nothing_left, assert_same_tree
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.repository import Repository
from vmsnap.restore.commands import mounts_dir

PARTS = {"p1": "", "p2": "", "p3": ""}


def backup_image(capsys: pytest.CaptureFixture[str], repo: Path, image: Path, vm: str) -> dict[str, Any]:
    """``vmsnap backup --image`` (a powered-off disk); returns its JSON object."""
    result = cli(capsys, "backup", "--repo", repo, "--image", image, "--name", vm, "--json")
    assert result.code == 0, result.err
    data: dict[str, Any] = result.json()
    assert [d["name"] for d in data["disks"]] == [image.stem]
    return data


@pytest.mark.parametrize("layout", ["chunks", "qcow2"])
def test_mount_each_backup_as_it_was_then_umount_leaves_nothing(
    backed_up_disk: BackedUpDisk,
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: str,
) -> None:
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)  # the v1 files
    repo = tmp_path / "repo"
    assert cli(capsys, "init", "--repo", repo, "--layout", layout).code == 0
    first = backup_image(capsys, repo, image, "vm1")["backup_id"]
    v2 = change_through_daemon(
        image, backed_up_disk.table, lambda name, root: write_v2(root, f"t{name[1:]}"), PARTS
    )
    backup_image(capsys, repo, image, "vm1")
    change_through_daemon(  # after the last backup: no mount may show it
        image, backed_up_disk.table, lambda name, root: (root / "later").write_bytes(b"x"), PARTS
    )
    at_first, at_latest, other, busy = empty_dirs(tmp_path, "first", "latest", "other", "busy")

    made = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", "--backup", first, at_first, "--json")
    assert made.code == 0, made.err
    data = made.json()
    assert (data["vm"], data["backup_id"], data["disk"], data["table"]) == ("vm1", first, "disk0", "gpt")
    assert {p["name"]: p["fstype"] for p in data["partitions"]} == {"p1": "ext4", "p2": "xfs", "p3": "btrfs"}
    assert [s["name"] for s in data["skipped"]] == ["p4"]
    for name, tree in backed_up_disk.v1.items():
        assert_same_tree(snapshot(at_first / name), tree)
    latest = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", at_latest)  # the latest, human output
    assert latest.code == 0, latest.err
    assert "xfs" in latest.out and f"vmsnap umount {at_latest}" in latest.out
    for name, tree in v2.items():
        assert_same_tree(snapshot(at_latest / name), tree)
    listed = cli(capsys, "mount", "--list", "--json").json()["mounts"]
    assert sorted(m["mountpoint"] for m in listed) == sorted([str(at_first), str(at_latest)])
    assert all(m["healthy"] for m in listed)
    pids = daemon_pids(run_root)
    # per mount: qemu-storage-daemon (qcow2 chain → FUSE); chunks: nbdkit serving the index, and the daemon
    assert len(pids) == (2 if layout == "qcow2" else 4)

    (busy / "something").write_text("x")
    unknown = "20990101T000000.000000Z-beef"
    for argv, code, words in [
        (["--backup", first, other], 2, f"mounted already at {at_first}"),
        ([busy], 2, f"this backup disk is mounted already at {at_latest}"),
        (["--backup", unknown, other], 1, f"no backup '{unknown}' of VM 'vm1'"),
        (["--disk", "disk9", other], 1, "has no disk 'disk9'"),
    ]:
        result = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", *argv)
        assert result.code == code, result.err
        assert words in result.error_line
        assert result.out == ""
    for argv, code, words in [
        (["mount", "--repo", repo, "--vm", "vm2", other], 1, "no backups of VM 'vm2'"),
        (["mount", "--repo", repo, other], 2, "--repo and --vm"),
        (["mount", "--list", other], 2, "--list takes no backup"),
        (["umount", other], 1, f"nothing mounted at {other}"),
    ]:
        result = cli(capsys, *argv)
        assert (result.code, result.out) == (code, ""), result.err
        assert words in result.error_line
    assert list(other.iterdir()) == [] and [p.name for p in busy.iterdir()] == ["something"]

    for target in (at_first, at_latest):
        assert cli(capsys, "umount", target).code == 0
    assert_nothing_left(mounts_dir(run_root), [at_first, at_latest, other], pids)
    assert cli(capsys, "mount", "--list", "--json").json() == {"mounts": []}


def test_a_disk_without_a_filesystem_and_a_busy_mountpoint_are_one_line_each(
    run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "blank.raw"
    with open(raw, "wb") as out:
        out.truncate(24 * MiB)
    table = partition(raw, (Layout(1, 8 * MiB, None, "blank"), Layout(2, 8 * MiB, None, "sw")))
    with loop(raw, *table[2]) as device:
        run("mkswap", device)
    image = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    repo = tmp_path / "repo"
    backup_image(capsys, repo, image, "vm2")
    target, busy = empty_dirs(tmp_path, "m", "busy")
    (busy / "something").write_text("x")
    refused = cli(capsys, "mount", "--repo", repo, "--vm", "vm2", busy)
    assert refused.code == 2 and f"mountpoint {busy} is not empty" in refused.error_line
    missing = cli(capsys, "mount", "--repo", repo, "--vm", "vm2", tmp_path / "missing")
    assert missing.code == 1 and f"mountpoint {tmp_path / 'missing'} does not exist" in missing.error_line
    result = cli(capsys, "mount", "--repo", repo, "--vm", "vm2", target)
    assert result.code == 1
    assert result.error_line.startswith(
        "vmsnap: error: no filesystem vmsnap can mount on this disk: "
        "partition p1 (Linux filesystem): no filesystem (blkid found nothing); "
        "partition p2 (Linux filesystem): swap space, no files — "
    )
    assert_nothing_left(mounts_dir(run_root), [target], [])


def test_recover_cleans_a_killed_mount_and_keeps_a_healthy_one(
    backed_up_disk: BackedUpDisk, run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)
    repo = tmp_path / "repo"
    first = backup_image(capsys, repo, image, "vm1")["backup_id"]
    second = backup_image(capsys, repo, image, "vm1")["backup_id"]
    healthy, dead = empty_dirs(tmp_path, "healthy", "dead")
    assert cli(capsys, "mount", "--repo", repo, "--vm", "vm1", "--backup", first, healthy).code == 0
    healthy_pids = daemon_pids(run_root)
    killed = cli_process(
        "mount", "--repo", repo, "--vm", "vm1", "--backup", second, dead,
        env={CRASH_ENV: "mount-after-first-mount"},
    )  # fmt: skip
    assert killed.code == -signal.SIGKILL, killed.err
    dead_pids = [pid for pid in daemon_pids(run_root) if pid not in healthy_pids]
    assert dead_pids and (dead / "p1").is_mount()  # the premise: the killed mount left all of it
    states = {m["mountpoint"]: m for m in cli(capsys, "mount", "--list", "--json").json()["mounts"]}
    assert states[str(healthy)]["healthy"] and not states[str(dead)]["healthy"]

    result = cli(capsys, "recover", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["vm"] is None and not report["clean"]
    assert any(line.startswith(f"unmounted {dead}/p1") for line in report["actions"])
    assert any(line.startswith("detached /dev/loop") for line in report["actions"])
    assert (healthy / "p1/etc/hostname").read_bytes() == b"lab-t1\n"  # kept
    assert list(dead.iterdir()) == []
    again = cli(capsys, "recover")
    assert (again.code, again.out.strip()) == (
        0,
        "this host's mounts, instant restores and boot verifications: nothing to recover",
    )
    taken = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", "--backup", second, healthy)
    assert taken.code == 2 and f"{healthy} has a vmsnap mount already" in taken.error_line
    refused = cli(capsys, "recover", "--repo", repo)
    assert refused.code == 2 and "--repo needs the VM" in refused.error_line
    assert cli(capsys, "umount", healthy).code == 0
    assert_nothing_left(mounts_dir(run_root), [healthy, dead], healthy_pids + dead_pids)


def test_each_restore_command_has_an_example_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("mount", "umount", "instant-restore"):
        result = cli(capsys, command, "--help")
        assert result.code == 0
        assert f"example:\n  vmsnap {command}" in result.out
    assert "bare QEMU, two steps" in cli(capsys, "instant-restore", "--help").out


def test_a_damaged_chunk_is_an_io_error_for_its_files_not_a_hang(
    backed_up_disk: BackedUpDisk, run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chunks backup whose chunk under p1's victim.bin was altered: that file reads EIO, the rest of the
    backup reads (the nbdkit reader checks every chunk against its id before serving a byte of it)."""
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)
    repo = tmp_path / "repo"
    backup_image(capsys, repo, image, "vm1")
    victim = pattern("t1-victim", 256 * 1024)
    repository = Repository.open(repo)
    store, codec = repository.store, repository.codec  # type: ignore[attr-defined]
    damaged = 0
    for stored in store.list("chunks/"):
        chunk_id = bytes.fromhex(stored.key.rsplit("/", 1)[1])
        if victim[:65536] in codec.decode(store.get(stored.key), chunk_id):
            blob = bytearray(store.get(stored.key))
            blob[-1] ^= 0x01
            store.put(stored.key, bytes(blob))
            damaged += 1
    assert damaged == 1
    [at] = empty_dirs(tmp_path, "at")
    made = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", at)
    assert made.code == 0, made.err
    pids = daemon_pids(run_root)
    try:
        with pytest.raises(OSError) as failed:
            (at / "p1" / "victim.bin").read_bytes()
        assert failed.value.errno == errno.EIO
        assert (at / "p2" / "etc" / "hostname").read_bytes() == b"lab-t2\n"  # another chunk: reads
    finally:
        assert cli(capsys, "umount", at).code == 0
    assert_nothing_left(mounts_dir(run_root), [at], pids)


def test_mount_a_backup_in_an_encrypted_s3_repository(
    backed_up_disk: BackedUpDisk,
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    s3_env: SeaweedServer,
    s3_prefix: str,
) -> None:
    # the chunks are read from the object store by nbdkit's reader, each decrypted and checked
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)
    repo, key = f"s3://{BUCKET}/{s3_prefix}", tmp_path / "repo.key"
    assert cli(capsys, "init", "--repo", repo, "--encrypt", "--key-file", key).code == 0
    made = cli(
        capsys, "backup", "--repo", repo, "--key-file", key, "--image", image, "--name", "vm1", "--json"
    )
    assert made.code == 0, made.err
    (target,) = empty_dirs(tmp_path, "m")
    keyless = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", target)
    assert keyless.code != 0 and "key" in keyless.error_line, keyless.err
    assert list(target.iterdir()) == []
    mounted = cli(capsys, "mount", "--repo", repo, "--key-file", key, "--vm", "vm1", target, "--json")
    assert mounted.code == 0, mounted.err
    assert {p["name"]: p["fstype"] for p in mounted.json()["partitions"]} == {
        "p1": "ext4",
        "p2": "xfs",
        "p3": "btrfs",
    }
    for name, tree in backed_up_disk.v1.items():
        assert_same_tree(snapshot(target / name), tree)
    pids = daemon_pids(run_root)
    assert cli(capsys, "umount", target).code == 0
    assert_nothing_left(mounts_dir(run_root), [target], pids)
