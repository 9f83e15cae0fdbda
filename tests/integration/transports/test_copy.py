"""The copy transport: the contract suite, plus reading an image a running VM holds (force_share) and
reflinks on Btrfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.transports.conftest import SIZE, images_equal, loop_device, write_pattern
from tests.integration.transports.contract import ProgressLog, TransportContract
from vmsnap.errors import TransferError
from vmsnap.imageio import guest_sha256
from vmsnap.lab.qemu import qemu_io
from vmsnap.model import Disk, ExportSource
from vmsnap.transports.copy import CopyTransport


class TestCopyContract(TransportContract):
    transport_name = "copy"


def test_image_held_by_a_running_vm_needs_force_share(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    qemu_io(qmp, "disk1", "write -P 0x5a 1M 2M")
    qemu_io(qmp, "disk1", "flush")  # a reader of the file sees guest writes only after a flush
    image = vm.images["disk1"]
    disk = Disk("disk1", "fmt-disk1", image, "qcow2", 64 * 1024 * 1024)
    locked = ExportSource("file", str(image), "qcow2", disk, disk.virtual_size)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TransferError, match="locked by another process"):
        CopyTransport().send(locked, out / "locked.qcow2", progress=ProgressLog())
    assert os.listdir(out) == []

    shared = ExportSource("file", str(image), "qcow2", disk, disk.virtual_size, force_share=True)
    target = out / "disk1.qcow2"
    CopyTransport().send(shared, target, progress=ProgressLog())
    out = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 2M", "-c", "read -P 0 0 1M", str(target)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 2, out
    assert guest_sha256(target, "qcow2") == guest_sha256(image, "qcow2", force_share=True)
    assert vm.process.alive()


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
