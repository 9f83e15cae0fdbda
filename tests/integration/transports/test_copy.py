"""The copy transport: the contract suite, plus reflinks on Btrfs."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.transports.conftest import SIZE, images_equal, loop_device, write_pattern
from tests.integration.transports.contract import ProgressLog, TransportContract
from vmsnap.model import Disk, ExportSource
from vmsnap.transports.copy import CopyTransport


class TestCopyContract(TransportContract):
    transport_name = "copy"


@contextlib.contextmanager
def btrfs_on_loop(workdir: Path) -> Iterator[Path]:
    """A 256 MiB Btrfs on a loop device made here, mounted at ``workdir/mnt``; removed afterwards."""
    if not shutil.which("mkfs.btrfs"):
        pytest.fail("mkfs.btrfs is missing: install btrfs-progs (scripts/packages.d/storage.txt)")
    backing = workdir / "btrfs.img"
    with open(backing, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    mnt = workdir / "mnt"
    mnt.mkdir()
    with loop_device(backing, read_only=False) as device:
        subprocess.run(["mkfs.btrfs", "-q", device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)


def exclusive_bytes(path: Path) -> tuple[int, int]:
    """(total, exclusive) bytes of a file on Btrfs: a reflinked copy has no exclusive bytes."""
    subprocess.run(["sync", "-f", str(path)], check=True)
    du = subprocess.run(
        ["btrfs", "filesystem", "du", "--raw", str(path)], check=True, capture_output=True, text=True
    ).stdout
    total, exclusive = du.splitlines()[1].split()[:2]  # columns: Total, Exclusive, Set shared, Filename
    return int(total), int(exclusive)


def test_plain_images_on_btrfs_are_reflinked(tmp_path: Path) -> None:
    """raw → raw and a standalone qcow2 → qcow2 clone extents; a qcow2 with an internal snapshot (which a
    clone would drag along) and a copy to another filesystem go through qemu-img convert."""
    with btrfs_on_loop(tmp_path) as mnt:
        for fmt in ("raw", "qcow2"):
            image = make_image(mnt / f"disk.{fmt}", "64M", fmt=fmt)
            write_pattern(image, fmt)
            source = ExportSource("file", str(image), fmt, Disk("d", "", image, fmt, SIZE), SIZE)
            target = mnt / f"copy.{fmt}"
            CopyTransport(output_format=fmt).send(source, target, progress=ProgressLog())
            assert images_equal(target, image)
            total, exclusive = exclusive_bytes(target)
            assert total > 0 and exclusive == 0, (fmt, total, exclusive)

        elsewhere = tmp_path / "elsewhere.qcow2"  # not on the Btrfs: converted (compact), not cloned
        CopyTransport().send(source, elsewhere, progress=ProgressLog())
        assert images_equal(elsewhere, image)

        subprocess.run(["qemu-img", "snapshot", "-c", "old", str(image)], check=True)
        target = mnt / "with-snapshot.qcow2"
        CopyTransport().send(source, target, progress=ProgressLog())
        assert images_equal(target, image)
        info = subprocess.run(["qemu-img", "info", str(target)], check=True, capture_output=True, text=True)
        assert "old" not in info.stdout  # the internal snapshot stayed behind
        assert exclusive_bytes(target)[1] > 0
