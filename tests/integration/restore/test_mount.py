"""``mount``/``umount`` of a backup disk against real parts: qemu-storage-daemon's FUSE export, loop devices,
the host kernel's ext4, xfs and btrfs, nbdkit's Python plugin — and nothing left behind afterwards."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.integration.restore.conftest import BackedUpDisk, copy_chain, daemon_pids, empty_dirs, leftovers
from tests.integration.restore.images import (
    Layout,
    MiB,
    build_gpt,
    find_pattern,
    loop,
    mkfs,
    mounted,
    partition,
    pattern,
    qcow2_l2_entry_offset,
    run,
    snapshot,
    write_v1,
)
from vmsnap.errors import NotFoundError, UnsupportedError, UsageError
from vmsnap.restore.mount import MountResult, mount, umount
from vmsnap.restore.source import ImageSource, ReaderSource


def assert_same_tree(
    got: dict[str, tuple[int, bytes | None]], want: dict[str, tuple[int, bytes | None]]
) -> None:
    assert sorted(got) == sorted(want)
    for path, (mode, content) in want.items():
        got_mode, got_content = got[path]
        assert stat.filemode(got_mode) == stat.filemode(mode), path
        assert got_content == content, path


def check_mounted(result: MountResult, want: dict[str, dict[str, tuple[int, bytes | None]]]) -> None:
    by_name = {p.name: p for p in result.partitions}
    assert sorted(by_name) == sorted(want)
    for name, tree in want.items():
        assert_same_tree(snapshot(by_name[name].path), tree)


def assert_nothing_left(run_dir: Path, mountpoints: list[Path], pids: list[int]) -> None:
    left = leftovers(run_dir, mountpoints, pids)
    assert left.mounts == []
    assert left.loops == []
    assert left.processes == []
    assert left.entries == []
    for mountpoint in mountpoints:
        assert list(mountpoint.iterdir()) == []


def test_mount_incremental_and_full_at_once(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    """The chain's top shows v2, its base v1, both mounted at the same time — so ext4, xfs and btrfs
    filesystems whose UUIDs are mounted already on this host mount again (xfs nouuid, btrfs temp-fsid)."""
    inc_at, base_at = empty_dirs(tmp_path, "inc", "base")
    inc = mount(ImageSource(backed_up_disk.inc), inc_at, run_dir=run_dir)
    base = mount(ImageSource(backed_up_disk.base), base_at, run_dir=run_dir)
    pids = daemon_pids(run_dir)
    assert len(pids) == 2
    assert inc.table == "gpt"
    assert {p.name: p.fstype for p in inc.partitions} == {"p1": "ext4", "p2": "xfs", "p3": "btrfs"}
    assert {p.name: p.label for p in inc.partitions} == {"p1": "root", "p2": "data", "p3": "home"}
    assert [(s.name, s.reason) for s in inc.skipped] == [
        ("p4", "partition p4 (Linux filesystem): no filesystem (blkid found nothing)")
    ]
    check_mounted(inc, backed_up_disk.v2)
    check_mounted(base, backed_up_disk.v1)
    assert (inc_at / "p1/etc/hostname").read_bytes() == b"lab-t1-v2\n"
    assert (base_at / "p3/etc/hostname").read_bytes() == b"lab-t3\n"
    assert stat.S_IMODE((inc_at / "p2/bin/tool").stat().st_mode) == 0o4755
    with pytest.raises(OSError) as err:
        (inc_at / "p1/new-file").write_bytes(b"x")
    assert err.value.errno == errno.EROFS
    umount(inc_at, run_dir=run_dir)
    umount(base_at, run_dir=run_dir)
    assert_nothing_left(run_dir, [inc_at, base_at], pids)


def test_a_second_mount_of_the_same_backup_is_refused(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    first, second = empty_dirs(tmp_path, "a", "b")
    mount(ImageSource(backed_up_disk.inc), first, run_dir=run_dir)
    pids = daemon_pids(run_dir)
    with pytest.raises(UsageError, match=f"mounted already at {first}"):
        mount(ImageSource(backed_up_disk.inc), second, run_dir=run_dir)
    assert list(second.iterdir()) == []
    assert (first / "p1/etc/hostname").exists()
    umount(first, run_dir=run_dir)
    assert_nothing_left(run_dir, [first, second], pids)


def test_bad_mountpoints_and_sources(backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path) -> None:
    source = ImageSource(backed_up_disk.inc)
    with pytest.raises(NotFoundError, match="does not exist"):
        mount(source, tmp_path / "missing", run_dir=run_dir)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        mount(source, tmp_path / "file", run_dir=run_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        mount(source, busy, run_dir=run_dir)
    with pytest.raises(NotFoundError, match="does not exist"):
        ImageSource(tmp_path / "no-such-backup.qcow2")
    with pytest.raises(NotFoundError, match="nothing mounted"):
        umount(tmp_path, run_dir=run_dir)
    assert_nothing_left(run_dir, [], [])


def test_plain_filesystem_and_mbr_with_logical_partitions(run_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.raw"
    with open(plain, "wb") as out:
        out.truncate(24 * MiB)
    mkfs("ext4", str(plain), "plain")
    with loop(plain) as device, mounted(device) as root:
        write_v1(root, "plain")
        want_plain = snapshot(root)
    mbr = tmp_path / "mbr.raw"
    with open(mbr, "wb") as out:
        out.truncate(40 * MiB)
    script = "label: dos\nsize=12MiB, type=83\ntype=5\nsize=10MiB, type=83\n"
    run("sfdisk", "-q", str(mbr), input=script.encode())
    table = {int(k): v for k, v in _table(mbr).items()}
    assert sorted(table) == [1, 2, 5]  # 2 is the extended container, 5 the logical partition inside it
    want: dict[str, dict[str, tuple[int, bytes | None]]] = {}
    for number, fstype in ((1, "ext2"), (5, "ext4")):
        offset, size = table[number]
        with loop(mbr, offset, size) as device:
            mkfs(fstype, device, f"mbr{number}")
            with mounted(device) as root:
                write_v1(root, f"mbr{number}")
                want[f"p{number}"] = snapshot(root)
    plain_at, mbr_at = empty_dirs(tmp_path, "plain", "mbr")
    result = mount(ImageSource(plain, "raw"), plain_at, run_dir=run_dir)
    assert result.table == ""
    check_mounted(result, {"disk": want_plain})
    result = mount(ImageSource(mbr, "raw"), mbr_at, run_dir=run_dir)
    assert result.table == "dos"
    assert {p.name: p.fstype for p in result.partitions} == {"p1": "ext2", "p5": "ext4"}
    assert result.skipped == ()
    check_mounted(result, want)
    pids = daemon_pids(run_dir)
    umount(plain_at, run_dir=run_dir)
    umount(mbr_at, run_dir=run_dir)
    assert_nothing_left(run_dir, [plain_at, mbr_at], pids)


def _table(raw: Path) -> dict[int, tuple[int, int]]:
    from tests.integration.restore.images import read_table

    return read_table(raw)


def test_a_disk_without_a_filesystem_vmsnap_can_read(run_dir: Path, tmp_path: Path) -> None:
    """One line says what each partition holds; vfat is mounted only where this host's kernel reads it."""
    raw = tmp_path / "nothing.raw"
    layouts = (
        Layout(1, 8 * MiB, None, "blank"),
        Layout(2, 40 * MiB, "vfat", "esp"),
        Layout(3, 8 * MiB, None, "sw"),
    )
    with open(raw, "wb") as out:
        out.truncate(60 * MiB)
    table = partition(raw, layouts)
    if not Path("/usr/sbin/mkfs.vfat").exists():
        pytest.fail("mkfs.vfat is needed: run `make test` (it installs dosfstools)")
    with loop(raw, *table[2]) as device:
        mkfs("vfat", device, "esp")
    with loop(raw, *table[3]) as device:
        run("mkswap", device)
    target = tmp_path / "m"
    target.mkdir()
    kernel_reads_vfat = "vfat" in Path("/proc/filesystems").read_text().split()
    if kernel_reads_vfat:
        result = mount(ImageSource(raw, "raw"), target, run_dir=run_dir)
        assert [p.fstype for p in result.partitions] == ["vfat"]
        umount(target, run_dir=run_dir)
    else:
        with pytest.raises(UnsupportedError) as err:
            mount(ImageSource(raw, "raw"), target, run_dir=run_dir)
        message = str(err.value)
        assert "\n" not in message
        assert "partition p1 (Linux filesystem): no filesystem (blkid found nothing)" in message
        assert "partition p2 (Linux filesystem): vfat, which this host's kernel cannot read" in message
        assert "partition p3 (Linux filesystem): swap space, no files" in message
    assert_nothing_left(run_dir, [target], [])


