"""prune --keep-last never breaks a chain a kept backup needs: a property test of the plan, and a real
prune."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.repo.backups import W1, W2, W3, add_backup, expected_raw, same_content
from vmsnap.errors import UsageError
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.prune import plan_retention
from vmsnap.repo.qcow2_repo import Qcow2Repository as Repository


def test_prune_keeps_the_chains_kept_backups_need(repo: Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    b = add_backup(repo, "vm1", W2, parent=a.backup_id)
    c = add_backup(repo, "vm1", W3, parent=b.backup_id)
    d = add_backup(repo, "vm1", W2)
    e = add_backup(repo, "vm1", W3, parent=d.backup_id)
    plan = repo.prune("vm1", 3, dry_run=True)
    assert plan.kept == (c.backup_id, d.backup_id, e.backup_id)
    assert plan.needed == (a.backup_id, b.backup_id)
    assert plan.removed == ()
    result = repo.prune("vm1", 1)
    assert result.removed == (a.backup_id, b.backup_id, c.backup_id)
    assert [m.backup_id for m in repo.backups("vm1")] == [d.backup_id, e.backup_id]
    assert not repo.leftovers("vm1")
    _, restored = repo.restore("vm1", e.backup_id, tmp_path / "out")
    assert same_content(restored[0].path, expected_raw(tmp_path, "e", W2["disk0"], W3["disk0"]))
    with pytest.raises(UsageError, match="keep at least one"):
        repo.prune("vm1", 0)


def _manifest(backup_id: str, parent: str | None) -> Manifest:
    return Manifest(
        "vm", backup_id, "incremental" if parent else "full", parent, "backup", "none", "", False, None, ()
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(min_value=1, max_value=35))
def test_retention_never_breaks_a_kept_chain(incremental: list[bool], keep_last: int) -> None:
    backups: list[Manifest] = []
    for i, inc in enumerate(incremental):
        parent = backups[-1].backup_id if inc and backups else None
        backups.append(_manifest(f"{i:04d}", parent))
    plan = plan_retention("vm", backups, keep_last)
    alive = set(plan.kept) | set(plan.needed)
    assert alive | set(plan.removed) == {m.backup_id for m in backups}
    assert not alive & set(plan.removed)
    assert list(plan.kept) == [m.backup_id for m in backups[-keep_last:]]
    by_id = {m.backup_id: m for m in backups}
    for backup_id in alive:  # closed under "parent of"
        parent = by_id[backup_id].parent
        assert parent is None or parent in alive
    for backup_id in plan.needed:  # nothing kept without a reason
        assert any(_descends(by_id, k, backup_id) for k in plan.kept)


def _descends(by_id: dict[str, Manifest], child: str, ancestor: str) -> bool:
    parent = by_id[child].parent
    while parent is not None:
        if parent == ancestor:
            return True
        parent = by_id[parent].parent
    return False
