"""Removed: ``vmsnap.vm.libvirt.backups`` held libvirt-native snapshot/backup code that no product path used
(the third round removed it). Importing a name of it raises :class:`~vmsnap.moved.RemovedNameError` saying
what to use instead (docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmsnap import moved

__all__: list[str] = []

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        return moved.resolve(__name__, name)
