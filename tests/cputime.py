"""Where the suite's time goes: per test, the wall time and the CPU time of its worker process and of the
children it reaped, for set-up, call and tear-down apart; off unless asked for.

    VMSNAP_TEST_TIMES=/tmp/times.jsonl .venv/bin/pytest -n 3 --dist worksteal ...
    .venv/bin/python -m tests.cputime /tmp/times.jsonl        # the top 40 by CPU and by wall time

Each worker appends one JSON line per test and phase to the file (appends of one short line are atomic).
"children" is the CPU of the worker's descendants: those reaped during the phase (``RUSAGE_CHILDREN``)
plus what the live ones (a session's SeaweedFS, the lab guest's QEMU) used during it, read from
``/proc/PID/stat`` (a grandchild reaped by a child that is still running is counted when that child is
reaped). A machine loaded by others inflates wall times, much less CPU times: rank by CPU to find work, by
wall to find waiting.
tests/conftest.py loads this plugin; without ``VMSNAP_TEST_TIMES`` its hooks do nothing.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Generator
from pathlib import Path

import pytest

TICK = os.sysconf("SC_CLK_TCK")


def _descendants_cpu() -> float:
    """CPU seconds used so far by the live descendants of this process (``/proc/PID/stat``)."""
    children: dict[int, list[int]] = defaultdict(list)
    used: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry.name)
        children[int(fields[1])].append(pid)  # fields[0] is field 3 (state), fields[1] the parent
        used[pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    total, todo = 0.0, list(children[os.getpid()])
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += children[pid]
    return total


def _cpu() -> tuple[float, float]:
    """(this process's CPU, its children's): the reaped ones (``RUSAGE_CHILDREN``) and the live ones, so
    that a daemon started before a test (the lab guest's QEMU) is counted for the CPU it used during it, and
    one reaped during it for its whole life less what it had used before."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime + _descendants_cpu()


def _record(item: pytest.Item, phase: str, wall: float, own: float, children: float) -> None:
    path = os.environ["VMSNAP_TEST_TIMES"]
    line = {"test": item.nodeid, "phase": phase, "wall": wall, "cpu": own, "children": children}
    line["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")


def _timed(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    if not os.environ.get("VMSNAP_TEST_TIMES"):
        yield
        return
    own, children, wall = *_cpu(), time.monotonic()
    yield
    own_after, children_after = _cpu()
    _record(item, phase, time.monotonic() - wall, own_after - own, children_after - children)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _timed(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _timed(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _timed(item, "teardown")


def rank(path: Path, top: int = 40) -> str:
    """The ``top`` tests by CPU (worker + reaped children, all phases) and by wall time, as a table."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for line in path.read_text().splitlines():
        row = json.loads(line)
        total = totals[row["test"]]
        total[0] += row["wall"]
        total[1] += row["cpu"] + row["children"]
        total[2] += row["cpu"]
        total[3] += row["children"]
    out = []
    for title, key in (("by CPU", 1), ("by wall", 0)):
        out.append(f"top {top} {title}: wall s, CPU s (worker + children), test")
        for test, (wall, cpu, own, kids) in sorted(totals.items(), key=lambda t: -t[1][key])[:top]:
            out.append(f"{wall:8.1f} {cpu:8.1f} ({own:6.1f} + {kids:6.1f})  {test}")
    wall_sum = sum(t[0] for t in totals.values())
    cpu_sum = sum(t[1] for t in totals.values())
    out.append(f"{len(totals)} tests: {wall_sum:.0f} s wall, {cpu_sum:.0f} s CPU in all")
    return "\n".join(out)


if __name__ == "__main__":
    print(rank(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 40))
