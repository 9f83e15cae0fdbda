"""Removed: ``vmsnap.strategies.libvirt_external`` held libvirt-native snapshot/backup code that no product
path used (the third round removed it). Importing a name of it raises
:class:`~vmsnap.moved.RemovedNameError` saying what to use instead (docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__: list[str] = []

if not TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
