"""The qcow2 layout: commit, chains of overlays, and restore to standalone images that are checked."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import attrs
import pytest

from tests.unit.repo.backups import (
    DISKS,
    SIZE,
    W1,
    W2,
    W3,
    add_backup,
    expected_raw,
    flip_data_byte,
    same_content,
    stage_images,
)
from vmsnap.errors import ChainError, ChecksumMismatchError, NotFoundError, RepositoryError, VmsnapError
from vmsnap.repo.manifest import DiskRecord
from vmsnap.repo.qcow2_layout import qcow2_backing_file
from vmsnap.repo.qcow2_repo import Qcow2Repository as Repository


def test_commit_seals_a_backup_private_with_the_manifest_last(repo: Repository, tmp_path: Path) -> None:
    full = add_backup(repo, "vm1", W1)
    directory = repo.backup_dir("vm1", full.backup_id)
    assert not list((repo.root / "vm1").glob(".partial-*"))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    data = json.loads((directory / "manifest.json").read_text())
    assert set(data) == {
        *("format", "vm", "backup_id", "kind", "parent", "strategy", "transport", "created", "quiesced"),
        *("bitmap", "disks", "digest"),
    }
    assert data["digest"] == "sha256-4MiB-chunks"
    assert set(data["disks"][0]) == {"name", "file", "virtual_size", "bytes_written", "sha256"}
    assert [m.backup_id for m in repo.backups("vm1")] == [full.backup_id]
    # a staging directory (a run in progress or dead) is never listed
    repo.stage("vm1", repo.new_backup_id("vm1"))
    assert [m.backup_id for m in repo.backups()] == [full.backup_id]
    assert len(repo.leftovers("vm1")) == 1


def test_commit_checks_every_file_before_the_manifest_is_written(repo: Repository) -> None:
    full = add_backup(repo, "vm1", W1)
    staging = stage_images(repo, "vm1", W2, None)
    records = [DiskRecord(d, f"{d}.qcow2", SIZE, 0, repo.digest_staged(staging, d, SIZE)) for d in DISKS]
    good = attrs.evolve(full, backup_id=staging.name.removeprefix(".partial-"), disks=tuple(records))
    wrong = attrs.evolve(good, disks=(records[0], attrs.evolve(records[1], sha256="0" * 64)))
    with pytest.raises(RepositoryError, match="does not match"):
        repo.commit(staging, wrong)
    (staging / "disk0.qcow2").rename(staging / "elsewhere")
    with pytest.raises(RepositoryError, match=r"lacks disk0\.qcow2"):
        repo.commit(staging, good)
    # neither attempt wrote a manifest or sealed anything: the backup does not exist
    left = sorted(p.name for p in staging.iterdir())
    assert left == ["disk0.chunks", "disk1.chunks", "disk1.qcow2", "elsewhere"]
    assert [m.backup_id for m in repo.backups("vm1")] == [full.backup_id]
    (staging / "elsewhere").rename(staging / "disk0.qcow2")
    assert repo.commit(staging, good) == repo.backup_dir("vm1", good.backup_id)
    assert [m.backup_id for m in repo.backups("vm1")] == [full.backup_id, good.backup_id]


def test_incremental_chain_restores_what_each_backup_held(repo: Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    b = add_backup(repo, "vm1", W2, parent=a.backup_id)
    c = add_backup(repo, "vm1", W3, parent=b.backup_id)
    assert (
        qcow2_backing_file(repo.backup_dir("vm1", b.backup_id) / "disk0.qcow2")
        == f"../{a.backup_id}/disk0.qcow2"
    )
    assert [m.backup_id for m in repo.chain(c)] == [a.backup_id, b.backup_id, c.backup_id]
    for manifest, writes in ((a, [W1]), (b, [W1, W2]), (c, [W1, W2, W3])):
        out = tmp_path / f"restore-{manifest.backup_id}"
        got, restored = repo.restore("vm1", manifest.backup_id, out)
        assert got == manifest
        for disk in restored:
            assert disk.path == out / f"{disk.name}.qcow2"
            assert qcow2_backing_file(disk.path) is None  # standalone
            assert stat.S_IMODE(disk.path.stat().st_mode) == 0o600
            reference = expected_raw(
                tmp_path, f"{manifest.backup_id}-{disk.name}", *[w[disk.name] for w in writes]
            )
            assert same_content(disk.path, reference), (manifest.backup_id, disk.name)
    # latest by default
    got, _ = repo.restore("vm1", None, tmp_path / "latest")
    assert got.backup_id == c.backup_id


def test_restore_never_overwrites_and_unknown_ids_are_named(repo: Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "disk0.qcow2").write_text("mine")
    with pytest.raises(VmsnapError, match="exists already"):
        repo.restore("vm1", a.backup_id, out)
    assert (out / "disk0.qcow2").read_text() == "mine"
    assert not (out / "disk1.qcow2").exists()
    with pytest.raises(NotFoundError, match="no backup '20990101") as info:
        repo.restore("vm1", "20990101T000000.000000Z-dead", tmp_path / "x")
    assert a.backup_id in str(info.value)
    with pytest.raises(NotFoundError, match="no backups of VM 'other'"):
        repo.restore("other", None, tmp_path / "x")


def test_restore_of_a_chain_with_a_missing_parent_is_a_chain_error(repo: Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    b = add_backup(repo, "vm1", W2, parent=a.backup_id)
    os.rename(repo.backup_dir("vm1", a.backup_id), tmp_path / "moved-away")
    with pytest.raises(ChainError, match="missing"):
        repo.restore("vm1", b.backup_id, tmp_path / "out")
    assert not (tmp_path / "out" / "disk0.qcow2").exists()
    report = repo.verify("vm1", reader="qemu")
    assert not report.ok
    assert any("missing" in p.message for p in report.problems)


def test_restore_detects_a_damaged_image_and_leaves_nothing(repo: Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    image = repo.backup_dir("vm1", a.backup_id) / "disk0.qcow2"
    flip_data_byte(image)
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        repo.restore("vm1", a.backup_id, tmp_path / "out")
    assert not (tmp_path / "out" / "disk0.qcow2").exists()
    assert not list((tmp_path / "out").glob(".*partial*"))
