"""How ``freeze``/``thaw``/``status`` and the holder find and talk to each other: the run directory and lines.

Run directory (mode 0700, this user's): ``holder.sock`` (0600), ``holder.pid``, ``holder.log``, and
``outcome`` when the holder ended without a thaw. One line per request (``thaw`` or ``status``), one line
back: ``released SECONDS``, ``locked SECONDS PID CONNECTION-ID``, or ``error MESSAGE`` with the hint after a
NUL byte. The holder's first report to ``freeze`` (on a pipe) is ``locked CONNECTION-ID`` or an error line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from vmsnap.guest.dblock.config import DbLockError

SOCKET_NAME = "holder.sock"
PID_NAME = "holder.pid"
LOG_NAME = "holder.log"
OUTCOME_NAME = "outcome"

_ERROR = "error "


# -- the run directory ------------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, *, create: bool) -> bool:
    """Make sure ``run_dir`` is ours and private; False when it does not exist and ``create`` is off.

    :raise DbLockError: it is not a directory, or not private to this user
    """
    if create:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir(mode=0o700)
    try:
        info = os.lstat(run_dir)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise DbLockError(f"run directory {run_dir} is not a directory", hint=f"remove {run_dir}")
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise DbLockError(
            f"run directory {run_dir} is not private to uid {os.geteuid()} "
            f"(owner {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"remove it, or chown {os.geteuid()} {run_dir} && chmod 700 {run_dir}",
        )
    return True


def remove(path: Path) -> None:
    """Remove ``path``; one that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_holder_files(run_dir: Path) -> None:
    """Remove the socket and pid file, so that nothing looks like a live holder any more."""
    remove(run_dir / SOCKET_NAME)
    remove(run_dir / PID_NAME)


def read_pid(run_dir: Path) -> int | None:
    """The holder's pid from its pid file, or None."""
    try:
        return int((run_dir / PID_NAME).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, created 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# -- the lines --------------------------------------------------------------------------------------


def error_line(err: DbLockError) -> str:
    """``err`` as an answer line (without its newline)."""
    return f"{_ERROR}{err.message}\x00{err.hint}"


def raise_error_line(answer: str) -> None:
    """Raise the :class:`DbLockError` that an ``error`` answer carries; any other answer passes.

    :raise DbLockError: ``answer`` is an error line
    """
    if answer.startswith(_ERROR):
        message, _, hint = answer[len(_ERROR) :].partition("\x00")
        raise DbLockError(message, hint=hint or None)


def ask(run_dir: Path, request: str, timeout: float) -> str:
    """Send one request line to the holder and return its one-line answer.

    :raise FileNotFoundError: no holder socket
    :raise ConnectionRefusedError: a socket file with no holder behind it
    :raise DbLockError: the holder did not answer within ``timeout``
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(run_dir / SOCKET_NAME))
        client.sendall(request.encode() + b"\n")
        answer = b""
        try:
            while not answer.endswith(b"\n"):
                chunk = client.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            raise DbLockError(
                f"the lock holder did not answer {request!r} within {timeout:g} s",
                hint=f"see {run_dir / LOG_NAME}",
            ) from None
    return answer.decode(errors="replace").strip()


def read_request(conn: socket.socket) -> str:
    """One request line from a client of the holder ("" when it sent none within 5 s)."""
    conn.settimeout(5)
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(b"\n") and len(data) < 256:
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def reply(conn: socket.socket, line: str) -> None:
    """Answer a client with one line; a client that is gone is no error."""
    with contextlib.suppress(OSError):
        conn.sendall(line.encode() + b"\n")
