"""vmsnap-dblock: hold a MariaDB/MySQL global read lock from fsfreeze to thaw, inside the guest.

``freeze`` starts a holder process that runs ``FLUSH TABLES WITH READ LOCK`` and keeps its session open
until ``thaw`` asks it over a unix socket to ``UNLOCK TABLES``; the lock dies with the holder or a timeout.

Why a holder: the classic fsfreeze hook runs ``mysql -e "FLUSH TABLES WITH READ LOCK"``, and the server drops
that lock the moment the client exits, before the snapshot is taken. Here the session that owns the lock lives
from freeze to thaw:

* credentials come from a MySQL option file (``[client]``, then ``[vmsnap-dblock]``) that only its owner may
  read — never from argv or the environment;
* ``freeze`` returns only once the lock is held; the server gives up waiting after ``lock-wait`` seconds
  (``lock_wait_timeout``), and a failure leaves nothing locked;
* the holder releases the lock by itself after ``safety-timeout`` seconds if thaw never comes, and the server
  drops the session (and its lock) if the holder dies; ``thaw`` reports either case as a failure, because a
  snapshot taken after that moment may not be consistent.

Run directory (default ``/run/vmsnap-dblock``, mode 0700): ``holder.sock`` (0600), ``holder.pid``,
``holder.log``, and ``outcome`` when the holder ended without a thaw. Protocol: one line per request
(``thaw`` or ``status``), one line back (``released SECONDS``, ``locked SECONDS PID CONNECTION-ID``,
``error MESSAGE``, the hint after a NUL byte).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import math
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from vmsnap.errors import UsageError, VmsnapError

DEFAULT_OPTION_FILE = Path("/etc/vmsnap/dblock.cnf")
DEFAULT_RUN_DIR = Path("/run/vmsnap-dblock")
DEFAULT_SERVER_SOCKET = "/run/mysqld/mysqld.sock"
DEFAULT_SAFETY_TIMEOUT = 60.0
DEFAULT_LOCK_WAIT = 10.0
CONNECT_TIMEOUT = 10.0
OPTION_GROUP = "vmsnap-dblock"

SOCKET_NAME = "holder.sock"
PID_NAME = "holder.pid"
LOG_NAME = "holder.log"
OUTCOME_NAME = "outcome"

# MySQL/MariaDB error codes the messages explain
_ER_ACCESS_DENIED = 1045
_ER_SPECIFIC_ACCESS_DENIED = 1227
_ER_LOCK_WAIT_TIMEOUT = 1205
_CR_CONNECTION_ERRORS = (2002, 2003, 2006, 2013)


class DbLockError(VmsnapError):
    """The database read lock could not be taken, held, or released; the message says which and why."""

    default_hint = "see holder.log in the run directory (default /run/vmsnap-dblock)"


# -- settings ---------------------------------------------------------------------------------------


@attrs.frozen
class ConnectionOptions:
    """How to reach the database server, as read from the option file.

    :param user: account name (default: the server decides, as the mysql client does)
    :param password: its password (never shown in ``repr``)
    :param socket: unix socket path; used when set, or when no ``host`` is given
    :param host: TCP host, when no socket is given
    :param port: TCP port
    """

    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    socket: str | None = None
    host: str | None = None
    port: int = 3306

    @property
    def where(self) -> str:
        """The server's address, for messages."""
        if self.socket or not self.host:
            return self.socket or DEFAULT_SERVER_SOCKET
        return f"{self.host}:{self.port}"


@attrs.frozen
class HolderSettings:
    """Everything ``freeze`` needs.

    :param option_file: MySQL option file with the credentials; must be readable by its owner only
    :param run_dir: directory for the holder's socket, pid file and log (created 0700)
    :param safety_timeout: seconds after which the holder releases the lock if no thaw came
    :param lock_wait: seconds the server may wait for the lock (long queries, LOCK TABLES) before giving up
    """

    option_file: Path = DEFAULT_OPTION_FILE
    run_dir: Path = DEFAULT_RUN_DIR
    safety_timeout: float = attrs.field(default=DEFAULT_SAFETY_TIMEOUT)
    lock_wait: float = attrs.field(default=DEFAULT_LOCK_WAIT)

    @safety_timeout.validator
    def _check_safety_timeout(self, attribute: Any, value: float) -> None:
        if not 0 < value <= 86400:
            raise UsageError(f"safety timeout {value:g} s is out of range", hint="give 0 < seconds <= 86400")

    @lock_wait.validator
    def _check_lock_wait(self, attribute: Any, value: float) -> None:
        if not 1 <= value <= 3600:
            raise UsageError(f"lock wait {value:g} s is out of range", hint="give between 1 and 3600 seconds")

    @property
    def connect_budget(self) -> float:
        """How long ``freeze`` waits for the holder: connecting, the server's own lock wait, slack."""
        return CONNECT_TIMEOUT + self.lock_wait + 10


