"""Durable, private files: the one place that fsyncs, writes atomically and decides modes.

Backups are written 0600 and their directories 0700; anything that must survive a power cut is written to
a temporary file, fsync'd, renamed into place, and its directory fsync'd.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmsnap.errors import NotFoundError, TransferError, UsageError

FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync one file's data and metadata."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically: temp file (``mode``), fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (0600); see :func:`write_atomic`."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def make_private_dir(path: Path, *, tighten: bool = False) -> Path:
    """Create ``path`` (0700) if missing, parents too. An existing directory keeps its mode unless
    ``tighten`` (run directories vmsnap owns: made 0700 again).

    :raise UsageError: ``path`` exists and is not a directory, or is a symlink
    """
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UsageError(f"{path} exists and is not a directory", hint="remove it or choose another path")
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if tighten:
        os.chmod(path, DIR_MODE)
    return path


def allocated_bytes(path: str | Path) -> int:
    """Bytes the file occupies on its filesystem (holes not counted)."""
    return os.stat(path).st_blocks * 512


def is_full(err: OSError) -> bool:
    """True when ``err`` says the filesystem is full (or the quota is used up)."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def check_target_dir(target: Path) -> None:
    """Fail clearly when the directory a target goes into does not exist or is not writable.

    :raise NotFoundError: the directory does not exist
    :raise TransferError: it is not a writable directory
    """
    parent = target.parent
    if not parent.is_dir():
        raise NotFoundError(
            f"target directory {parent} does not exist", hint="create it, or choose another target"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TransferError(
            f"target directory {parent} is not writable", hint="fix its permissions or choose another target"
        )


@contextlib.contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success make it 0600, fsync it, rename it to ``target``
    and fsync the directory; on any error remove it, so no partial target is ever left behind.

    :raise NotFoundError: the target's directory does not exist
    :raise TransferError: the directory is not writable
    """
    target = Path(target)
    check_target_dir(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, FILE_MODE)
        fsync_file(partial)
        os.replace(partial, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
