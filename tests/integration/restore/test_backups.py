"""A backup named as every command names one (repository, VM, backup id, disk), taken by ``vmsnap backup`` of
powered-off images, mounted and instantly restorable; unknown backups and disks are refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.cli_helpers import qcow2_repo
from tests.integration.restore.conftest import BackedUpDisk, daemon_pids
from tests.integration.restore.test_mount import assert_nothing_left, check_mounted
from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.restore.backups import resolve
from vmsnap.restore.mount import mount, umount
from vmsnap.vm.machine import OfflineMachine


def test_mount_a_backup_from_a_repository(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)
    repo = qcow2_repo(tmp_path / "repo")
    result = Backup(OfflineMachine([image], name="vm1"), BackupConfig(repo=repo)).run()
    backup = resolve(repo, "vm1")
    assert backup.backup_id == result.backup_id and list(backup.sources) == ["disk0"]
    assert backup.domain_xml is None
    target = tmp_path / "m"
    target.mkdir()
    check_mounted(mount(backup.sources["disk0"], target, run_dir=run_dir), backed_up_disk.v1)
    pids = daemon_pids(run_dir)
    again = resolve(repo, "vm1", result.backup_id, ["disk0"])  # the same backup disk, named explicitly
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UsageError, match="mounted already"):
        mount(again.sources["disk0"], other, run_dir=run_dir)
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target, other], pids)

    with pytest.raises(NotFoundError, match=r"no backup .20990101T000000\.000000Z-beef."):
        resolve(repo, "vm1", "20990101T000000.000000Z-beef")
    with pytest.raises(NotFoundError, match="no disk 'disk9'"):
        resolve(repo, "vm1", disks=["disk9"])
    with pytest.raises(NotFoundError):
        resolve(repo, "vm2")
    with pytest.raises(RepositoryError):
        resolve(tmp_path, "vm1")
