"""Deprecated: ``vmsnap.repository`` of an older vmsnap. Its names live in ``vmsnap.repo.manifest`` (and
``vmsnap.files``, ``vmsnap.image.libqcow``, ``vmsnap.repo.marker``, ``vmsnap.repo.progress``,
``vmsnap.repo.prune``, ``vmsnap.repo.qcow2_layout``, ``vmsnap.repo.qcow2_repo``, ``vmsnap.repo.reports``,
``vmsnap.repo.repository``, ``vmsnap.repo.verify``) now; each still imports from here, with a
DeprecationWarning naming its new home (see :mod:`vmsnap.moved` and docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmsnap import moved

__all__ = sorted(moved.MOVED[__name__])

if not TYPE_CHECKING:
    __getattr__ = moved.old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