def test_filesystems_copied_while_mounted_are_mounted_without_replaying_their_journal(
    run_dir: Path, tmp_path: Path
) -> None:
    """A crash-consistent backup (taken while the guest had the filesystems mounted): ext4 says it needs
    recovery, xfs has a dirty log, and a read-only device cannot replay either — ``noload``/``norecovery``
    mount them as of their last checkpoint."""
    raw = tmp_path / "live.raw"
    layouts = (Layout(1, 24 * MiB, "ext4", "live4"), Layout(2, 300 * MiB, "xfs", "livex"))
    with open(raw, "wb") as out:
        out.truncate(330 * MiB)
    table = partition(raw, layouts)
    copy = tmp_path / "copy.raw"
    with loop(raw, *table[1]) as dev4, loop(raw, *table[2]) as devx:
        mkfs("ext4", dev4, "live4")
        mkfs("xfs", devx, "livex")
        with mounted(dev4) as root4, mounted(devx) as rootx:
            for root in (root4, rootx):
                (root / "old.txt").write_bytes(b"written before the checkpoint\n")
            run("sync")
            run("cp", "--sparse=always", str(raw), str(copy))  # what a backup without quiescing sees
    with loop(copy, *table[1], read_only=True) as device:
        features = run("dumpe2fs", "-h", device)
    assert "needs_recovery" in features  # the premise: without noload a read-only mount would fail
    target = tmp_path / "m"
    target.mkdir()
    result = mount(ImageSource(copy, "raw"), target, run_dir=run_dir)
    assert {p.name: p.fstype for p in result.partitions} == {"p1": "ext4", "p2": "xfs"}
    assert "noload" in result.partitions[0].options
    assert "norecovery" in result.partitions[1].options
    assert (target / "p1/old.txt").read_bytes() == b"written before the checkpoint\n"
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target], [])


