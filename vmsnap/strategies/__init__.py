"""Snapshot strategies: internal, external, backup, lvm, btrfs (see :mod:`vmsnap.strategies.base`), found by
name through the ``vmsnap.strategies`` entry points."""

from __future__ import annotations

from typing import cast

from vmsnap.errors import PluginError
from vmsnap.registry import STRATEGY_GROUP, load, names
from vmsnap.strategies.base import Strategy

_REQUIRED = ("name", "traits", "capabilities", "for_backup", "probe", "create", "export", "delete", "list")


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``.

    :raise PluginError: unknown name (with close matches), the module failed to import, or the class lacks
        part of the :class:`~vmsnap.strategies.base.Strategy` interface
    """
    cls = load(STRATEGY_GROUP, name)
    missing = [attr for attr in _REQUIRED if not hasattr(cls, attr)]
    if missing:
        raise PluginError(
            f"strategy {name!r} ({cls!r}) lacks {', '.join(missing)}",
            hint="its package must implement vmsnap.strategies.base.Strategy (StrategyBase has defaults)",
        )
    return cast(type[Strategy], cls)


def strategy_names() -> list[str]:
    """The registered strategy names, sorted."""
    return names(STRATEGY_GROUP)
