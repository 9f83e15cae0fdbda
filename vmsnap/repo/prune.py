"""Which backups ``prune`` removes: by a :class:`~vmsnap.repo.retention.RetentionPolicy` (borg's rules), or
by vmsnap 0.1's ``--keep-last N`` (exactly the newest N); in a layout with chains (qcow2) a kept backup also
keeps the parents it needs.

A plan only: the repository's ``prune`` carries it out under the VM's lock.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmsnap.errors import UsageError
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.reports import PruneResult
from vmsnap.repo.retention import PARENT_RULE, RetentionPolicy, backup_time, keep_ancestors, plan

__all__ = ["PruneResult", "plan_policy", "plan_retention"]


def plan_policy(
    vm: str, backups: Sequence[Manifest], policy: RetentionPolicy, *, chains: bool
) -> PruneResult:
    """What ``policy`` keeps of ``backups`` (oldest first) by borg's rules, and, with ``chains``, the
    ancestors the kept ones need.

    :raise UsageError: a backup id that is no vmsnap id (its time cannot be read)
    """
    retention = plan([(m.backup_id, backup_time(m.backup_id)) for m in backups], policy)
    if chains:
        retention = keep_ancestors(retention, {m.backup_id: m.parent for m in backups})
    order = {m.backup_id: i for i, m in enumerate(backups)}
    kept = sorted((k for k in retention.kept if k.rule != PARENT_RULE), key=lambda k: order[k.backup_id])
    needed = sorted((k for k in retention.kept if k.rule == PARENT_RULE), key=lambda k: order[k.backup_id])
    return PruneResult(
        vm,
        tuple(sorted(retention.removed, key=order.__getitem__)),
        tuple(k.backup_id for k in kept),
        tuple(k.backup_id for k in needed),
        {k.backup_id: k.reason for k in retention.kept},
    )


def plan_retention(
    vm: str, backups: Sequence[Manifest], keep_last: int, *, chains: bool = True
) -> PruneResult:
    """Keep the newest ``keep_last`` of ``backups`` (oldest first) and (``chains``) the ancestors they need;
    drop the rest.

    :raise UsageError: ``keep_last`` below 1
    """
    if keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: keep at least one backup")
    by_id = {m.backup_id: m for m in backups}
    kept = [m.backup_id for m in backups[-keep_last:]]
    needed: list[str] = []
    for backup_id in kept if chains else ():
        parent = by_id[backup_id].parent
        while parent is not None and parent in by_id:
            if parent not in kept and parent not in needed:
                needed.append(parent)
            parent = by_id[parent].parent
    keep = set(kept) | set(needed)
    removed = [m.backup_id for m in backups if m.backup_id not in keep]
    reasons = {b: f"last #{len(kept) - i}" for i, b in enumerate(kept)} | {b: "parent" for b in needed}
    return PruneResult(vm, tuple(removed), tuple(kept), tuple(sorted(needed)), reasons)
