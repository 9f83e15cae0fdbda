"""A root disk for the lab guest: the initramfs's own tree as an ext4 filesystem on a qcow2 image.

A lab guest started with ``root_disk=`` (:class:`~vmsnap.lab.guest.LabGuest`) boots the same kernel and
initramfs with ``vmsnap.root=root`` on its command line: the initramfs mounts the ext4 on the disk with
serial ``root`` and switches to it, so qemu-ga, ``/etc`` and ``/root`` come from that disk. A backup of such
a guest is bootable from its disks and its command line, and a guest whose root disk holds no filesystem
(wiped) stops in the initramfs with one line on its consoles, and no agent ever answers.

The filesystem is made on the host, without booting anything: the initramfs (cpio "newc") is unpacked into
a temporary directory and ``mke2fs -d`` builds the filesystem from it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from vmsnap.errors import VmsnapError
from vmsnap.lab.image import LabImage
from vmsnap.lab.image.contents import ROOT_MARKER, ROOT_SERIAL_PARAMETER
from vmsnap.runner import LocalRunner, Runner

ROOT_SERIAL = "root"
"""The serial (and drive id) of the lab guest's root disk."""

ROOT_APPEND = f"{ROOT_SERIAL_PARAMETER}={ROOT_SERIAL}"
"""What the kernel command line gets for a guest with a root disk."""


class RootDiskError(VmsnapError):
    """The lab guest's root disk could not be made."""

    default_hint = "check that e2fsprogs (mke2fs -d) and qemu-img are installed"


def unpack_cpio(archive: bytes, target: Path) -> int:
    """Unpack a cpio "newc" archive into ``target`` (directories, files, symlinks; device nodes skipped);
    returns the number of entries written.

    :raise RootDiskError: the archive is malformed or names a path outside ``target``
    """
    offset = 0
    written = 0
    while True:
        header = archive[offset : offset + 110]
        if len(header) < 110 or header[:6] != b"070701":
            raise RootDiskError(f"the initramfs is no cpio newc archive at byte {offset}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start : data_start + filesize]
        offset = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return written
        path = (target / name).resolve()
        if target.resolve() not in path.parents and path != target.resolve():
            raise RootDiskError(f"the initramfs names {name!r}, outside its root")
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFDIR:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(stat.S_IMODE(mode))
        elif kind == stat.S_IFLNK:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(data.decode(), path)
        elif kind == stat.S_IFREG:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(stat.S_IMODE(mode))
        else:
            continue  # device nodes: devtmpfs provides them
        written += 1


def make_root_disk(image: LabImage, path: Path, *, size: str = "256M", runner: Runner | None = None) -> Path:
    """Make ``path``, a qcow2 image holding the lab guest's root filesystem (ext4, label ``root``).

    :raise RootDiskError: the initramfs cannot be unpacked, or mke2fs or qemu-img failed
    """
    run = runner or LocalRunner()
    with tempfile.TemporaryDirectory(prefix=".rootfs-", dir=path.parent) as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        unpack_cpio(image.initrd.read_bytes(), tree)
        for directory in ("newroot", "proc", "sys", "dev", "root", "srv"):
            (tree / directory).mkdir(exist_ok=True)
        (tree / ROOT_MARKER).write_text("the lab guest's root disk (vmsnap.lab.rootfs)\n")
        raw = Path(tmp) / "root.raw"
        run.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", ROOT_SERIAL, "-d", str(tree), str(raw), size],
            timeout=300,
        )
        partial = path.with_name(f".{path.name}.partial")
        run.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(partial)], timeout=300
        )
        os.replace(partial, path)
    return path
