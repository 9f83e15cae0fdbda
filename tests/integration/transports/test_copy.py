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
        pytest.skip("mkfs.btrfs is not installed (btrfs-progs)")
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


def test_raw_to_raw_on_btrfs_is_a_reflink(tmp_path: Path) -> None:
    with btrfs_on_loop(tmp_path) as mnt:
        image = make_image(mnt / "disk.raw", "64M", fmt="raw")
        write_pattern(image, "raw")
        subprocess.run(["sync", "-f", str(image)], check=True)
        source = ExportSource("file", str(image), "raw", Disk("d", "", image, "raw", SIZE), SIZE)
        target = mnt / "copy.raw"
        CopyTransport(output_format="raw").send(source, target, progress=ProgressLog())
        assert images_equal(target, image)
        subprocess.run(["sync", "-f", str(target)], check=True)
        du = subprocess.run(
            ["btrfs", "filesystem", "du", "--raw", str(image), str(target)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        # columns: Total, Exclusive, Set shared, Filename — a reflinked copy has no exclusive bytes
        rows = {line.split()[-1]: [int(v) for v in line.split()[:2]] for line in du.splitlines()[1:3]}
        assert rows[str(target)][0] > 0 and rows[str(target)][1] == 0, du
