"""The database session that holds the lock: connect, ``FLUSH TABLES WITH READ LOCK``, ``UNLOCK TABLES``.

PyMySQL is imported only here, and only when a session is opened (``pip install 'vmsnap[guest]'``). Server
errors become one-line :class:`DbLockError` messages that say what to change.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from vmsnap.guest.dblock.config import (
    CONNECT_TIMEOUT,
    DEFAULT_SERVER_SOCKET,
    ConnectionOptions,
    DbLockError,
    HolderSettings,
)

# MySQL/MariaDB error codes the messages explain
_ER_ACCESS_DENIED = 1045
_ER_SPECIFIC_ACCESS_DENIED = 1227
_ER_LOCK_WAIT_TIMEOUT = 1205
_CR_CONNECTION_ERRORS = (2002, 2003, 2006, 2013)


def explain(err: Exception, options: ConnectionOptions, option_file: Path, lock_wait: float) -> DbLockError:
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


def _pymysql() -> Any:
    try:
        import pymysql
    except ImportError as err:
        raise DbLockError(
            "the PyMySQL driver is not installed", hint="pip install 'vmsnap[guest]' (or python3-pymysql)"
        ) from err
    return pymysql


def connect(options: ConnectionOptions, settings: HolderSettings) -> Any:
    """Open the session that will hold the lock.

    :raise DbLockError: PyMySQL missing, or the server unreachable or refusing the account
    """
    pymysql = _pymysql()
    address: dict[str, Any] = {}
    if options.uses_socket:
        address["unix_socket"] = options.socket or DEFAULT_SERVER_SOCKET
    else:
        address["host"] = options.host
        address["port"] = options.port
    kwargs: dict[str, Any] = {"user": options.user or ""}
    if options.password is not None:
        kwargs["password"] = options.password
    lock_wait = settings.lock_wait
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
            cursor.execute("SET SESSION wait_timeout = %s", (math.ceil(settings.safety_timeout) + 30,))
    except pymysql.MySQLError as err:
        raise explain(err, options, settings.option_file, lock_wait) from err
    return connection


def lock(connection: Any, options: ConnectionOptions, settings: HolderSettings) -> int:
    """Take the global read lock on ``connection``; returns the session's connection id once it is held.

    :raise DbLockError: the server refused the lock or did not grant it within ``lock_wait``
    """
    pymysql = _pymysql()
    try:
        with connection.cursor() as cursor:
            cursor.execute("FLUSH TABLES WITH READ LOCK")
            # the statement returned, so the lock is ours; a round trip proves the session still holds it
            cursor.execute("SELECT CONNECTION_ID()")
            row = cursor.fetchone()
    except pymysql.MySQLError as err:
        raise explain(err, options, settings.option_file, settings.lock_wait) from err
    return int(row[0])


def open_locked_session(options: ConnectionOptions, settings: HolderSettings) -> tuple[Any, int]:
    """Connect and take the lock: (session, connection id). On failure no session stays open.

    :raise DbLockError: see :func:`connect` and :func:`lock`
    """
    connection = connect(options, settings)
    try:
        return connection, lock(connection, options, settings)
    except BaseException:
        with contextlib.suppress(Exception):
            connection.close()
        raise


def unlock(connection: Any) -> None:
    """Release the lock and close the session.

    :raise DbLockError: the session was already gone, so the lock had been released earlier
    """
    pymysql = _pymysql()
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
