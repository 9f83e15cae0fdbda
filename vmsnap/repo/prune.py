"""Which backups ``prune --keep-last N`` removes: all but the newest N and the parents a kept one needs.

A plan only: :meth:`vmsnap.repo.repository.Repository.prune` carries it out under the VM's lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from vmsnap.errors import UsageError
from vmsnap.repo.manifest import Manifest


@attrs.frozen
class PruneResult:
    """What ``prune`` removed and kept (ids, oldest first); ``needed`` are old ones kept for a chain."""

    vm: str
    removed: tuple[str, ...]
    kept: tuple[str, ...]
    needed: tuple[str, ...]


def plan_retention(vm: str, backups: Sequence[Manifest], keep_last: int) -> PruneResult:
    """Keep the newest ``keep_last`` of ``backups`` (oldest first) and the ancestors they need; drop the rest.

    :raise UsageError: ``keep_last`` below 1
    """
    if keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: keep at least one backup")
    by_id = {m.backup_id: m for m in backups}
    kept = [m.backup_id for m in backups[-keep_last:]]
    needed: list[str] = []
    for backup_id in kept:
        parent = by_id[backup_id].parent
        while parent is not None and parent in by_id:
            if parent not in kept and parent not in needed:
                needed.append(parent)
            parent = by_id[parent].parent
    keep = set(kept) | set(needed)
    removed = [m.backup_id for m in backups if m.backup_id not in keep]
    return PruneResult(vm, tuple(removed), tuple(kept), tuple(sorted(needed)))