def test_a_damaged_qcow2_gives_an_io_error_for_the_file_not_a_hang(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    """The L2 entry that maps the victim file's first cluster is corrupted (an unaligned offset: QEMU calls
    the image corrupt). Reading that file fails with EIO; other files read fine. (Truncating the image would
    not do: QEMU reads the missing tail as zeros.)"""
    top = copy_chain(backed_up_disk, tmp_path / "chain")
    offset, size = backed_up_disk.table[1]
    victim = pattern("t1-victim", 256 * 1024)
    guest = find_pattern(backed_up_disk.raw_v1, victim, offset, offset + size)
    entry = qcow2_l2_entry_offset(top.parent / "base.qcow2", guest)
    with open(top.parent / "base.qcow2", "r+b") as image:
        image.seek(entry)
        value = int.from_bytes(image.read(8), "big")
        image.seek(entry)
        image.write((value | 0x200).to_bytes(8, "big"))
    target = tmp_path / "m"
    target.mkdir()
    mount(ImageSource(top), target, run_dir=run_dir)
    pids = daemon_pids(run_dir)
    with pytest.raises(OSError) as err:
        (target / "p1/victim.bin").read_bytes()
    assert err.value.errno == errno.EIO
    assert (target / "p1/etc/shadow").read_bytes() == pattern("t1-shadow", 1000)
    assert (target / "p2/victim.bin").read_bytes() == pattern("t2-victim", 256 * 1024)
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target], pids)


def test_a_reader_source_through_nbdkit_and_a_damaged_chunk(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    """The chunk-layout path with a stand-in reader: nbdkit's Python plugin serves a raw image whose 4 MiB
    chunks are checked against sha256 digests. Intact, every file matches v2; with one chunk altered, the
    files in that chunk give EIO (the plugin logs why), all others read fine, and nothing hangs."""
    reader = "vmsnap.image.readers:VerifiedRawReader"
    target = tmp_path / "m"
    target.mkdir()
    intact = ReaderSource(
        reader, {"path": str(backed_up_disk.raw_v2), "chunks": str(backed_up_disk.chunks_v2)}
    )
    check_mounted(mount(intact, target, run_dir=run_dir), backed_up_disk.v2)
    pids = daemon_pids(run_dir)
    assert len(pids) == 2  # nbdkit and the storage daemon
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target], pids)

    damaged_raw = tmp_path / "damaged.raw"
    run("cp", "--sparse=always", str(backed_up_disk.raw_v2), str(damaged_raw))
    offset, size = backed_up_disk.table[3]  # btrfs: the victim file is checksummed there too
    where = find_pattern(damaged_raw, pattern("t3-victim", 256 * 1024), offset, offset + size)
    with open(damaged_raw, "r+b") as image:
        image.seek(where + 100)
        image.write(b"\xff\x00\xff")
    damaged = ReaderSource(reader, {"path": str(damaged_raw), "chunks": str(backed_up_disk.chunks_v2)})
    mount(damaged, target, run_dir=run_dir)
    pids = daemon_pids(run_dir)
    with pytest.raises(OSError) as err:
        (target / "p3/victim.bin").read_bytes()
    assert err.value.errno == errno.EIO
    assert (target / "p1/private/big.bin").read_bytes() == pattern("t1-big", 5 * MiB + 123)
    logs = list(run_dir.rglob("plugin.log"))
    assert logs and "does not match its sha256" in logs[0].read_text()
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target], pids)


def test_umount_of_a_busy_partition_says_so_and_can_be_repeated(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "m"
    target.mkdir()
    mount(ImageSource(backed_up_disk.inc), target, run_dir=run_dir)
    pids = daemon_pids(run_dir)
    fd = os.open(target / "p1/etc/hostname", os.O_RDONLY)
    try:
        with pytest.raises(Exception, match="is busy"):
            umount(target, run_dir=run_dir)
    finally:
        os.close(fd)
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target], pids)


def test_build_gpt_helper_writes_what_it_returns(tmp_path: Path) -> None:
    """The fixture's own premise: v1 trees hold the files write_v1 made (so the comparisons above compare
    something)."""
    trees = build_gpt(tmp_path / "check.raw", tag="c")
    assert sorted(trees) == ["p1", "p2", "p3"]
    assert trees["p2"]["etc/hostname"][1] == b"lab-c2\n"
    assert stat.S_IMODE(trees["p1"]["etc/shadow"][0]) == 0o600
    assert stat.S_IMODE(trees["p3"]["tmp"][0]) == 0o1777
