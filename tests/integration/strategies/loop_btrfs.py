"""A real Btrfs filesystem on a loop device this test session creates (never the host's own filesystems).

Import the fixtures into a test module (``from tests.integration.strategies.loop_btrfs import ...``).
Teardown unmounts and detaches exactly the device the fixture attached, also when a test failed.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest


@attrs.define
class LoopBtrfs:
    """A mounted loop-backed Btrfs: ``mount`` is its top; :meth:`subvolume` makes a fresh subvolume."""

    image: Path
    device: str
    mount: Path
    _counter: Iterator[int] = attrs.Factory(itertools.count)

    def subvolume(self, name: str | None = None) -> Path:
        """Create a new subvolume below the mount point and return its path."""
        path = self.mount / (name or f"subvol{next(self._counter)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(path)], check=True)
        return path


def _detach(device: str, mount: Path) -> None:
    """Unmount (retrying while a process that is exiting still holds a file) and detach the device."""
    for _ in range(5):
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
            break
        if subprocess.run(["mountpoint", "-q", str(mount)]).returncode != 0:
            break
        time.sleep(1)
    else:
        # something this session started still holds it: never leave a mount behind in /tmp
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)
    subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


@contextlib.contextmanager
def made_loop_btrfs(base: Path, size: int) -> Iterator[LoopBtrfs]:
    """A ``size``-byte sparse file in ``base`` → ``losetup --find --show`` → ``mkfs.btrfs`` → mounted in
    ``base/mnt``; unmounted and detached afterwards."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.fail("mkfs.btrfs is missing: install btrfs-progs (scripts/packages.d/storage.txt)")
    image = base / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(size)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mount = base / "mnt"
    mount.mkdir()
    try:
        subprocess.run(["mkfs.btrfs", "-q", "-f", device], check=True, capture_output=True)
        subprocess.run(["mount", "-t", "btrfs", device, str(mount)], check=True)
        yield LoopBtrfs(image, device, mount)
    finally:
        _detach(device, mount)
        image.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def loop_btrfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopBtrfs]:
    """A 1 GiB Btrfs on a loop device (:func:`made_loop_btrfs`)."""
    with made_loop_btrfs(tmp_path_factory.mktemp("loop-btrfs"), 1 << 30) as fs:
        yield fs
