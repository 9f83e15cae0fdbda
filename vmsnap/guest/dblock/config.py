"""vmsnap-dblock's settings and its error: where the server and the run directory are, and how long to wait.

Everything else in the package reads these; nothing here talks to the database or starts a process.
"""

from __future__ import annotations

from pathlib import Path
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


class DbLockError(VmsnapError):
    """The database read lock could not be taken, held, or released; the message says which and why."""

    default_hint = "see holder.log in the run directory (default /run/vmsnap-dblock)"


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
    def uses_socket(self) -> bool:
        """True when the server is reached on a unix socket (a socket is set, or no host is)."""
        return bool(self.socket) or not self.host

    @property
    def where(self) -> str:
        """The server's address, for messages."""
        if self.uses_socket:
            return self.socket or DEFAULT_SERVER_SOCKET
        return f"{self.host}:{self.port}"


@attrs.frozen
class HolderSettings:
    """Everything ``freeze`` needs.

    :param option_file: MySQL option file with the credentials; must be readable by its owner only
    :param run_dir: directory for the holder's socket, pid file and log (created 0700)
    :param safety_timeout: seconds after which the holder releases the lock if no thaw came
    :param lock_wait: seconds the server may wait for the lock (long queries, LOCK TABLES) before giving up
    :raise UsageError: a timeout out of its range
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
