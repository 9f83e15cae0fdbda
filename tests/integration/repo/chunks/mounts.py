"""Scratch filesystems and devices the chunk tests make and remove themselves: a tmpfs of a given size (a full
or read-only store), a loop device (a block device target). Both need root; the tests skip without."""

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
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """A loop device attached to ``backing``, detached afterwards."""
    result = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"no loop device here: {result.stderr.strip()}")
    device = Path(result.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)
