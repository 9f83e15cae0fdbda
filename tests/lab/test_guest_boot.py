"""The lab guest boots with extra disks, names them like udev would, and runs LVM snapshots inside."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import LabGuestFactory, make_image
from vmsnap.lab.qemu import DriveSpec

pytestmark = pytest.mark.guest


def test_a_guest_with_a_raw_disk_runs_lvm_snapshots(
    lab_guest_factory: LabGuestFactory, tmp_path: Path
) -> None:
    pv = make_image(tmp_path / "pv0.raw", "64M", fmt="raw")
    guest = lab_guest_factory(
        extra_drives=[DriveSpec(pv, "pv0", format="raw", serial="pv0")], data_disk_size=None
    )
    run = guest.runner.run
    assert run(["readlink", "-f", "/dev/disk/by-id/virtio-pv0"]).stdout.strip() == "/dev/vda"
    assert guest.sh("mount").stdout.count("/mnt/") == 0  # a disk not named data* is left raw
    run(["pvcreate", "-q", "/dev/disk/by-id/virtio-pv0"])
    run(["vgcreate", "-q", "labvg", "/dev/disk/by-id/virtio-pv0"])
    run(["lvcreate", "-q", "-L", "24M", "-n", "root", "labvg"])
    run(["mke2fs", "-q", "-t", "ext4", "/dev/labvg/root"])
    run(["mkdir", "-p", "/mnt/root"])
    run(["mount", "/dev/labvg/root", "/mnt/root"])
    guest.write_file("/mnt/root/file", b"before\n")
    run(["sync"])
    run(["lvcreate", "-q", "-s", "-L", "8M", "-n", "snap", "labvg/root"])
    guest.write_file("/mnt/root/file", b"after\n")
    assert "snapshot" in run(["dmsetup", "table", "labvg-snap"]).stdout
    run(["mkdir", "-p", "/mnt/snap"])
    run(["mount", "-o", "ro", "/dev/labvg/snap", "/mnt/snap"])
    assert guest.read_file("/mnt/snap/file") == b"before\n"
    assert guest.read_file("/mnt/root/file") == b"after\n"
    out = run(["sha256sum", "/mnt/snap/file"]).stdout
    assert out.split()[0] == "9160d4be34c8695bd172a76c7c7966587ea5a4d991ad22c87b2b91af54aa9ebb"
