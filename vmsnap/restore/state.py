"""State of mounts and instant restores: run directories (named by :func:`run_key`), state files written
before each step (:func:`vmsnap.files.write_json_atomic`) so that a killed process's leftovers can be found
and undone, a lock around changes, and the daemons a run directory holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmsnap import processes
from vmsnap.errors import VmsnapError
from vmsnap.files import FILE_MODE, make_private_dir
from vmsnap.image.daemon import (
    RECORD,
    DaemonRecord,
    RecordedDaemon,
    read_record,
    stop_recorded,
    stop_unrecorded,
)
from vmsnap.image.nbdkit import NbdkitServer
from vmsnap.image.storage_daemon import QemuStorageDaemon
from vmsnap.runner import Runner


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``directory/.lock`` (released when the process dies, too)."""
    make_private_dir(directory, tighten=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def run_key(path: Path) -> str:
    """The name of the run directory of a mount or an instant restore: a hash of its (real) path."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def read_state(path: Path) -> dict[str, Any] | None:
    """A state file's content, None when it does not exist.

    :raise VmsnapError: it exists but is not JSON
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise VmsnapError(
            f"state file {path} is damaged ({err})", hint="run `vmsnap recover`; it cleans what it can find"
        ) from err
    if not isinstance(data, dict):
        raise VmsnapError(f"state file {path} is damaged (not an object)")
    return data


def owner() -> dict[str, Any]:
    """This process, as a state file records it (pid and start time: a reused pid is not mistaken for it)."""
    return {"pid": os.getpid(), "start_time": processes.start_time(os.getpid())}


def owner_alive(data: dict[str, Any]) -> bool:
    """True while the process a state file names as its owner still runs."""
    try:
        pid, start = int(data["pid"]), data.get("start_time")
    except (KeyError, TypeError, ValueError):
        return False
    return pid > 0 and processes.same_process(pid, start)


_SERVERS: tuple[type[RecordedDaemon], ...] = (QemuStorageDaemon, NbdkitServer)
"""The daemons a mount or an instant restore starts, in the order they are stopped (a storage daemon may
read from an nbdkit)."""


def daemons_under(parent: Path) -> list[DaemonRecord]:
    """Records of the daemons whose private directories are in ``parent`` (skips damaged ones)."""
    found = []
    for directory in sorted(parent.iterdir()) if parent.is_dir() else []:
        with contextlib.suppress(VmsnapError):
            if (directory / RECORD).is_file():
                found.append(read_record(directory / RECORD))
    return found


def stop_daemons_under(parent: Path, *, runner: Runner, timeout: float = 10.0) -> list[str]:
    """Stop every daemon whose private directory is in ``parent``: recorded ones by their record, and those
    that started but were not recorded yet (the process died in between) by their pid file; storage
    daemons before nbdkit (a storage daemon may read from an nbdkit). Returns what was stopped.
    """
    stopped = []
    children = list(parent.iterdir()) if parent.is_dir() else []
    for directory in sorted(children, key=_stop_order):
        if directory.is_dir() and not directory.is_symlink():
            stopped += stop_daemon_dir(directory, runner=runner, timeout=timeout)
    return stopped


def stop_daemon_dir(directory: Path, *, runner: Runner, timeout: float = 10.0) -> list[str]:
    """Stop the daemon of one private directory (by its record, else by its pid file); a recorded one's
    directory is removed too. Returns what was stopped."""
    record: DaemonRecord | None = None
    with contextlib.suppress(VmsnapError):
        record = read_record(directory / RECORD)
    if record is not None:
        alive = record.alive()
        stop_recorded(record, timeout=timeout, runner=runner)
        return [f"{record.program} (pid {record.pid})"] if alive else []
    stopped = []
    for server in _SERVERS:
        if directory.name.startswith(server.private_prefix):
            pid = stop_unrecorded(directory, server.program, server.pid_file, timeout=timeout, runner=runner)
            if pid is not None:
                stopped.append(f"{server.program} (pid {pid})")
    return stopped


def _stop_order(directory: Path) -> int:
    for index, server in enumerate(_SERVERS):
        if directory.name.startswith(server.private_prefix):
            return index
    return len(_SERVERS)


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
