"""Scratch filesystems and devices the chunk tests make and remove themselves: a tmpfs of a given size (a full
or read-only store), a loop device (a block device target). Both need root and the kernel's tmpfs and loop
support: without them the tests fail saying what is missing (a skip would hide that nothing was tested)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (made here) with mount ``options``, unmounted afterwards."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        path.rmdir()
        pytest.fail(
            f"cannot mount a tmpfs here: {result.stderr.strip()} — run the tests as root (mount is in "
            "util-linux: apt-get install util-linux)"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """A loop device attached to ``backing``, detached afterwards."""
    result = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(
            f"no loop device here: {result.stderr.strip()} — run the tests as root with the loop module "
            "(modprobe loop; losetup is in util-linux: apt-get install util-linux)"
        )
    device = Path(result.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)
