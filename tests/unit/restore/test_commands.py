"""The restore commands' configurations: which instant-restore shape a set of options names (and which sets
name none), ``--speed`` rates, the QEMU options printed for prepared images, the disk-source seam."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from vmsnap.cli.restore import bytes_per_second
from vmsnap.errors import UsageError
from vmsnap.image.sources import ImageSource, ReaderSource, source_from_json
from vmsnap.restore.commands import BackupRef, InstantConfig
from vmsnap.restore.instant import InstantDisk, InstantRestore

TO = Path("/restore/web1")
BACKUP = BackupRef(Path("/backups"), "web1")


@pytest.mark.parametrize(
    ("options", "mode"),
    [
        ({"backup": BACKUP, "define": "web1r"}, "libvirt"),
        ({"backup": BACKUP, "define": "web1r", "connect": "qemu:///system", "speed": 1}, "libvirt"),
        ({"backup": BACKUP}, "prepare"),
        ({"backup": BACKUP, "disks": ("vda",)}, "prepare"),
        ({"qmp": Path("/run/vm.qmp"), "speed": 50 * 2**20}, "stream"),
        ({"domain": "web1r", "connect": "qemu:///system"}, "stream-domain"),
    ],
)
def test_each_shape_names_its_mode(options: dict[str, object], mode: str) -> None:
    assert InstantConfig(TO, **options).mode == mode  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, "needs a backup (--repo, --vm) to prepare"),
        ({"qmp": Path("q"), "domain": "d"}, "needs a backup"),
        ({"backup": BACKUP, "qmp": Path("q")}, "leave --repo/--vm out"),
        ({"backup": BACKUP, "domain": "d"}, "leave --repo/--vm out"),
        ({"backup": BACKUP, "define": "n", "disks": ("vda",)}, "leave --disk out"),
        ({"backup": BACKUP, "speed": 5}, "--speed applies to the copy"),
        ({"qmp": Path("q"), "define": "n"}, "need the backup"),
        ({"qmp": Path("q"), "disks": ("vda",)}, "need the backup"),
        ({"backup": BACKUP, "connect": "qemu:///system"}, "--connect is for libvirt"),
        ({"qmp": Path("q"), "speed": -1}, "negative"),
    ],
)
def test_options_that_name_no_shape_are_usage_errors(options: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        InstantConfig(TO, **options)  # type: ignore[arg-type]


def test_backup_names_are_checked() -> None:
    with pytest.raises(UsageError):
        BackupRef(Path("/backups"), "../etc")
    with pytest.raises(UsageError):
        BackupRef(Path("/backups"), "web1", "a/b")


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("64k", 65536),
        ("50M", 50 * 2**20),
        ("2G", 2 * 2**30),
        ("8MiB/s", 8 * 2**20),
    ],
)
def test_speed_rates(text: str, rate: int) -> None:
    assert bytes_per_second(text) == rate


@pytest.mark.parametrize("text", ["fast", "-1", "1.5M", "10T", ""])
def test_bad_speed_rates(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bytes_per_second(text)


def test_qemu_options_for_prepared_images_need_no_comma_escaping() -> None:
    disk = InstantDisk("vda", Path("/restore/a,b/vda.qcow2"), Path("/run/x/vda.sock"), 2**30)
    args = InstantRestore(TO, (disk,), Path("/run/x")).qemu_args()
    assert args[0] == "-blockdev" and args[2] == "-device"
    blockdev = json.loads(args[1])
    assert blockdev == {
        "driver": "qcow2",
        "node-name": "restored-vda",
        "file": {"driver": "file", "filename": "/restore/a,b/vda.qcow2"},
    }
    assert args[3] == "virtio-blk-pci,drive=restored-vda,serial=vda"


def test_sources_round_trip_and_a_layout_that_serves_disks_answers_itself(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"")
    reader = ReaderSource("pkg.mod:open_reader", {"repo": "s3://b/p", "vm": "v", "backup": "i", "disk": "d"})
    for source in (ImageSource(image, identity="qcow2:x"), reader):
        assert source_from_json(json.loads(json.dumps(source.to_json()))) == source
