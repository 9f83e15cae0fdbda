"""``freeze``, ``thaw`` and ``status``: start a holder and wait until it holds the lock, then talk to it.

``freeze`` forks the holder (a detached grandchild, see :mod:`vmsnap.guest.dblock.holder`) and returns once it
reports the lock held; on any failure nothing stays locked and no holder stays behind. ``thaw`` and
``status`` reach the holder over its socket (see :mod:`vmsnap.guest.dblock.protocol`).
"""

from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

import attrs

from vmsnap import processes
from vmsnap.guest.dblock.config import DEFAULT_RUN_DIR, DbLockError, HolderSettings
from vmsnap.guest.dblock.holder import become_holder
from vmsnap.guest.dblock.option_file import OptionFile, read_option_file
from vmsnap.guest.dblock.protocol import (
    LOG_NAME,
    OUTCOME_NAME,
    SOCKET_NAME,
    ask,
    prepare_run_dir,
    raise_error_line,
    read_pid,
    remove,
    remove_holder_files,
)


@attrs.frozen
class HolderInfo:
    """A holder that holds the lock.

    :param pid: the holder process
    :param connection_id: its database session (``SHOW PROCESSLIST`` shows it)
    :param socket: where ``thaw`` reaches it
    """

    pid: int
    connection_id: int
    socket: Path


@attrs.frozen
class ThawResult:
    """What ``thaw`` did.

    :param released: a holder released its lock (False: there was nothing to thaw)
    :param held_seconds: how long the lock was held
    """

    released: bool
    held_seconds: float = 0.0


@attrs.frozen
class HolderStatus:
    """A live holder, as it describes itself."""

    held_seconds: float
    pid: int
    connection_id: int


def _clear_stale(run_dir: Path) -> None:
    """Remove what a dead holder left: refuse when a live one answers."""
    try:
        answer = ask(run_dir, "status", timeout=5)
    except (FileNotFoundError, ConnectionRefusedError):
        remove_holder_files(run_dir)
        remove(run_dir / OUTCOME_NAME)
        return
    raise DbLockError(
        f"a lock holder already runs in {run_dir} ({answer})",
        hint="run 'vmsnap-dblock thaw' first (a freeze is already in place)",
    )


def _listen(socket_path: Path) -> socket.socket:
    """The holder's listening socket (0600), made here so that it exists before ``freeze`` returns.

    :raise DbLockError: it cannot be made
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(socket_path))
        os.chmod(socket_path, 0o600)
        listener.listen(4)
    except OSError as err:
        listener.close()
        raise DbLockError(
            f"cannot listen on {socket_path}: {err.strerror}", hint="check the run directory"
        ) from err
    return listener


def _start_holder(settings: HolderSettings, options: OptionFile, listener: socket.socket) -> str | None:
    """Fork the holder (twice, so that it is nobody's child here) and return its one-line report.

    :return: see :func:`_await_report`
    """
    read_end, write_end = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            os.close(read_end)
            if os.fork() == 0:
                become_holder(settings, listener, write_end, options.connection)
            os._exit(0)
        os.waitpid(child, 0)
        os.close(write_end)
        write_end = -1
        return _await_report(read_end, settings.connect_budget)
    finally:
        listener.close()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def freeze(settings: HolderSettings, options: OptionFile | None = None) -> HolderInfo:
    """Start a holder process and return once it holds the global read lock.

    The holder is a detached grandchild of this process (it forks), so this is meant for the command line and
    hook scripts. On failure nothing stays locked and no holder stays behind.

    :param settings: option file, run directory, safety timeout and lock wait
    :param options: the option file already read (read from ``settings.option_file`` when None)
    :raise DbLockError: the option file is unsafe or wrong, the server is unreachable or refuses the account,
        the lock was not granted within ``lock_wait``, or another holder already runs
    """
    if options is None:
        options = read_option_file(settings.option_file)
    run_dir = settings.run_dir
    prepare_run_dir(run_dir, create=True)
    _clear_stale(run_dir)
    socket_path = run_dir / SOCKET_NAME
    answer = _start_holder(settings, options, _listen(socket_path))
    pid = read_pid(run_dir)
    if answer is not None and answer.startswith("locked ") and pid is not None:
        return HolderInfo(pid=pid, connection_id=int(answer.split()[1]), socket=socket_path)
    if answer is not None:
        # the holder closed its session and is exiting; it removes its own files
        raise_error_line(answer)
    if pid is not None:
        processes.terminate(pid, timeout=0)  # SIGKILL: the server drops its session, and with it any lock
    remove_holder_files(run_dir)
    log = run_dir / LOG_NAME
    if answer is None:
        raise DbLockError(
            f"the lock holder gave no answer within {settings.connect_budget:g} s; it was killed and nothing "
            "is locked",
            hint=f"see {log}",
        )
    if not answer:
        raise DbLockError(
            "the lock holder ended before it held the lock; nothing is locked", hint=f"see {log}"
        )
    raise DbLockError(f"the lock holder answered {answer!r}", hint=f"see {log}")


def _await_report(read_end: int, budget: float) -> str | None:
    """The holder's one-line report; "" when it ended without one, None when ``budget`` ran out."""
    deadline = time.monotonic() + budget
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([read_end], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def thaw(run_dir: Path = DEFAULT_RUN_DIR, *, timeout: float = 30.0) -> ThawResult:
    """Ask the holder to release the lock and exit.

    :param run_dir: the holder's run directory
    :param timeout: seconds to wait for its answer
    :raise DbLockError: the lock had ended before thaw (holder died, safety timeout, session lost), so a
        snapshot taken in the meantime may not be consistent; or the holder did not answer
    """
    if not prepare_run_dir(run_dir, create=False):
        return ThawResult(released=False)
    try:
        answer = ask(run_dir, "thaw", timeout)
    except FileNotFoundError:
        outcome = run_dir / OUTCOME_NAME
        try:
            message = outcome.read_text().strip()
        except FileNotFoundError:
            return ThawResult(released=False)
        remove(outcome)
        raise DbLockError(
            message, hint="take the backup again; raise safety-timeout if freezes run long"
        ) from None
    except ConnectionRefusedError:
        pid = read_pid(run_dir)
        remove_holder_files(run_dir)
        who = f"the lock holder (pid {pid})" if pid else "the lock holder"
        raise DbLockError(
            f"{who} died before thaw; the database server released its lock at that moment, so a snapshot "
            "taken after that may not be consistent",
            hint="take the backup again",
        ) from None
    if answer.startswith("released "):
        return ThawResult(released=True, held_seconds=float(answer.split()[1]))
    raise_error_line(answer)
    raise DbLockError(f"the lock holder answered {answer!r} to thaw", hint=f"see {run_dir / LOG_NAME}")


def status(run_dir: Path = DEFAULT_RUN_DIR) -> HolderStatus | None:
    """The live holder in ``run_dir``, or None when no holder runs.

    :raise DbLockError: the run directory is not private
    """
    if not prepare_run_dir(run_dir, create=False):
        return None
    try:
        answer = ask(run_dir, "status", timeout=5)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    parts = answer.split()
    if len(parts) != 4 or parts[0] != "locked":
        raise DbLockError(f"the lock holder answered {answer!r} to status", hint=f"see {run_dir / LOG_NAME}")
    return HolderStatus(held_seconds=float(parts[1]), pid=int(parts[2]), connection_id=int(parts[3]))
