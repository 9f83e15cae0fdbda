"""Plugins by name: entry points in groups ``vmsnap.strategies``, ``vmsnap.transports``, ``vmsnap.layouts``
(repository layouts) and ``vmsnap.stores`` (stores, by URL scheme).

Entry points are import strings loaded only when a name is asked for, so a plugin whose optional
dependency is missing breaks nobody else; a typo gets the list of names that exist. A group's entry points
are read once per process (reading them scans every installed distribution); :func:`refresh` forgets them.
"""

from __future__ import annotations

import difflib
import functools
import typing
from importlib.metadata import EntryPoint, entry_points

from vmsnap.errors import PluginError

STRATEGY_GROUP = "vmsnap.strategies"
TRANSPORT_GROUP = "vmsnap.transports"
LAYOUT_GROUP = "vmsnap.layouts"
STORE_GROUP = "vmsnap.stores"


def refresh() -> None:
    """Forget the entry points read so far (a plugin was installed or removed in this process)."""
    _entry_points.cache_clear()


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise PluginError(
                f"two plugins claim the name {ep.name!r} in {group}: {previous.value} and {ep.value}",
                hint="uninstall one of the packages that provide them",
            )
        found[ep.name] = ep
    return found


def names(group: str) -> list[str]:
    """Registered names in ``group``, sorted."""
    return sorted(_entry_points(group))


def load(group: str, name: str) -> object:
    """The class registered as ``name`` in ``group``.

    :raise PluginError: unknown name (with close matches and the full list), or the module failed to import
    """
    eps = _entry_points(group)
    ep = eps.get(name)
    kind = group.rsplit(".", 1)[-1].rstrip("s")
    if ep is None:
        close = difflib.get_close_matches(name, eps, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise PluginError(
            f"unknown {kind} {name!r}", hint=f"{guess}available: {', '.join(sorted(eps)) or 'none'}"
        )
    try:
        loaded: object = ep.load()
        return loaded
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        raise PluginError(
            f"{kind} {name!r} cannot be loaded: {err}",
            hint=f"install the package that provides {missing!r} (see the README's optional extras)",
        ) from err


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
