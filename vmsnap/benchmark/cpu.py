"""CPU time of a measured operation: this process (every thread), the children it reaped (qemu-img, cp, and
qemu-nbd servers that forked into the background, adopted while this process is a child subreaper) and the
live processes it names (the VM's QEMU, which serves the NBD exports of pull backups).

On a shared machine wall times move with the load; user+sys seconds of every process involved move much
less, and ``cores / (CPU s per GiB)`` bounds the throughput the same work can reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36
_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User+sys seconds of a live process (0.0 when it is gone), from ``/proc/PID/stat``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14, 15 of stat(5))


def _zombie_children() -> list[int]:
    """Children of this process that exited and wait to be reaped."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            found.append(int(entry.name))
    return found


def reap_adopted(keep: Iterable[int] = ()) -> None:
    """Reap the exited children this process adopted (never one in ``keep``: a Popen waits for its own), so
    their CPU time is counted in ``RUSAGE_CHILDREN``."""
    kept = set(keep)
    for pid in _zombie_children():
        if pid not in kept:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process a child subreaper for the body: daemons its children fork (``qemu-nbd --fork``)
    become its children, and their CPU time can be counted once they exit."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reap_adopted()


class CpuMeter:
    """User+sys seconds of this process, its reaped children and the live processes ``pids()`` names.

    :param pids: the live processes to count (read before and after each measurement)
    :param keep: children a Popen of this process owns (never reaped here)
    """

    def __init__(
        self, pids: Callable[[], Iterable[int]] = tuple, keep: Callable[[], Iterable[int]] = tuple
    ) -> None:
        self._pids = pids
        self._keep = keep

    def now(self) -> float:
        """CPU seconds so far (after reaping what exited)."""
        reap_adopted(self._keep())
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        return total + sum(process_cpu(pid) for pid in self._pids())
