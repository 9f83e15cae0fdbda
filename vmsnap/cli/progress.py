"""Progress on a terminal: one ``rich`` bar per disk on stderr with bytes, rate and time left.

The library reports ``(disk, bytes done, bytes total)``, and a backup into a chunks repository also what its
pipeline read, stored and deduplicated (shown beside the bar); nothing is drawn with ``--json`` or when
stderr is not a terminal (logs and pipes get only the outcome).
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

from vmsnap.repo.progress import Transfer, no_progress


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


class _TransferColumn(ProgressColumn):
    """What a backup's pipeline read, stored (compressed, encrypted) and found stored already; empty for
    work that reports no such figures."""

    def render(self, task: Task) -> Text:
        figures = task.fields.get("transfer")
        if not isinstance(figures, Transfer):
            return Text("")
        return Text(
            f"read {_mib(figures.read)} · stored {_mib(figures.stored)} · dedup {_mib(figures.deduplicated)}",
            style="progress.download",
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


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

    def transfer(self, disk: str, figures: Transfer) -> None:
        """A backup's pipeline figures for ``disk``, shown beside its bar (once the bar exists)."""
        with self._lock:
            bar = self._bars.get(disk)
            if bar is not None:
                self._progress.update(bar[0], transfer=figures)


class _NoBars:
    """Draws nothing (``--json``, or stderr is not a terminal)."""

    def __call__(self, disk: str, done: int, total: int) -> None:
        no_progress(disk, done, total)

    def transfer(self, disk: str, figures: Transfer) -> None:
        """Nothing."""


@contextlib.contextmanager
def disk_progress(enabled: bool) -> Iterator[DiskBars | _NoBars]:
    """A progress callback for the body: bars on stderr when ``enabled`` and stderr is a terminal, else a
    callback that draws nothing. The bars stay on the screen, complete, when the body ends.

    :param enabled: False with ``--json``
    """
    if not enabled or not sys.stderr.isatty():
        yield _NoBars()
        return
    progress = Progress(
        TextColumn("{task.description:<12.12}"),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        _RateColumn(),
        TimeRemainingColumn(),
        _TransferColumn(),
        console=Console(stderr=True),
        redirect_stdout=False,  # stdout carries the result only; notes on stderr print above the bars
    )
    with progress:
        yield DiskBars(progress)
