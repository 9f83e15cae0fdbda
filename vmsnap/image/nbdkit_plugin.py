"""nbdkit Python plugin: serves a :class:`~vmsnap.image.readers.BlockReader` read-only over NBD.

Not imported by vmsnap; nbdkit's embedded Python runs it (``nbdkit python nbdkit_plugin.py …``), usually
through :class:`vmsnap.image.nbdkit.NbdkitServer`. Parameters::

    syspath=DIR          prepended to sys.path (repeatable): the project or the venv's site-packages, so
                         that nbdkit's interpreter (Debian's python3, the venv's base) imports vmsnap
    reader=MOD:CALLABLE  the reader factory, e.g. vmsnap.image.readers:RawFileReader
    log=FILE             where read errors are appended (one line each; nbdkit runs detached)
    KEY=VALUE            anything else: keyword arguments of the factory (strings)

One reader serves every connection (``can_multi_conn``: read-only, so all connections see the same bytes);
requests run in parallel (nbdkit's threads; the GIL is released while a reader waits for I/O). Any
exception from the reader becomes EIO for that request alone, never a hang and never a dead server.
"""

from __future__ import annotations

import builtins
import errno
import sys
import time
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # only inside nbdkit's embedded Python

API_VERSION = 2

_paths: list[str] = []
_spec: str | None = None
_log: str | None = None
_options: dict[str, str] = {}
_reader: Any = None


def _note(message: str) -> None:
    nbdkit.debug(message)
    if _log is not None:
        try:
            with builtins.open(_log, "a", encoding="utf-8") as out:  # this module's open() is nbdkit's
                out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
        except OSError:
            pass


def config(key: str, value: str) -> None:
    global _spec, _log
    if key == "syspath":
        _paths.append(value)
    elif key == "reader":
        _spec = value
    elif key == "log":
        _log = value
    else:
        _options[key] = value


def config_complete() -> None:
    global _reader
    if _spec is None:
        raise RuntimeError("the vmsnap plugin needs reader=MODULE:CALLABLE")
    for path in reversed(_paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    from vmsnap.image.readers import open_reader

    _reader = open_reader(_spec, dict(_options))


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> Any:
    return _reader


def get_size(h: Any) -> int:
    return int(h.size)


def can_write(h: Any) -> bool:
    return False


def can_multi_conn(h: Any) -> bool:
    return True


def can_cache(h: Any) -> int:
    return int(nbdkit.CACHE_NONE)


def can_extents(h: Any) -> bool:
    return callable(getattr(h, "extents", None))


def is_rotational(h: Any) -> bool:
    return False


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    try:
        data = h.pread(offset, len(buf))
        if len(data) != len(buf):
            raise OSError(errno.EIO, f"reader returned {len(data)} of {len(buf)} bytes")
    except Exception as err:
        _note(f"read of {len(buf)} bytes at {offset} failed: {err}")
        nbdkit.set_error(errno.EIO)
        raise
    buf[:] = data


def extents(h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    zero = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    try:
        return [
            (start, length, zero if is_zero else 0) for start, length, is_zero in h.extents(offset, count)
        ]
    except Exception as err:
        _note(f"block status of {count} bytes at {offset} failed: {err}")
        nbdkit.set_error(errno.EIO)
        raise
