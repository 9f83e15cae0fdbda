"""Processes vmsnap started and must stop: is a pid alive, what is its command line, stop it for sure.

The one place that signals processes. Local processes are stopped with ``os.kill``; on another host (an
:class:`~vmsnap.runner.SshRunner`) the same steps run as a small POSIX ``sh`` script, argv-passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmsnap.runner import Runner

CRASH_ENV = "VMSNAP_TEST_CRASH_AT"
"""Test-only: a step name at which a vmsnap process SIGKILLs itself (see :func:`crash_point`)."""


def alive(pid: int) -> bool:
    """True when ``pid`` exists on this host and is not a zombie (a zombie holds no files any more: it only
    waits for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> list[str] | None:
    """The argv of process ``pid`` on this host, or None when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def terminate(pid: int, *, timeout: float = 10.0) -> None:
    """Stop local process ``pid``: SIGTERM (repeated every 0.5 s: a SIGTERM that lands while QEMU tools are
    still setting up their signal handlers can be lost), SIGKILL after ``timeout``, and wait until it is gone.

    A pid that is already gone is no error.
    """
    if pid <= 1 or pid == os.getpid():
        return
    deadline = time.monotonic() + timeout
    next_term = 0.0
    while alive(pid) and time.monotonic() < deadline:
        if time.monotonic() >= next_term:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            next_term = time.monotonic() + 0.5
        time.sleep(0.01)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        give_up = time.monotonic() + 10.0
        while alive(pid) and time.monotonic() < give_up:
            time.sleep(0.01)


def stop_child(process: subprocess.Popen[Any], *, timeout: float = 10.0) -> None:
    """Stop a child this process started (:func:`terminate`, by its pid) and reap it; one that has already
    exited is only reaped.

    :param timeout: seconds between the first SIGTERM and SIGKILL (0: SIGKILL at once)
    """
    if process.poll() is None:
        terminate(process.pid, timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):  # only one stuck in the kernel outlives SIGKILL
        process.wait(10)


_REMOTE_STOP = (
    'alive() { s=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }; '
    'i=0; while alive "$1"; do '
    'if [ $((i % 25)) -eq 0 ]; then kill -TERM "$1" 2>/dev/null; fi; i=$((i+1)); '
    'if [ "$i" -gt "$2" ]; then kill -KILL "$1" 2>/dev/null; fi; sleep 0.02; done'
)


def stop(runner: Runner, pid: int | str, *, timeout: float = 10.0) -> None:
    """Stop process ``pid`` where ``runner`` runs (see :func:`terminate`).

    :param pid: as read from a pid file; anything but a positive number is ignored
    """
    text = str(pid).strip()
    if not text.isdigit() or int(text) <= 1:
        return
    if runner.host == "local":
        terminate(int(text), timeout=timeout)
        return
    steps = str(max(1, int(timeout / 0.02)))
    runner.run(["sh", "-c", _REMOTE_STOP, "sh", text, steps], timeout=timeout + 30)


def find(programs: frozenset[str], patterns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """This host's processes running one of ``programs`` (by basename) whose command line contains one of
    ``patterns``: (pid, argv). Never this process."""
    wanted = [p for p in patterns if p]
    if not wanted:
        return
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = cmdline(int(entry.name))
        if not argv or Path(argv[0]).name not in programs:
            continue
        command = " ".join(argv)
        if any(p in command for p in wanted):
            yield int(entry.name), argv


def crash_point(name: str) -> None:
    """TEST ONLY: kill this process with SIGKILL when ``$VMSNAP_TEST_CRASH_AT`` is ``name`` (SIGTERM when it
    is ``term:name``).

    The crash-recovery tests use it to stop a backup, a mount or an instant restore at an exact step;
    nothing else sets it.
    """
    wanted = os.environ.get(CRASH_ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"term:{name}":
        os.kill(os.getpid(), signal.SIGTERM)
