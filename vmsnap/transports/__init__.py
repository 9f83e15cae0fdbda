"""Transports that copy an exported snapshot out: copy, nbd, rsync (see :mod:`vmsnap.transports.base`), found
by name through the ``vmsnap.transports`` entry points."""

from __future__ import annotations

from typing import cast

from vmsnap.errors import PluginError
from vmsnap.registry import TRANSPORT_GROUP, load, names
from vmsnap.transports.base import Transport

_REQUIRED = ("name", "preference", "incremental", "accepts", "send")


def transport_class(name: str) -> type[Transport]:
    """The transport class registered as ``name``.

    :raise PluginError: unknown name (with close matches), the module failed to import, or the class lacks
        part of the :class:`~vmsnap.transports.base.Transport` interface
    """
    cls = load(TRANSPORT_GROUP, name)
    missing = [attr for attr in _REQUIRED if not hasattr(cls, attr)]
    if missing:
        raise PluginError(
            f"transport {name!r} ({cls!r}) lacks {', '.join(missing)}",
            hint="its package must implement vmsnap.transports.base.Transport",
        )
    return cast(type[Transport], cls)


def transport_names() -> list[str]:
    """The registered transport names, by preference (the order "auto" tries them in)."""
    return sorted(names(TRANSPORT_GROUP), key=lambda n: (transport_class(n).preference, n))
