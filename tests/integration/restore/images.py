"""Disk images for the restore tests, built on this host with real tools: partition tables by sfdisk,
filesystems by mkfs on loop devices (``losetup --offset --sizelimit``), files written through real mounts
under temp directories, qcow2 chains by qemu-img, and an incremental layer changed through a writable
storage daemon.

Every loop device and mount made here is undone before a builder returns (also on error).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from vmsnap.image.storage_daemon import FuseExport, QemuStorageDaemon, qcow2_chain_node

MiB = 1024 * 1024

Tree = dict[str, tuple[int, bytes | None]]
"""relative path → (st_mode, content: file bytes, symlink target as bytes, None for a directory)."""


def run(*argv: str, input: bytes | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, input=input).stdout.decode()


@contextlib.contextmanager
def loop(file: Path, offset: int = 0, size: int = 0, *, read_only: bool = False) -> Iterator[str]:
    argv = ["losetup", "--show", "--find", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    device = run(*argv, str(file)).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def mounted(device: str, options: str = "") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmsnap-build-") as target:
        run("mount", *(["-o", options] if options else []), device, target)
        try:
            yield Path(target)
        finally:
            subprocess.run(["umount", target], check=True)


def snapshot(root: Path) -> Tree:
    """Every entry under ``root`` with its mode and content (filesystem internals left out)."""
    tree: Tree = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if rel == "lost+found" or rel.startswith("lost+found/"):
                continue
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                tree[rel] = (info.st_mode, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                tree[rel] = (info.st_mode, None)
            else:
                tree[rel] = (info.st_mode, path.read_bytes())
    return tree


def pattern(seed: str, size: int) -> bytes:
    """``size`` bytes that differ for every seed (sha256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def write_v1(root: Path, tag: str) -> None:
    """The full backup's files: several modes, a symlink, an empty file, a file larger than a 4 MiB chunk."""
    (root / "etc").mkdir(mode=0o755)
    (root / "etc/hostname").write_bytes(f"lab-{tag}\n".encode())
    (root / "etc/shadow").write_bytes(pattern(f"{tag}-shadow", 1000))
    os.chmod(root / "etc/shadow", 0o600)
    (root / "bin").mkdir(mode=0o755)
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho " + tag.encode() + b"\n")
    os.chmod(root / "bin/tool", 0o4755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "private").mkdir(mode=0o700)
    (root / "private/empty").write_bytes(b"")
    (root / "private/big.bin").write_bytes(pattern(f"{tag}-big", 5 * MiB + 123))
    (root / "with space.txt").write_bytes(b"spaces survive\n")
    (root / "to-be-deleted").write_bytes(b"gone in v2\n")
    os.symlink("etc/hostname", root / "link")
    (root / "victim.bin").write_bytes(pattern(f"{tag}-victim", 256 * 1024))


def write_v2(root: Path, tag: str) -> None:
    """The incremental's changes: a file rewritten, one removed, one added, a mode changed."""
    (root / "etc/hostname").write_bytes(f"lab-{tag}-v2\n".encode())
    (root / "to-be-deleted").unlink()
    (root / "added-in-v2").write_bytes(pattern(f"{tag}-added", 70000))
    os.chmod(root / "with space.txt", 0o640)


@attrs.frozen
class Layout:
    """One partition of a test disk: number, size, filesystem (None: none), GPT name."""

    number: int
    size: int
    fstype: str | None
    name: str


GPT_LAYOUT = (
    Layout(1, 32 * MiB, "ext4", "root"),
    Layout(2, 300 * MiB, "xfs", "data"),  # mkfs.xfs 6.x refuses less than 300 MiB
    Layout(3, 120 * MiB, "btrfs", "home"),  # mkfs.btrfs refuses less than 114 MiB
    Layout(4, 4 * MiB, None, "empty"),
)


def mkfs(fstype: str, device: str, label: str) -> None:
    if fstype == "ext4":
        run("mkfs.ext4", "-q", "-L", label, device)
    elif fstype == "ext2":
        run("mkfs.ext2", "-q", "-L", label, device)
    elif fstype == "xfs":
        run("mkfs.xfs", "-q", "-L", label, device)
    elif fstype == "btrfs":
        run("mkfs.btrfs", "-q", "-L", label, device)
    elif fstype == "vfat":
        run("mkfs.vfat", "-n", label.upper(), device)
    else:
        raise ValueError(fstype)


def partition(raw: Path, layouts: tuple[Layout, ...], *, label: str = "gpt") -> dict[int, tuple[int, int]]:
    """Write a partition table (sfdisk script); returns number → (offset, size) in bytes."""
    lines = [f"label: {label}"]
    for part in layouts:
        if label == "gpt":
            lines.append(f'size={part.size // 1024}KiB, type=L, name="{part.name}"')
        else:
            lines.append(f"size={part.size // 1024}KiB, type=83")
    run("sfdisk", "-q", str(raw), input="\n".join(lines).encode() + b"\n")
    return read_table(raw)


def read_table(raw: Path) -> dict[int, tuple[int, int]]:
    import json

    table = json.loads(run("sfdisk", "-J", str(raw)))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    found = {}
    for entry in table["partitions"]:
        number = int(entry["node"][len(table["device"]) :].lstrip("p"))
        found[number] = (int(entry["start"]) * sector, int(entry["size"]) * sector)
    return found


def build_gpt(raw: Path, *, tag: str = "t") -> dict[str, Tree]:
    """A GPT disk with ext4, xfs, btrfs and an empty partition, v1 files on each; returns ``p<N>`` → tree."""
    total = sum(p.size for p in GPT_LAYOUT) + 4 * MiB
    with open(raw, "wb") as out:
        out.truncate(total)
    table = partition(raw, GPT_LAYOUT)
    trees = {}
    for part in GPT_LAYOUT:
        if part.fstype is None:
            continue
        offset, size = table[part.number]
        with loop(raw, offset, size) as device:
            mkfs(part.fstype, device, part.name)
            with mounted(device) as root:
                write_v1(root, f"{tag}{part.number}")
                trees[f"p{part.number}"] = snapshot(root)
    return trees


def change_through_daemon(
    image: Path, table: dict[int, tuple[int, int]], change: Callable[[str, Path], None], parts: dict[str, str]
) -> dict[str, Tree]:
    """Mount partitions of a qcow2 image read-write through a writable storage daemon's FUSE file and loop
    devices, apply ``change(part_name, root)`` to each, and return the trees afterwards.

    :param parts: ``p<N>`` → mount options
    """
    node = qcow2_chain_node(image, "img")
    trees = {}
    with QemuStorageDaemon(
        [node], fuse_exports=[FuseExport("img", "disk", writable=True)], writable=True
    ) as qsd:
        disk = qsd.fuse_file("disk")
        for name, options in parts.items():
            offset, size = table[int(name[1:])]
            with loop(disk, offset, size) as device, mounted(device, options) as root:
                change(name, root)
                trees[name] = snapshot(root)
            run("sync")
    return trees


def find_pattern(raw: Path, data: bytes, start: int, end: int) -> int:
    """The offset in ``raw`` (1 KiB aligned: the smallest ext4 block, within [start, end)) where ``data``'s
    first 4 KiB are stored."""
    head = data[:4096]
    with open(raw, "rb") as f:
        pos = start
        while pos < end:
            f.seek(pos)
            block = f.read(min(4 * MiB, end - pos) + 4096)
            step = min(4 * MiB, end - pos)
            for i in range(0, step, 1024):
                if block[i : i + 4096] == head:
                    return pos + i
            pos += step
    raise AssertionError(f"pattern not found in {raw}")


def qcow2_l2_entry_offset(image: Path, guest_offset: int) -> int:
    """The file offset of the L2 entry that maps ``guest_offset`` in a qcow2 image (standard L2 entries)."""
    import struct

    with open(image, "rb") as f:
        header = f.read(104)
        cluster_bits = struct.unpack(">I", header[20:24])[0]
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        cluster = 1 << cluster_bits
        per_l2 = cluster // 8
        l1_index, l2_index = divmod(guest_offset // cluster, per_l2)
        f.seek(l1_offset + 8 * l1_index)
        l2_table = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        if not l2_table:
            raise AssertionError(f"{image} maps nothing at {guest_offset}")
        return l2_table + 8 * l2_index
