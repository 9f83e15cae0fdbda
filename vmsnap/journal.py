"""Deprecated: ``vmsnap.journal`` of an older vmsnap. Its names live in ``vmsnap.repo.journal`` now; each
still imports from here, with a DeprecationWarning naming its new home (see :mod:`vmsnap.moved` and
docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmsnap import moved

__all__ = sorted(moved.MOVED[__name__])

if not TYPE_CHECKING:
    __getattr__ = moved.old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
