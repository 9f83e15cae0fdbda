"""verify with both readers (QEMU and libqcow): a good chain passes; damage and bad backing links are
named."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.unit.repo.backups import SIZE, W1, W2, add_backup, flip_data_byte
from vmsnap.errors import ChainError
from vmsnap.image.digest import image_chunks
from vmsnap.image.libqcow import libqcow_chunks
from vmsnap.repo.qcow2_repo import Qcow2Repository as Repository


@pytest.mark.parametrize("reader", ["qemu", "libqcow"])
def test_verify_passes_a_good_chain_and_names_a_damaged_disk(
    repo: Repository, tmp_path: Path, reader: str
) -> None:
    a = add_backup(repo, "vm1", W1)
    b = add_backup(repo, "vm1", W2, parent=a.backup_id)
    report = repo.verify(reader=reader)  # type: ignore[arg-type]
    assert report.reader == reader
    assert report.ok, report.problems
    assert set(report.checked) == {("vm1", a.backup_id), ("vm1", b.backup_id)}
    flip_data_byte(repo.backup_dir("vm1", b.backup_id) / "disk1.qcow2")
    report = repo.verify("vm1", reader=reader)  # type: ignore[arg-type]
    assert [(p.backup_id, p.disk) for p in report.problems] == [(b.backup_id, "disk1")]
    assert "sha256" in report.problems[0].message


def test_libqcow_reader_agrees_with_qemu_on_zero_clusters_over_data(repo: Repository, tmp_path: Path) -> None:
    # libqcow alone reads a zero-flagged overlay cluster from the backing file; vmsnap's map must not
    a = add_backup(repo, "vm1", {"disk0": ["write -P 0x77 0 2M"]})
    b = add_backup(
        repo, "vm1", {"disk0": ["write -z 0 64k", "write -z 1M 128k", "write -P 0x78 1536k 4k"]}, a.backup_id
    )
    image = repo.backup_dir("vm1", b.backup_id) / "disk0.qcow2"
    chunks = libqcow_chunks(image)
    assert chunks.size == SIZE
    assert chunks == image_chunks(image, "qcow2")


def test_verify_finds_a_backing_link_that_points_elsewhere(repo: Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    b = add_backup(repo, "vm1", W2, parent=a.backup_id)
    image = repo.backup_dir("vm1", b.backup_id) / "disk0.qcow2"
    absolute = repo.backup_dir("vm1", a.backup_id) / "disk0.qcow2"
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(absolute), "-F", "qcow2", str(image)], check=True)
    report = repo.verify("vm1", b.backup_id, reader="qemu")
    assert [p.disk for p in report.problems] == ["disk0"]
    assert "absolute backing path" in report.problems[0].message
    with pytest.raises(ChainError, match="absolute"):
        repo.restore("vm1", b.backup_id, tmp_path / "out")
