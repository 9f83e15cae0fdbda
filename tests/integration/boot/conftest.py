"""Fixtures of the boot verification tests: the lab guest booted from a root disk (so that a backup of it
boots from its disks and its command line), a short private run directory for the copies' sockets, and what
a test checks was left behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import LabImage

RootGuestFactory = Callable[..., LabGuest]


@pytest.fixture
def run_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``$VMSNAP_RUN_DIR`` for the test: short (unix socket paths), private, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    monkeypatch.setenv("VMSNAP_RUN_DIR", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_guest(lab_image: LabImage, tmp_path: Path) -> Iterator[RootGuestFactory]:
    """Boot lab guests whose root filesystem is on a disk (``root``, made from the initramfs): ``factory(
    name="bootvm", display=True)``; each is stopped when the test ends."""
    guests: list[LabGuest] = []

    def boot(*, name: str = "bootvm", display: bool = True) -> LabGuest:
        workdir = tmp_path / f"guest{len(guests)}"
        workdir.mkdir()
        guest = LabGuest(
            workdir,
            name=name,
            image=lab_image,
            data_disk_size=None,
            root_disk=workdir / "root.qcow2",
            display=display,
            boot_timeout=300,
        )
        guests.append(guest)
        return guest.start()

    try:
        yield boot
    finally:
        for guest in guests:
            guest.stop()


def image_digest(image: Path) -> str:
    """sha256 of an image's guest-visible bytes (read with -U: a running QEMU may hold it)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix=".digest-", dir=image.parent) as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
        with open(raw, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def leftovers(run_root: Path) -> list[str]:
    """What boot verifications left on this host: processes whose arguments name ``run_root`` (a copy's
    QEMU, an NBD server), and anything in ``run_root/boot`` but its lock file."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(run_root).encode() in arg for arg in argv) and int(pid) != os.getpid():
            found.append(f"process {pid}: {argv[0].decode(errors='replace')}")
    boot = run_root / "boot"
    if boot.is_dir():
        found += [str(p) for p in boot.iterdir() if p.name != ".lock"]
    return found
