"""Backups built by hand with real qemu-img/qemu-io (no VM): the same files a backup run leaves."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from vmsnap.repo.manifest import DiskRecord, Manifest, utc_now_iso
from vmsnap.repo.qcow2_repo import Qcow2Repository as Repository

DISKS = ("disk0", "disk1")
SIZE = 4 * 1024 * 1024

W1 = {"disk0": ["write -P 0x11 0 1M", "write -P 0x12 2M 64k"], "disk1": ["write -P 0x21 1M 1M"]}
W2 = {"disk0": ["write -P 0x31 512k 1M", "write -z 2M 64k"], "disk1": ["write -P 0x41 0 64k"]}
W3 = {"disk0": ["write -P 0x51 3M 64k"], "disk1": ["discard 1M 64k"]}


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def stage_images(repo: Repository, vm: str, writes: dict[str, list[str]], parent: str | None) -> Path:
    """A staging directory with one image per disk of :data:`DISKS`, each with the qemu-io ``writes`` (on
    top of ``parent``'s images, if any)."""
    staging = repo.stage(vm, repo.new_backup_id(vm))
    for disk in DISKS:
        image = staging / f"{disk}.qcow2"
        if parent is None:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
        else:
            backing = f"../{parent}/{disk}.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(image)],
                check=True,
            )
        qemu_io(image, *writes.get(disk, []))
    return staging


def add_backup(
    repo: Repository, vm: str, writes: dict[str, list[str]], parent: str | None = None
) -> Manifest:
    """Stage and commit a backup whose disks get the qemu-io ``writes`` (on top of ``parent``'s, if any)."""
    staging = stage_images(repo, vm, writes, parent)
    records = []
    for disk in DISKS:
        image = staging / f"{disk}.qcow2"
        digest = repo.digest_staged(staging, disk, SIZE, parent=repo.get(vm, parent) if parent else None)
        records.append(DiskRecord(disk, image.name, SIZE, image.stat().st_size, digest))
    manifest = Manifest(
        vm=vm,
        backup_id=staging.name.removeprefix(".partial-"),
        kind="incremental" if parent else "full",
        parent=parent,
        strategy="backup",
        transport="none",
        created=utc_now_iso(),
        quiesced=False,
        bitmap="vmsnap",
        disks=tuple(records),
    )
    repo.commit(staging, manifest)
    return manifest


def expected_raw(tmp: Path, name: str, *write_lists: list[str]) -> Path:
    """A reference qcow2 with the same writes applied in order (what the guest saw)."""
    image = tmp / f"expected-{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    for writes in write_lists:
        qemu_io(image, *writes)
    return image


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def flip_data_byte(image: Path) -> None:
    """Change one byte of guest data inside a qcow2 (found through qemu-img map)."""
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True
        ).stdout
    )
    offset = next(e["offset"] for e in extents if e["data"] and "offset" in e)
    with open(image, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
