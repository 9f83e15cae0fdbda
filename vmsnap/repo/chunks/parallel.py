"""A bounded worker pool for the chunk pipelines: tasks flow through a short queue to a few threads, the first
failure stops everything, and the calling thread reports progress while it waits.

Threads suit the work: reads (libnbd, ``os.pread``), sha256/HMAC, zstd and AES-GCM all release the GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
TICK = 0.25
"""Seconds between progress reports while the caller waits."""


class _Stop:
    pass


_STOP = _Stop()


class BoundedPool(Generic[T]):
    """Run ``work(task)`` for every task on ``workers`` threads, at most ``depth`` tasks queued.

    :param work: called on a worker thread for each task; its first exception stops the run
    :param workers: threads
    :param depth: tasks queued ahead of the workers (the producer blocks beyond that)
    :param tick: called on the calling thread about every 0.25 s while it waits, and once at the end
    """

    def __init__(
        self, work: Callable[[T], None], *, workers: int, depth: int, tick: Callable[[], None] | None = None
    ) -> None:
        self._work = work
        self._workers = max(1, workers)
        self._queue: queue.Queue[T | _Stop] = queue.Queue(maxsize=max(1, depth))
        self._tick = tick or (lambda: None)
        self._failed = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
        self._failed.set()

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if isinstance(task, _Stop):
                return
            if self._failed.is_set():
                continue  # drain, so the producer never blocks on a dead pool
            try:
                self._work(task)
            except BaseException as err:
                self._fail(err)

    def _safe_tick(self) -> None:
        try:
            self._tick()
        except BaseException as err:  # a failing progress callback fails the run, after a clean stop
            self._fail(err)

    def _put(self, item: T | _Stop) -> None:
        while True:
            try:
                self._queue.put(item, timeout=TICK)
                return
            except queue.Full:
                self._safe_tick()

    def run(self, tasks: Iterable[T]) -> None:
        """Run every task; return when all are done, or raise the first worker's exception.

        An exception from ``tasks`` itself (the producer) stops the workers and is raised as well.
        """
        threads = [
            threading.Thread(target=self._loop, name=f"vmsnap-chunks-{n}", daemon=True)
            for n in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        try:
            for task in tasks:
                if self._failed.is_set():
                    break
                self._put(task)
        except BaseException as err:
            self._fail(err)
        finally:
            for _ in threads:
                self._put(_STOP)
            for thread in threads:
                while thread.is_alive():
                    thread.join(TICK)
                    self._safe_tick()
        self._safe_tick()
        if self._error is not None:
            raise self._error