@attrs.frozen
class OptionFile:
    """An option file's content: the connection, and holder settings from ``[vmsnap-dblock]`` (or None)."""

    connection: ConnectionOptions
    safety_timeout: float | None = None
    lock_wait: float | None = None


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _number(path: Path, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DbLockError(
            f"{path}: {key}={value!r} is not a number", hint=f"write {key} in seconds, e.g. {key}=60"
        ) from None
    if not math.isfinite(number):
        raise DbLockError(f"{path}: {key}={value!r} is not a finite number", hint=f"e.g. {key}=60")
    return number


def read_option_file(path: Path) -> OptionFile:
    """Read credentials and settings from a MySQL option file that only its owner can read.

    Reads ``[client]``, then ``[vmsnap-dblock]`` (which overrides it): ``user``, ``password``, ``socket``,
    ``host``, ``port``; and from ``[vmsnap-dblock]`` only ``safety-timeout`` and ``lock-wait``. Debian's
    ``/etc/mysql/debian.cnf`` works as is.

    :param path: the option file
    :raise DbLockError: missing, not a regular file, readable or writable by group or others, owned by another
        user, or not in option-file syntax
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DbLockError(
            f"option file {path} does not exist",
            hint=f"create it with [client] user= and password= (or socket=), then chmod 600 {path}",
        ) from None
    except OSError as err:
        raise DbLockError(f"cannot open option file {path}: {err.strerror}", hint="run as root") from err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DbLockError(f"option file {path} is not a regular file", hint="point --config at a file")
    with os.fdopen(fd, encoding="utf-8") as handle:
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise DbLockError(
                f"option file {path} is accessible to group or others (mode {mode:04o}); refusing to use "
                "credentials others can read",
                hint=f"chmod 600 {path}",
            )
        if info.st_uid != os.geteuid():
            raise DbLockError(
                f"option file {path} belongs to uid {info.st_uid}, not to uid {os.geteuid()} who runs this",
                hint=f"chown {os.geteuid()} {path}",
            )
        try:
            text = handle.read()
        except UnicodeDecodeError as err:
            raise DbLockError(f"option file {path} is not UTF-8 text", hint="rewrite it as text") from err
    parser = configparser.RawConfigParser(
        allow_no_value=True, strict=False, delimiters=("=",), comment_prefixes=("#", ";"), interpolation=None
    )
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as err:
        first = str(err).splitlines()[0]
        raise DbLockError(
            f"option file {path} is not in option-file syntax: {first}",
            hint="write [client] then key=value lines",
        ) from err
    values: dict[str, str] = {}
    for group in ("client", OPTION_GROUP):
        if parser.has_section(group):
            for key, value in parser.items(group):
                if value is not None:
                    values[key.replace("_", "-")] = _unquote(value)
    own: dict[str, str] = {}
    if parser.has_section(OPTION_GROUP):
        own = {k.replace("_", "-"): _unquote(v) for k, v in parser.items(OPTION_GROUP) if v is not None}
    port = values.get("port", "3306")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DbLockError(f"{path}: port={port!r} is not a TCP port", hint="e.g. port=3306")
    connection = ConnectionOptions(
        user=values.get("user"),
        password=values.get("password"),
        socket=values.get("socket"),
        host=values.get("host"),
        port=int(port),
    )
    return OptionFile(
        connection=connection,
        safety_timeout=_number(path, "safety-timeout", own["safety-timeout"])
        if "safety-timeout" in own
        else None,
        lock_wait=_number(path, "lock-wait", own["lock-wait"]) if "lock-wait" in own else None,
    )


# -- the run directory ------------------------------------------------------------------------------


def _prepare_run_dir(run_dir: Path, *, create: bool) -> bool:
    """Make sure ``run_dir`` is ours and private; False when it does not exist and ``create`` is off."""
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


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID_NAME).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _ask(run_dir: Path, request: str, timeout: float) -> str:
    """Send one request line to the holder and return its one-line answer.

    :raise FileNotFoundError: no holder socket
    :raise ConnectionRefusedError: a socket file with no holder behind it
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


# -- talking to the database ------------------------------------------------------------------------


def _explain(err: Exception, options: ConnectionOptions, option_file: Path, lock_wait: float) -> DbLockError:
    """A one-line DbLockError for a PyMySQL error."""
    code = err.args[0] if err.args and isinstance(err.args[0], int) else None
    text = str(err.args[1]) if len(err.args) > 1 else str(err)
    user = options.user or "(default user)"
    if code == _ER_ACCESS_DENIED:
        return DbLockError(
            f"the database server at {options.where} refused user {user}: {text}",
            hint=f"check user= and password= in {option_file}",
        )
    if code == _ER_SPECIFIC_ACCESS_DENIED:
        return DbLockError(
            f"user {user} may not run FLUSH TABLES WITH READ LOCK: {text}",
            hint=f"GRANT RELOAD ON *.* TO the account in {option_file}",
        )
    if code == _ER_LOCK_WAIT_TIMEOUT:
        return DbLockError(
            f"the database did not grant the global read lock within {lock_wait:g} s "
            "(a long query or LOCK TABLES holds a table); nothing is locked",
            hint="retry when the long query has ended, or raise lock-wait",
        )
    if code in _CR_CONNECTION_ERRORS:
        return DbLockError(
            f"cannot reach the database server at {options.where}: {text}",
            hint=f"check that mariadbd/mysqld runs and that socket= (or host=) in {option_file} is right",
        )
    return DbLockError(f"database error at {options.where}: {text}", hint=f"check {option_file}")


def _connect(options: ConnectionOptions, option_file: Path, lock_wait: float, safety_timeout: float) -> Any:
    """Open the session that will hold the lock.

    :raise DbLockError: PyMySQL missing, or the server unreachable or refusing the account
    """
    try:
        import pymysql
    except ImportError as err:
        raise DbLockError(
            "the PyMySQL driver is not installed", hint="pip install 'vmsnap[guest]' (or python3-pymysql)"
        ) from err
    address: dict[str, Any] = {}
    if options.socket or not options.host:
        address["unix_socket"] = options.socket or DEFAULT_SERVER_SOCKET
    else:
        address["host"] = options.host
        address["port"] = options.port
    kwargs: dict[str, Any] = {"user": options.user or ""}
    if options.password is not None:
        kwargs["password"] = options.password
    try:
        connection = pymysql.connect(
            **address,
            **kwargs,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=lock_wait + 10,
            write_timeout=lock_wait + 10,
            autocommit=True,
        )
        with connection.cursor() as cursor:
            # the server, not only this process, bounds both the wait for the lock and an idle session
            cursor.execute("SET SESSION lock_wait_timeout = %s", (max(1, math.ceil(lock_wait)),))
            cursor.execute("SET SESSION wait_timeout = %s", (math.ceil(safety_timeout) + 30,))
    except pymysql.MySQLError as err:
        raise _explain(err, options, option_file, lock_wait) from err
    return connection


def _lock(connection: Any, options: ConnectionOptions, option_file: Path, lock_wait: float) -> int:
    """Take the global read lock on ``connection``; returns the session's connection id once it is held."""
    import pymysql

    try:
        with connection.cursor() as cursor:
            cursor.execute("FLUSH TABLES WITH READ LOCK")
            # the statement returned, so the lock is ours; a round trip proves the session still holds it
            cursor.execute("SELECT CONNECTION_ID()")
            row = cursor.fetchone()
    except pymysql.MySQLError as err:
        raise _explain(err, options, option_file, lock_wait) from err
    return int(row[0])


def _unlock(connection: Any) -> None:
    """Release the lock and close the session.

    :raise DbLockError: the session was already gone, so the lock had been released earlier
    """
    import pymysql

    try:
        with connection.cursor() as cursor:
            cursor.execute("UNLOCK TABLES")
    except pymysql.MySQLError as err:
        raise DbLockError(
            f"the database session holding the lock was lost before thaw ({err}); the lock ended early, "
            "so the snapshot may not be consistent",
            hint="see the database server's error log; take the backup again",
        ) from err
    finally:
        with contextlib.suppress(Exception):
            connection.close()


# -- the holder process -----------------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM reached the holder."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} vmsnap-dblock[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _read_request(conn: socket.socket) -> str:
    conn.settimeout(5)
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(b"\n") and len(data) < 256:
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def _reply(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(line.encode() + b"\n")


def _serve(
    settings: HolderSettings,
    listener: socket.socket,
    report: int,
    options: ConnectionOptions,
) -> int:
    """The holder's life: lock, report to ``freeze``, wait for thaw or the safety timeout, unlock."""
    run_dir = settings.run_dir
    _write_private(run_dir / PID_NAME, f"{os.getpid()}\n")
    try:
        connection = _connect(options, settings.option_file, settings.lock_wait, settings.safety_timeout)
        try:
            connection_id = _lock(connection, options, settings.option_file, settings.lock_wait)
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
    except DbLockError as err:
        _log(f"freeze failed: {err}")
        # gone before freeze hears of it, so nothing looks like a live holder once freeze has failed
        _remove(run_dir / SOCKET_NAME)
        _remove(run_dir / PID_NAME)
        os.write(report, f"error {err.message}\x00{err.hint}\n".encode())
        return 1
    locked_at = time.monotonic()
    _log(f"global read lock held by connection {connection_id} on {options.where}")
    try:
        os.write(report, f"locked {connection_id}\n".encode())
    except BrokenPipeError:
        # freeze gave up (or was killed, e.g. by the hook runner's timeout): nobody will ever thaw us
        _log("freeze is gone before it heard that the lock is held; releasing the lock")
        with contextlib.suppress(DbLockError):
            _unlock(connection)
        return 1
    os.close(report)

    outcome = "released"
    try:
        while True:
            remaining = locked_at + settings.safety_timeout - time.monotonic()
            if remaining <= 0:
                outcome = "expired"
                break
            readable, _, _ = select.select([listener], [], [], remaining)
            if not readable:
                continue
            conn, _ = listener.accept()
            with conn:
                request = _read_request(conn)
                held = time.monotonic() - locked_at
                if request == "status":
                    _reply(conn, f"locked {held:.3f} {os.getpid()} {connection_id}")
                    continue
                if request != "thaw":
                    _reply(conn, f"error unknown request {request[:40]!r}; send thaw or status")
                    continue
                try:
                    _unlock(connection)
                except DbLockError as err:
                    _log(str(err))
                    _reply(conn, f"error {err.message}\x00{err.hint}")
                    return 1
                _log(f"thaw: lock released after {held:.3f} s")
                _remove(run_dir / SOCKET_NAME)
                _remove(run_dir / PID_NAME)
                _reply(conn, f"released {held:.3f}")
                return 0
    except _Terminated:
        outcome = "terminated"
    held = time.monotonic() - locked_at
    if outcome == "expired":
        message = (
            f"no thaw came within the safety timeout of {settings.safety_timeout:g} s; the database lock was "
            "released then, so a snapshot taken after that may not be consistent"
        )
    else:
        message = (
            f"the lock holder was stopped (SIGTERM) after {held:.3f} s, before thaw; the database lock was "
            "released then, so a snapshot taken after that may not be consistent"
        )
    _log(message)
    with contextlib.suppress(DbLockError):
        _unlock(connection)
    _write_private(run_dir / OUTCOME_NAME, message + "\n")
    return 1


def _become_holder(
    settings: HolderSettings, listener: socket.socket, report: int, options: ConnectionOptions
) -> None:
    """In the forked holder: detach, serve, and never return into the caller's code."""
    code = 1
    try:
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
        code = _serve(settings, listener, report, options)
    except BaseException as err:  # the holder must never unwind into the code that forked it
        with contextlib.suppress(Exception):
            _log(f"holder failed: {err!r}")
    finally:
        with contextlib.suppress(Exception):
            listener.close()
        # a thaw removed these itself; after a failure they must not look like a live holder
        if code != 0:
            _remove(settings.run_dir / SOCKET_NAME)
            _remove(settings.run_dir / PID_NAME)
        os._exit(code)


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


def _clear_stale(run_dir: Path) -> None:
    """Remove what a dead holder left: refuse when a live one answers."""
    try:
        answer = _ask(run_dir, "status", timeout=5)
    except (FileNotFoundError, ConnectionRefusedError):
        _remove(run_dir / SOCKET_NAME)
        _remove(run_dir / PID_NAME)
        _remove(run_dir / OUTCOME_NAME)
        return
    raise DbLockError(
        f"a lock holder already runs in {run_dir} ({answer})",
        hint="run 'vmsnap-dblock thaw' first (a freeze is already in place)",
    )


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
    _prepare_run_dir(settings.run_dir, create=True)
    _clear_stale(settings.run_dir)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_path = settings.run_dir / SOCKET_NAME
    try:
        listener.bind(str(socket_path))
        os.chmod(socket_path, 0o600)
        listener.listen(4)
    except OSError as err:
        listener.close()
        raise DbLockError(
            f"cannot listen on {socket_path}: {err.strerror}", hint="check the run directory"
        ) from err
    read_end, write_end = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            os.close(read_end)
            if os.fork() == 0:
                _become_holder(settings, listener, write_end, options.connection)
            os._exit(0)
        os.waitpid(child, 0)
        os.close(write_end)
        write_end = -1
        answer = _await_report(read_end, settings.connect_budget)
    finally:
        listener.close()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    pid = _read_pid(settings.run_dir)
    if answer is not None and answer.startswith("locked ") and pid is not None:
        return HolderInfo(pid=pid, connection_id=int(answer.split()[1]), socket=socket_path)
    if answer is not None and answer.startswith("error "):
        # the holder closed its session and is exiting; it removes its own files
        message, _, hint = answer[len("error ") :].partition("\x00")
        raise DbLockError(message, hint=hint or None)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the server drops its session, and with it any lock
    _remove(socket_path)
    _remove(settings.run_dir / PID_NAME)
    if answer is None:
        raise DbLockError(
            f"the lock holder gave no answer within {settings.connect_budget:g} s; it was killed and nothing "
            "is locked",
            hint=f"see {settings.run_dir / LOG_NAME}",
        )
    if not answer:
        raise DbLockError(
            "the lock holder ended before it held the lock; nothing is locked",
            hint=f"see {settings.run_dir / LOG_NAME}",
        )
    raise DbLockError(f"the lock holder answered {answer!r}", hint=f"see {settings.run_dir / LOG_NAME}")


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


@attrs.frozen
class ThawResult:
    """What ``thaw`` did.

    :param released: a holder released its lock (False: there was nothing to thaw)
    :param held_seconds: how long the lock was held
    """

    released: bool
    held_seconds: float = 0.0


def thaw(run_dir: Path = DEFAULT_RUN_DIR, *, timeout: float = 30.0) -> ThawResult:
    """Ask the holder to release the lock and exit.

    :param run_dir: the holder's run directory
    :param timeout: seconds to wait for its answer
    :raise DbLockError: the lock had ended before thaw (holder died, safety timeout, session lost), so a
        snapshot taken in the meantime may not be consistent; or the holder did not answer
    """
    if not _prepare_run_dir(run_dir, create=False):
        return ThawResult(released=False)
    try:
        answer = _ask(run_dir, "thaw", timeout)
    except FileNotFoundError:
        outcome = run_dir / OUTCOME_NAME
        try:
            message = outcome.read_text().strip()
        except FileNotFoundError:
            return ThawResult(released=False)
        _remove(outcome)
        raise DbLockError(
            message, hint="take the backup again; raise safety-timeout if freezes run long"
        ) from None
    except ConnectionRefusedError:
        pid = _read_pid(run_dir)
        _remove(run_dir / SOCKET_NAME)
        _remove(run_dir / PID_NAME)
        who = f"the lock holder (pid {pid})" if pid else "the lock holder"
        raise DbLockError(
            f"{who} died before thaw; the database server released its lock at that moment, so a snapshot "
            "taken after that may not be consistent",
            hint="take the backup again",
        ) from None
    if answer.startswith("released "):
        return ThawResult(released=True, held_seconds=float(answer.split()[1]))
    if answer.startswith("error "):
        message, _, hint = answer[len("error ") :].partition("\x00")
        raise DbLockError(message, hint=hint or None)
    raise DbLockError(f"the lock holder answered {answer!r} to thaw", hint=f"see {run_dir / LOG_NAME}")


@attrs.frozen
class HolderStatus:
    """A live holder, as it describes itself."""

    held_seconds: float
    pid: int
    connection_id: int


def status(run_dir: Path = DEFAULT_RUN_DIR) -> HolderStatus | None:
    """The live holder in ``run_dir``, or None when no holder runs.

    :raise DbLockError: the run directory is not private
    """
    if not _prepare_run_dir(run_dir, create=False):
        return None
    try:
        answer = _ask(run_dir, "status", timeout=5)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    parts = answer.split()
    if len(parts) != 4 or parts[0] != "locked":
        raise DbLockError(f"the lock holder answered {answer!r} to status", hint=f"see {run_dir / LOG_NAME}")
    return HolderStatus(held_seconds=float(parts[1]), pid=int(parts[2]), connection_id=int(parts[3]))


# -- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``vmsnap-dblock``."""
    parser = argparse.ArgumentParser(
        prog="vmsnap-dblock",
        description="Hold a MariaDB/MySQL global read lock from fsfreeze to thaw (run by the fsfreeze hook).",
        epilog="example:\n  vmsnap-dblock freeze --config /etc/vmsnap/dblock.cnf\n  vmsnap-dblock thaw",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help in (
        ("freeze", "take the lock; returns once it is held"),
        ("thaw", "release the lock; fails if it had ended early"),
        ("status", "say whether a holder holds the lock"),
    ):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--run-dir",
            type=Path,
            default=DEFAULT_RUN_DIR,
            help=f"the holder's socket directory (default {DEFAULT_RUN_DIR})",
        )
        if name == "freeze":
            p.add_argument(
                "--config",
                type=Path,
                default=DEFAULT_OPTION_FILE,
                help=f"MySQL option file with the credentials, mode 0600 (default {DEFAULT_OPTION_FILE})",
            )
            p.add_argument(
                "--safety-timeout",
                type=float,
                help="release the lock after this many seconds without thaw "
                f"(default {DEFAULT_SAFETY_TIMEOUT:g})",
            )
            p.add_argument(
                "--lock-wait",
                type=float,
                help=f"seconds the server may wait for the lock (default {DEFAULT_LOCK_WAIT:g})",
            )
    return parser


def _settings(args: argparse.Namespace) -> tuple[HolderSettings, OptionFile]:
    options = read_option_file(args.config)
    safety = args.safety_timeout if args.safety_timeout is not None else options.safety_timeout
    wait = args.lock_wait if args.lock_wait is not None else options.lock_wait
    settings = HolderSettings(
        option_file=args.config,
        run_dir=args.run_dir,
        safety_timeout=DEFAULT_SAFETY_TIMEOUT if safety is None else safety,
        lock_wait=DEFAULT_LOCK_WAIT if wait is None else wait,
    )
    return settings, options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsnap-dblock`` console script: 0 success, 1 failure, 2 usage error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        if args.action == "freeze":
            settings, options = _settings(args)
            info = freeze(settings, options)
            print(
                f"vmsnap-dblock: global read lock held (holder pid {info.pid}, "
                f"connection {info.connection_id}); released on thaw or after {settings.safety_timeout:g} s"
            )
        elif args.action == "thaw":
            result = thaw(args.run_dir)
            if result.released:
                print(f"vmsnap-dblock: lock released after {result.held_seconds:.3f} s")
            else:
                print("vmsnap-dblock: nothing to thaw")
        else:
            current = status(args.run_dir)
            if current is None:
                print("vmsnap-dblock: not locked")
            else:
                print(
                    f"vmsnap-dblock: locked for {current.held_seconds:.3f} s by pid {current.pid} "
                    f"(connection {current.connection_id})"
                )
    except VmsnapError as err:
        print(f"vmsnap-dblock: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
