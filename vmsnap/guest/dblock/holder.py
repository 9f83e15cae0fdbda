"""The holder process: takes the lock, tells ``freeze``, then serves ``thaw``/``status`` until it lets go.

It is a detached grandchild of ``freeze`` (see :func:`become_holder`); it releases the lock on thaw, after the
safety timeout, on SIGTERM, or when ``freeze`` is gone before it heard that the lock is held. When it ends
without a thaw it leaves ``outcome`` in the run directory, which the next ``thaw`` reports as a failure.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import attrs

from vmsnap.guest.dblock.config import ConnectionOptions, DbLockError, HolderSettings
from vmsnap.guest.dblock.database import open_locked_session, unlock
from vmsnap.guest.dblock.protocol import (
    LOG_NAME,
    OUTCOME_NAME,
    PID_NAME,
    error_line,
    read_request,
    remove_holder_files,
    reply,
    write_private,
)

Ending = Literal["thawed", "failed", "expired", "terminated"]
"""How the holder's wait ended: thaw released the lock, thaw found it lost, the safety timeout, SIGTERM."""


class _Terminated(Exception):
    """SIGTERM reached the holder."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} vmsnap-dblock[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


@attrs.frozen
class _HeldLock:
    """The lock the holder holds: its session, the session's id, and since when (monotonic seconds)."""

    connection: Any
    connection_id: int
    locked_at: float

    def seconds(self) -> float:
        """How long it has been held."""
        return time.monotonic() - self.locked_at


def _answer(held: _HeldLock, conn: socket.socket, run_dir: Path) -> Ending | None:
    """Answer one client of the holder's socket; the holder's ending when it asked to thaw, else None."""
    request = read_request(conn)
    seconds = held.seconds()
    if request == "status":
        reply(conn, f"locked {seconds:.3f} {os.getpid()} {held.connection_id}")
        return None
    if request != "thaw":
        reply(conn, f"error unknown request {request[:40]!r}; send thaw or status")
        return None
    try:
        unlock(held.connection)
    except DbLockError as err:
        _log(str(err))
        reply(conn, error_line(err))
        return "failed"
    _log(f"thaw: lock released after {seconds:.3f} s")
    remove_holder_files(run_dir)  # before the answer: once thaw hears it, no holder seems to run
    reply(conn, f"released {seconds:.3f}")
    return "thawed"


def _wait_for_thaw(held: _HeldLock, listener: socket.socket, settings: HolderSettings) -> Ending:
    """Serve the socket until a thaw, the safety timeout or SIGTERM."""
    try:
        while True:
            remaining = held.locked_at + settings.safety_timeout - time.monotonic()
            if remaining <= 0:
                return "expired"
            readable, _, _ = select.select([listener], [], [], remaining)
            if not readable:
                continue
            conn, _ = listener.accept()
            with conn:
                ending = _answer(held, conn, settings.run_dir)
            if ending is not None:
                return ending
    except _Terminated:
        return "terminated"


def _end_early(held: _HeldLock, ending: Ending, settings: HolderSettings) -> None:
    """The lock ends without a thaw: say why in the log and in ``outcome`` (for the next thaw), and unlock."""
    if ending == "expired":
        message = (
            f"no thaw came within the safety timeout of {settings.safety_timeout:g} s; the database lock was "
            "released then, so a snapshot taken after that may not be consistent"
        )
    else:
        message = (
            f"the lock holder was stopped (SIGTERM) after {held.seconds():.3f} s, before thaw; the database "
            "lock was released then, so a snapshot taken after that may not be consistent"
        )
    _log(message)
    with contextlib.suppress(DbLockError):
        unlock(held.connection)
    write_private(settings.run_dir / OUTCOME_NAME, message + "\n")


def serve(settings: HolderSettings, listener: socket.socket, report: int, options: ConnectionOptions) -> int:
    """The holder's life: lock, report to ``freeze`` on ``report``, wait for thaw or the safety timeout,
    unlock. Returns the holder's exit status (0: a thaw released the lock)."""
    run_dir = settings.run_dir
    write_private(run_dir / PID_NAME, f"{os.getpid()}\n")
    try:
        connection, connection_id = open_locked_session(options, settings)
    except DbLockError as err:
        _log(f"freeze failed: {err}")
        # gone before freeze hears of it, so nothing looks like a live holder once freeze has failed
        remove_holder_files(run_dir)
        os.write(report, f"{error_line(err)}\n".encode())
        return 1
    held = _HeldLock(connection, connection_id, time.monotonic())
    _log(f"global read lock held by connection {connection_id} on {options.where}")
    try:
        os.write(report, f"locked {connection_id}\n".encode())
    except BrokenPipeError:
        # freeze gave up (or was killed, e.g. by the hook runner's timeout): nobody will ever thaw us
        _log("freeze is gone before it heard that the lock is held; releasing the lock")
        with contextlib.suppress(DbLockError):
            unlock(connection)
        return 1
    os.close(report)
    ending = _wait_for_thaw(held, listener, settings)
    if ending in ("thawed", "failed"):
        return 0 if ending == "thawed" else 1
    _end_early(held, ending, settings)
    return 1


def _detach(settings: HolderSettings, listener: socket.socket, report: int) -> None:
    """Become a session leader with our own signal handling, stdio on the log, and no other descriptors."""
    os.setsid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log_fd = os.open(settings.run_dir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    # whoever ran freeze may wait for EOF on a pipe we inherited (a hook runner capturing output)
    keep = {listener.fileno(), report}
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2 and int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))


def become_holder(
    settings: HolderSettings, listener: socket.socket, report: int, options: ConnectionOptions
) -> None:
    """In the forked holder: detach, serve, and never return into the caller's code."""
    code = 1
    try:
        _detach(settings, listener, report)
        code = serve(settings, listener, report, options)
    except BaseException as err:  # the holder must never unwind into the code that forked it
        with contextlib.suppress(Exception):
            _log(f"holder failed: {err!r}")
    finally:
        with contextlib.suppress(Exception):
            listener.close()
        # a thaw removed these itself; after a failure they must not look like a live holder
        if code != 0:
            remove_holder_files(settings.run_dir)
        os._exit(code)
