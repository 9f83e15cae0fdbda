"""Parsers of the restore code: sfdisk and blkid output, /proc/mounts, losetup, mount options, records."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from vmsnap.errors import UsageError, VmsnapError
from vmsnap.image.daemon import DaemonRecord
from vmsnap.image.readers import load_factory, reader_options
from vmsnap.image.storage_daemon import FuseExport, NbdExport, QemuStorageDaemon
from vmsnap.mounts import parse_mountinfo
from vmsnap.restore.host import parse_losetup, under
from vmsnap.restore.partitions import (
    WHOLE_DISK,
    mount_options,
    not_mountable,
    parse_blkid,
    parse_sfdisk,
    whole_disk,
)

GPT = {
    "partitiontable": {
        "label": "gpt",
        "device": "/run/x/disk",
        "unit": "sectors",
        "sectorsize": 512,
        "partitions": [
            {
                "node": "/run/x/disk1",
                "start": 2048,
                "size": 65536,
                "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                "name": "root",
            },
            {
                "node": "/run/x/disk2",
                "start": 67584,
                "size": 16384,
                "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            },
            {
                "node": "/run/x/disk12",
                "start": 83968,
                "size": 1 << 30,
                "type": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
            },
        ],
    }
}

MBR = {
    "partitiontable": {
        "label": "dos",
        "device": "/dev/loop0",
        "unit": "sectors",
        "partitions": [
            {"node": "/dev/loop0p1", "start": 2048, "size": 2048, "type": "83"},
            {"node": "/dev/loop0p2", "start": 4096, "size": 8192, "type": "f"},
            {"node": "/dev/loop0p5", "start": 6144, "size": 2048, "type": "8e"},
        ],
    }
}


def test_gpt_partitions_are_named_by_number_and_clipped_to_the_disk() -> None:
    table = parse_sfdisk(json.dumps(GPT), disk_size=100 * 1024 * 1024)
    assert table.label == "gpt"
    assert [(p.name, p.offset, p.label) for p in table.partitions] == [
        ("p1", 2048 * 512, "root"),
        ("p2", 67584 * 512, ""),
        ("p12", 83968 * 512, ""),
    ]
    assert table.partitions[2].size == 100 * 1024 * 1024 - 83968 * 512
    assert table.partitions[1].describe() == "partition p2 (EFI System)"
    assert table.partitions[2].type_name == "Linux swap"


def test_mbr_extended_containers_are_left_out_and_loop_style_nodes_parse() -> None:
    table = parse_sfdisk(json.dumps(MBR), disk_size=16 * 1024 * 1024)
    assert [p.name for p in table.partitions] == ["p1", "p5"]
    assert table.partitions[1].describe() == "partition p5 (Linux LVM)"


def test_malformed_sfdisk_output_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_sfdisk("{}", 1)
    with pytest.raises(UsageError):
        parse_sfdisk(json.dumps({"partitiontable": {"unit": "bytes", "partitions": []}}), 1)


def test_whole_disk() -> None:
    [part] = whole_disk(123).partitions
    assert (part.name, part.offset, part.size, part.describe()) == (WHOLE_DISK, 0, 123, "the whole disk")


def test_blkid_and_what_is_not_mountable() -> None:
    probe = parse_blkid("DEVNAME=/dev/loop3\nLABEL=a=b\nTYPE=ext4\nUSAGE=filesystem\n")
    assert probe["LABEL"] == "a=b" and probe["TYPE"] == "ext4"
    assert not_mountable(probe) is None
    assert not_mountable({}) == "no filesystem (blkid found nothing)"
    assert not_mountable({"TYPE": "swap"}) == "swap space, no files"
    assert "LVM physical volume" in str(not_mountable({"TYPE": "LVM2_member", "USAGE": "raid"}))
    assert "encrypted" in str(not_mountable({"TYPE": "crypto_LUKS", "USAGE": "crypto"}))
    assert "ntfs filesystem, which vmsnap does not mount" in str(not_mountable({"TYPE": "ntfs"}))


def test_mount_options_never_replay_a_journal() -> None:
    assert mount_options("ext4") == ("ro", "nodev", "nosuid", "noexec", "noload")
    assert mount_options("xfs")[-2:] == ("norecovery", "nouuid")
    assert mount_options("btrfs")[-1] == "rescue=nologreplay"
    assert all(option != "rw" for fstype in ("ext2", "ext3", "vfat") for option in mount_options(fstype))
    with pytest.raises(UsageError):
        mount_options("ntfs")


def test_mountinfo_escapes_and_losetup_json() -> None:
    line = "120 28 7:7 / /tmp/a\\040b/p1 ro,nosuid,nodev,noexec,relatime - ext4 /dev/loop7 ro,noload\n"
    [entry] = parse_mountinfo(line)
    assert (
        entry.mount_point == PurePosixPath("/tmp/a b/p1")
        and entry.fstype == "ext4"
        and entry.source == "/dev/loop7"
    )
    assert "nosuid" in entry.options.split(",")
    loops = parse_losetup(
        json.dumps(
            {
                "loopdevices": [
                    {
                        "name": "/dev/loop3",
                        "back-file": "/run/v/k/qsd-1/disk (deleted)",
                        "offset": 1048576,
                        "sizelimit": 4096,
                        "ro": True,
                    }
                ]
            }
        )
    )
    assert loops[0].back_file == "/run/v/k/qsd-1/disk" and loops[0].read_only and loops[0].offset == 1048576
    assert parse_losetup("") == []
    assert under("/run/v/k/qsd-1/disk", Path("/run/v/k"))
    assert not under("/run/v/kx/disk", Path("/run/v/k"))


def test_daemon_record_round_trip_and_damage() -> None:
    record = DaemonRecord(
        "qemu-storage-daemon",
        42,
        1000,
        Path("/run/x/qsd-1"),
        nbd_socket=Path("/run/x/qsd-1/nbd.sock"),
        exports=("d",),
    )
    assert DaemonRecord.from_json(record.to_json(), where=Path("r")) == record
    assert record.uri("d") == "nbd+unix:///d?socket=/run/x/qsd-1/nbd.sock"
    with pytest.raises(VmsnapError, match="damaged"):
        DaemonRecord.from_json({"format": 1, "pid": "x"}, where=Path("r"))


def test_storage_daemon_nodes_are_read_only_unless_asked(tmp_path: Path) -> None:
    node = {"driver": "qcow2", "node-name": "n0", "file": {"driver": "file", "filename": "/x.qcow2"}}
    daemon = QemuStorageDaemon(
        [node], nbd_exports=[NbdExport("n0", "d")], fuse_exports=[FuseExport("n0", "f")]
    )
    daemon._directory = tmp_path  # argv needs the private directory
    argv = daemon.argv()
    [blockdev] = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--blockdev"]
    assert blockdev["read-only"] is True
    exports = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--export"]
    assert [e["writable"] for e in exports] == [False, False]
    assert exports[1]["mountpoint"] == str(tmp_path / "f")
    with pytest.raises(UsageError, match="writable"):
        QemuStorageDaemon([node], nbd_exports=[NbdExport("n0", "d", writable=True)])
    with pytest.raises(UsageError):
        QemuStorageDaemon([{"driver": "raw"}])
    with pytest.raises(UsageError):
        FuseExport("n0", "../escape")
    with pytest.raises(UsageError, match="reserved"):
        FuseExport("n0", "daemon.json")


def test_reader_factories_and_options() -> None:
    assert load_factory("vmsnap.image.readers:RawFileReader").__name__ == "RawFileReader"
    for bad in ("vmsnap.image.readers", "no.such.module:x", "vmsnap.image.readers:nothing"):
        with pytest.raises(UsageError):
            load_factory(bad)
    assert reader_options({"path": Path("/a"), "n": 3}) == {"path": "/a", "n": "3"}
    for key in ("reader", "syspath", "log", "a-b"):
        with pytest.raises(UsageError):
            reader_options({key: "x"})
    with pytest.raises(UsageError):
        reader_options({"path": "a\nb"})
