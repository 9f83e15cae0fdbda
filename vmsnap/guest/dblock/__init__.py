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

The modules, one concern each: :mod:`~vmsnap.guest.dblock.config` (settings, the error),
:mod:`~vmsnap.guest.dblock.option_file` (credentials), :mod:`~vmsnap.guest.dblock.protocol` (run directory and
lines), :mod:`~vmsnap.guest.dblock.database` (the PyMySQL session), :mod:`~vmsnap.guest.dblock.holder` (the
holder process), :mod:`~vmsnap.guest.dblock.client` (``freeze``/``thaw``/``status``) and
:mod:`~vmsnap.guest.dblock.cli` (the command line).
"""

from __future__ import annotations

from vmsnap.guest.dblock.cli import build_parser, main
from vmsnap.guest.dblock.client import HolderInfo, HolderStatus, ThawResult, freeze, status, thaw
from vmsnap.guest.dblock.config import (
    CONNECT_TIMEOUT,
    DEFAULT_LOCK_WAIT,
    DEFAULT_OPTION_FILE,
    DEFAULT_RUN_DIR,
    DEFAULT_SAFETY_TIMEOUT,
    DEFAULT_SERVER_SOCKET,
    OPTION_GROUP,
    ConnectionOptions,
    DbLockError,
    HolderSettings,
)
from vmsnap.guest.dblock.option_file import OptionFile, read_option_file
from vmsnap.guest.dblock.protocol import LOG_NAME, OUTCOME_NAME, PID_NAME, SOCKET_NAME

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_LOCK_WAIT",
    "DEFAULT_OPTION_FILE",
    "DEFAULT_RUN_DIR",
    "DEFAULT_SAFETY_TIMEOUT",
    "DEFAULT_SERVER_SOCKET",
    "LOG_NAME",
    "OPTION_GROUP",
    "OUTCOME_NAME",
    "PID_NAME",
    "SOCKET_NAME",
    "ConnectionOptions",
    "DbLockError",
    "HolderInfo",
    "HolderSettings",
    "HolderStatus",
    "OptionFile",
    "ThawResult",
    "build_parser",
    "freeze",
    "main",
    "read_option_file",
    "status",
    "thaw",
]
