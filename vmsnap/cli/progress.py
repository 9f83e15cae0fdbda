"""Progress on a terminal: one ``rich`` bar per disk on stderr with bytes, rate and time left.

The library reports ``(disk, bytes done, bytes total)``; nothing is drawn with ``--json`` or when stderr is
not a terminal (logs and pipes get only the outcome).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from vmsnap.repo.progress import DiskProgress, no_progress


class _RateColumn(ProgressColumn):
    """The transfer rate in MiB/s (rich's own column counts in MB/s, the rest of vmsnap in MiB); the
    average so far where rich has too few samples for its estimate (a disk done in a second)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:
            speed = task.completed / task.elapsed
        if speed is None:
            return Text("", style="progress.data.speed")
        return Text(f"{speed / 2**20:,.1f} MiB/s", style="progress.data.speed")


class DiskBars:
    """A ``(disk, done, total)`` callback that draws a bar per disk; a disk that starts again from a lower
    figure (``verify`` reads one disk of several backups) gets a new bar. Safe to call from threads.

    :param progress: a started :class:`rich.progress.Progress`
    """

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._bars: dict[str, tuple[TaskID, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, disk: str, done: int, total: int) -> None:
        if total <= 0:
            return
        done = min(max(done, 0), total)
        with self._lock:
            bar = self._bars.get(disk)
            if bar is None or done < bar[1]:
                bar = (self._progress.add_task(disk, total=total), 0)
            self._bars[disk] = (bar[0], done)
            self._progress.update(bar[0], completed=done, total=total)


@contextlib.contextmanager
def disk_progress(enabled: bool) -> Iterator[DiskProgress]:
    """A progress callback for the body: bars on stderr when ``enabled`` and stderr is a terminal, else a
    callback that draws nothing. The bars stay on the screen, complete, when the body ends.

    :param enabled: False with ``--json``
    """
    if not enabled or not sys.stderr.isatty():
        yield no_progress
        return
    progress = Progress(
        TextColumn("{task.description:<12.12}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        _RateColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        redirect_stdout=False,  # stdout carries the result only; notes on stderr print above the bars
    )
    with progress:
        yield DiskBars(progress)
