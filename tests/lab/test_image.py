"""The lab guest builder: cached by a hash of its inputs, and the initramfs holds what the guest needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmsnap.lab.image import LabImage, LabImageBuilder, LabImageError, extract_vmlinux, write_cpio
from vmsnap.lab.image.builder import IN_USE


def _cpio_listing(archive: Path) -> dict[str, str]:
    """name → the line `cpio -tv` prints for it (the type and link target are in there)."""
    out = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", str(archive)], check=True, capture_output=True, text=True
    ).stdout
    listing = {}
    for line in out.splitlines():
        match = re.search(r" 1970 (\S+)", line)  # every entry has mtime 0
        assert match, line
        listing[match.group(1)] = line
    return listing


def test_a_second_build_with_the_same_inputs_is_skipped(lab_image: LabImage) -> None:
    said: list[str] = []
    builder = LabImageBuilder(cache_dir=lab_image.kernel.parent.parent, progress=said.append)
    again = builder.build()
    assert again == lab_image
    assert said == []  # nothing was built, downloaded or extracted
    assert lab_image.kernel.read_bytes()[:4] == b"\x7fELF"  # the uncompressed kernel (PVH boot)


def test_the_key_changes_with_any_input(lab_image: LabImage) -> None:
    builder = LabImageBuilder(cache_dir=lab_image.kernel.parent.parent)
    package, version = lab_image.kernel_package.split("=")
    files = builder.host_files()
    assert builder.key(package, version, files) == lab_image.key
    assert builder.key(package, version + "+1", files) != lab_image.key
    assert builder.key(package, version, files[:-1]) != lab_image.key


def test_the_initramfs_holds_the_tools_modules_and_scripts(lab_image: LabImage) -> None:
    listing = _cpio_listing(lab_image.initrd)
    names = set(listing)
    for program in ("qemu-ga", "lvm", "dmsetup", "mke2fs", "e2fsck", "debugfs", "fsfreeze", "blkid", "dash"):
        assert any(n.endswith(f"/{program}") and "->" not in listing[n] for n in names), program
    assert "-> /usr/sbin/dash" in listing["bin/sh"]  # dash, not busybox's sh (which prefers its applets)
    assert "busybox" in listing["usr/bin/sha256sum"]
    assert "-> /usr/sbin/lvm" in listing["usr/sbin/lvcreate"]
    modules = {Path(n).name for n in names if n.startswith("lib/modules/")}
    for module in ("dm-mod.ko", "dm-snapshot.ko", "dm-thin-pool.ko", "ext4.ko", "jbd2.ko", "virtio_blk.ko"):
        assert module in modules
    assert "crc32c_generic.ko" in modules  # qemu64 has no SSE4.2: ext4 needs the generic crc32c
    assert any(n.endswith("/modules.dep") for n in names)
    for script in ("init", "etc/inittab", "etc/lvm/lvm.conf", "etc/qemu/fsfreeze-hook", "sbin/vmsnap-links"):
        assert script in names
    assert listing["dev/console"].startswith("c")


def test_extract_vmlinux_refuses_what_is_not_a_bzimage() -> None:
    with pytest.raises(LabImageError, match="not an x86 bzImage"):
        extract_vmlinux(b"\x7fELF" + bytes(4096))


def test_cpio_archives_are_byte_for_byte_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "a").write_text("alpha\n")
    (root / "bin").mkdir()
    (root / "bin" / "sh").symlink_to("/usr/bin/dash")
    archives = []
    for i in range(2):
        out = tmp_path / f"a{i}.cpio"
        with open(out, "wb") as f:
            write_cpio(root, f, extra_devices={"dev/console": (0o020600, 5, 1)})
        archives.append(out.read_bytes())
        (root / "etc" / "a").touch()  # a new mtime must not change the archive
    assert archives[0] == archives[1]
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "-F", str(tmp_path / "a0.cpio")],
        cwd=extracted,
        check=True,
        stderr=subprocess.DEVNULL,  # mknod of dev/console may be refused in a container: not our concern
    )
    assert (extracted / "etc" / "a").read_text() == "alpha\n"
    assert (extracted / "bin" / "sh").readlink() == Path("/usr/bin/dash")


def test_prune_keeps_the_newest_builds_and_the_debs(tmp_path: Path) -> None:
    for age, key in enumerate(["newest", "middle", "oldest"]):
        build = tmp_path / key
        build.mkdir()
        (build / "manifest.json").write_text("{}")
        os.utime(build / "manifest.json", (1_000_000 - age, 1_000_000 - age))
    (tmp_path / "debs").mkdir()
    removed = LabImageBuilder(cache_dir=tmp_path).prune(keep=2)
    assert removed == [tmp_path / "oldest"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debs", "middle", "newest"]


def test_prune_leaves_a_build_that_a_running_process_uses(tmp_path: Path) -> None:
    for age, key in enumerate(["newest", "used", "oldest"]):
        build = tmp_path / key
        build.mkdir()
        (build / "manifest.json").write_text("{}")
        os.utime(build / "manifest.json", (1_000_000 - age, 1_000_000 - age))
    hold = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()"
    )
    user = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "used" / IN_USE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert user.stdout is not None and user.stdout.readline() == "held\n"
        assert LabImageBuilder(cache_dir=tmp_path).prune(keep=1) == [tmp_path / "oldest"]
        assert (tmp_path / "used" / "manifest.json").exists()
    finally:
        assert user.stdin is not None
        user.stdin.close()
        user.wait(10)
    assert LabImageBuilder(cache_dir=tmp_path).prune(keep=1) == [tmp_path / "used"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newest"]
