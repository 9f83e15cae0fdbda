"""Manifests and backup ids: ids sort by time (also when the clock went back); damaged or foreign
manifests are refused."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.unit.repo.backups import W1, add_backup
from vmsnap.errors import RepositoryError
from vmsnap.repo.manifest import new_backup_id
from vmsnap.repo.qcow2_repo import Qcow2Repository as Repository


def test_backup_ids_sort_by_time_and_new_ones_sort_last(repo: Repository) -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [new_backup_id(base + dt.timedelta(microseconds=i * 7919)) for i in range(200)]
    assert sorted(ids) == ids
    # an id from the future (clock went back since): the next one still sorts after it
    future = new_backup_id(dt.datetime(2099, 1, 1, tzinfo=dt.UTC))
    (repo.root / "vm1").mkdir()
    (repo.root / "vm1" / future).mkdir()
    assert repo.new_backup_id("vm1") > future


def test_damaged_or_foreign_manifests_are_refused(repo: Repository) -> None:
    a = add_backup(repo, "vm1", W1)
    path = repo.backup_dir("vm1", a.backup_id) / "manifest.json"
    data = json.loads(path.read_text())
    data["disks"][0]["file"] = "../../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match="damaged") as info:
        repo.backups("vm1")
    assert "\n" not in str(info.value)
    data["disks"][0]["file"] = "disk0.qcow2"
    data["format"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match="manifest format 7"):
        repo.get("vm1")
