"""Processes vmsnap started and must stop: is a pid alive and still the same process, what is its command
line, stop it for sure.

The one place that signals processes. A process is named by its pid and its start time (a pid is reused, the
pair is not); a recorded daemon is signalled only while it still matches its :class:`Identity` (program,
a marker in its arguments, start time). Local processes are stopped with ``os.kill``; on another host (an
:class:`~vmsnap.runner.SshRunner`) the same steps run as a small POSIX ``sh`` script, argv-passed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import UsageError
from vmsnap.runner import Runner

CRASH_ENV = "VMSNAP_TEST_CRASH_AT"
"""Test-only: a step name at which a vmsnap process SIGKILLs itself (see :func:`crash_point`)."""
STEP_LOG_ENV = "VMSNAP_TEST_STEP_LOG"
"""Test-only: a file to which :func:`crash_point` appends the name of each step it stops at."""


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on ([] when it is gone): the command name
    before them is in parentheses and may hold spaces and parentheses itself."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` on this host in clock ticks since boot (``/proc/PID/stat`` field 22), None
    when it is gone. With the pid it names one process for good: a pid is reused, (pid, start time) is not.
    """
    fields = _stat(pid)
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True when ``pid`` exists on this host and is not a zombie (a zombie holds no files any more: it only
    waits for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def same_process(pid: int, started: int | None) -> bool:
    """True while ``pid`` is alive and is still the process that started at ``started``
    (:func:`start_time`); an unknown start time (None) matches no process."""
    return started is not None and start_time(pid) == started and alive(pid)


def cmdline(pid: int) -> list[str] | None:
    """The argv of process ``pid`` on this host, or None when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@attrs.frozen
class Identity:
    """What a recorded pid must still be before vmsnap signals it, so that a reused pid is never killed.

    :param program: the executable's base name (``argv[0]``), e.g. ``qemu-storage-daemon``
    :param marker: a string only that process's arguments hold (e.g. its private directory)
    :param start_time: its :func:`start_time`; None skips that check
    """

    program: str
    marker: str
    start_time: int | None = None


def matches(pid: int, identity: Identity) -> bool:
    """True when ``pid`` runs on this host (not a zombie) and is the process ``identity`` describes."""
    if pid <= 1:
        return False
    argv = cmdline(pid)
    if not argv or Path(argv[0]).name != identity.program:
        return False
    if not any(identity.marker in arg for arg in argv[1:]):
        return False
    if identity.start_time is not None and start_time(pid) != identity.start_time:
        return False
    return alive(pid)


def terminate(pid: int, *, timeout: float = 10.0, identity: Identity | None = None) -> bool:
    """Stop local process ``pid``: SIGTERM (repeated every 0.5 s: a SIGTERM that lands while QEMU tools are
    still setting up their signal handlers can be lost), SIGKILL after ``timeout``, and wait until it is gone
    (10 s at most after SIGKILL: only a process stuck in the kernel outlives it; :func:`same_process` tells).

    The process is told apart from a later one that got its pid by its start time, read once here (or
    taken from ``identity``): a reused pid is never signalled. A pid that is already gone (or, given
    ``identity``, is no longer that process) is no error.

    :param identity: signal ``pid`` only while it is this process (:func:`matches`)
    :return: True when a process was signalled
    """
    if pid <= 1 or pid == os.getpid():
        return False
    if identity is not None and not matches(pid, identity):
        return False
    # from here on "still there" is the same start time: an exiting process's cmdline reads empty before
    # it is gone, and a pid freed meanwhile may be someone else's at once
    started = (
        identity.start_time if identity is not None and identity.start_time is not None else start_time(pid)
    )

    def there() -> bool:
        return alive(pid) and (started is None or start_time(pid) == started)

    if not there():
        return False
    deadline = time.monotonic() + timeout
    next_term = 0.0
    while there() and time.monotonic() < deadline:
        if time.monotonic() >= next_term:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            next_term = time.monotonic() + 0.5
        time.sleep(0.01)
    if there():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        give_up = time.monotonic() + 10.0
        while there() and time.monotonic() < give_up:
            time.sleep(0.01)
    return True


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


def stop(runner: Runner, pid: int | str, *, timeout: float = 10.0, identity: Identity | None = None) -> bool:
    """Stop process ``pid`` where ``runner`` runs (see :func:`terminate`).

    :param pid: as read from a pid file; anything but a positive number is ignored
    :param identity: signal it only while it is this process (on this host only)
    :return: True when a process was signalled (always True on another host, where it is not known)
    :raise UsageError: an identity for a process on another host
    """
    text = str(pid).strip()
    if not text.isdigit() or int(text) <= 1:
        return False
    if runner.host == "local":
        return terminate(int(text), timeout=timeout, identity=identity)
    if identity is not None:
        raise UsageError(f"cannot check the identity of pid {text} on {runner.host}: only on this host")
    steps = str(max(1, int(timeout / 0.02)))
    runner.run(["sh", "-c", _REMOTE_STOP, "sh", text, steps], timeout=timeout + 30)
    return True


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
    is ``term:name``; SIGSTOP when it is ``stop:name``, so that a test can act while it is stopped there and
    SIGCONT it; ``stop:*`` stops at every step). Before a SIGSTOP the step's name is appended to the file
    ``$VMSNAP_TEST_STEP_LOG`` names, when set (a line each), so that a test knows where it stopped.

    The crash-recovery tests use it to stop a backup, a gc, a mount or an instant restore at an exact step,
    and the interleaving test to run processes step by step in a chosen order; nothing else sets it.
    """
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"term:{name}":
        os.kill(os.getpid(), signal.SIGTERM)
    elif wanted in (f"stop:{name}", "stop:*"):
        log = os.environ.get(STEP_LOG_ENV)
        if log:
            with open(log, "a", encoding="utf-8") as steps:
                steps.write(name + "\n")
        # thread-directed: a SIGSTOP sent to the process is taken by whichever thread the kernel wakes (the
        # main one), and on a busy machine the calling thread returned from kill() and ran on (a gc sent its
        # deletes) before that thread stopped the group; sent to this thread, it stops before it returns
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
