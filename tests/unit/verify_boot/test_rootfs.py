"""The lab guest's root disk: the initramfs's tree unpacked from its cpio (as write_cpio makes it), and the
init script's root switch (which stops, with no agent, when the disk holds no root filesystem)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from vmsnap.lab.image import write_cpio
from vmsnap.lab.image.contents import generated_files
from vmsnap.lab.rootfs import RootDiskError, unpack_cpio


def test_the_initramfs_tree_round_trips_through_cpio(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/qemu-ga").write_bytes(b"\x7fELF" + bytes(5000))
    (root / "usr/sbin/qemu-ga").chmod(0o755)
    (root / "bin").mkdir()
    (root / "bin/sh").symlink_to("/usr/sbin/dash")
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("vmsnap-lab\n")
    buffer = io.BytesIO()
    write_cpio(root, buffer, extra_devices={"dev/console": (0o020600, 5, 1)})  # type: ignore[arg-type]
    out = tmp_path / "out"
    out.mkdir()
    assert unpack_cpio(buffer.getvalue(), out) == 7  # bin, bin/sh, etc, hostname, usr, usr/sbin, qemu-ga
    assert (out / "usr/sbin/qemu-ga").read_bytes() == (root / "usr/sbin/qemu-ga").read_bytes()
    assert (out / "usr/sbin/qemu-ga").stat().st_mode & 0o777 == 0o755
    assert (out / "bin/sh").readlink() == Path("/usr/sbin/dash")
    assert not (out / "dev/console").exists()


def test_a_cpio_naming_a_path_outside_its_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "abcd").mkdir(parents=True)
    buffer = io.BytesIO()
    write_cpio(root, buffer)  # type: ignore[arg-type]
    evil = buffer.getvalue().replace(b"abcd\0", b"../x\0", 1)
    with pytest.raises(RootDiskError):
        unpack_cpio(evil, tmp_path / "out")


def test_init_switches_to_the_root_disk_or_stops_without_an_agent() -> None:
    init = generated_files()["init"][0]
    assert "vmsnap\\.root=" in init and "exec switch_root /newroot /init" in init
    stop = init.index("no root filesystem on virtio-$root: the guest stops here")
    assert init.index("while :; do sleep 3600; done") > stop
    assert init.index("exec switch_root") < stop < init.index("exec /sbin/init")
    assert "[ -x /etc/rc.local ] && /etc/rc.local" in init
