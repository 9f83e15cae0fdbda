"""Deprecated: ``vmsnap.libvirt_ops`` of an older vmsnap. Its definition helpers live in
``vmsnap.vm.libvirt.definition`` now and still import from here, with a DeprecationWarning naming their new
home; its libvirt-native snapshot and backup functions were removed in the third round, and importing one
raises an error that says what to use instead (see :mod:`vmsnap.moved` and docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmsnap import moved

__all__ = sorted(moved.MOVED[__name__])

if not TYPE_CHECKING:
    __getattr__ = moved.old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
