"""Deprecated: ``vmsnap.libvirt_ops`` of an older vmsnap. Its names live in ``vmsnap.vm.libvirt.snapshots``
(and ``vmsnap.strategies.libvirt_external``, ``vmsnap.vm.libvirt.backups``, ``vmsnap.vm.libvirt.definition``)
now; each still imports from here, with a DeprecationWarning naming its new home (see :mod:`vmsnap.moved` and
docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmsnap import moved

__all__ = sorted(moved.MOVED[__name__])

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        return moved.resolve(__name__, name)
