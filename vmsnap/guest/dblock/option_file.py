"""The MySQL option file vmsnap-dblock takes its credentials from: a file only its owner may read.

``[client]`` then ``[vmsnap-dblock]`` (which overrides it), in MySQL's option-file syntax; Debian's
``/etc/mysql/debian.cnf`` works as is. Credentials never come from argv or the environment.
"""

from __future__ import annotations

import configparser
import math
import os
import stat
from pathlib import Path

import attrs

from vmsnap.guest.dblock.config import OPTION_GROUP, ConnectionOptions, DbLockError


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


def _read_private_text(path: Path) -> str:
    """The text of ``path``, once it is known to be a regular file of this user that no one else can read.

    :raise DbLockError: missing, not a regular file, accessible to group or others, another user's, not UTF-8
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
            return handle.read()
        except UnicodeDecodeError as err:
            raise DbLockError(f"option file {path} is not UTF-8 text", hint="rewrite it as text") from err


def _group_values(parser: configparser.RawConfigParser, group: str) -> dict[str, str]:
    """The keys set in ``group`` (``_`` spelled ``-``, quotes removed); keys without a value are left out."""
    if not parser.has_section(group):
        return {}
    return {k.replace("_", "-"): _unquote(v) for k, v in parser.items(group) if v is not None}


def read_option_file(path: Path) -> OptionFile:
    """Read credentials and settings from a MySQL option file that only its owner can read.

    Reads ``[client]``, then ``[vmsnap-dblock]`` (which overrides it): ``user``, ``password``, ``socket``,
    ``host``, ``port``; and from ``[vmsnap-dblock]`` only ``safety-timeout`` and ``lock-wait``. Debian's
    ``/etc/mysql/debian.cnf`` works as is.

    :param path: the option file
    :raise DbLockError: missing, not a regular file, readable or writable by group or others, owned by another
        user, or not in option-file syntax
    """
    text = _read_private_text(path)
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
    own = _group_values(parser, OPTION_GROUP)
    values = _group_values(parser, "client") | own
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
