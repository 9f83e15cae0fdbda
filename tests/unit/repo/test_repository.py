"""The repository itself: its marker, names that never become paths, listing around damaged manifests, the
per-VM lock."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.unit.repo.backups import W1, W2, add_backup
from vmsnap.errors import RepositoryError, UsageError
from vmsnap.repo import repository
from vmsnap.repo.layout import layout_class, layout_names
from vmsnap.repo.qcow2_repo import Qcow2Repository
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores import Store


def test_open_needs_a_repository_and_create_makes_one_private(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no vmsnap repository"):
        Repository.open(tmp_path / "nothing")
    repo = Repository.open(tmp_path / "new", create=True, layout="qcow2")
    assert isinstance(repo, Qcow2Repository)
    marker = json.loads((repo.root / "vmsnap-repo.json").read_text())
    assert (marker["format"], marker["layout"], marker["encryption"]) == (2, "qcow2", None)
    assert stat.S_IMODE(repo.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((repo.root / "vmsnap-repo.json").stat().st_mode) == 0o600
    assert isinstance(Repository.open(tmp_path / "new"), Qcow2Repository)  # opens again


def test_a_format_1_repository_opens_as_layout_qcow2(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "vmsnap-repo.json").write_text('{"format": 1}')
    repo = Repository.open(root)
    assert isinstance(repo, Qcow2Repository) and repo.name == "qcow2"
    add_backup(repo, "vm1", W1)
    assert len(Repository.open(root).backups("vm1")) == 1
    assert (root / "vmsnap-repo.json").read_text() == '{"format": 1}'  # never rewritten


def test_a_non_empty_directory_is_not_made_a_repository(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.open(tmp_path / "data", create=True)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "data" / "vmsnap-repo.json").exists()


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "vmsnap-repo.json").write_text('{"format": 7}')
    with pytest.raises(RepositoryError, match="format 7") as info:
        Repository.open(root)
    assert "\n" not in str(info.value)
    (root / "vmsnap-repo.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="damaged"):
        Repository.open(root)


def test_layouts_are_found_by_the_name_their_marker_gives(tmp_path: Path) -> None:
    assert layout_names() == ["chunks", "qcow2"]
    assert layout_class("qcow2") is Qcow2Repository
    assert Repository.traits_at(tmp_path / "absent").name == "chunks"  # the default
    assert Repository.traits_at(tmp_path / "absent", layout="qcow2").name == "qcow2"
    root = tmp_path / "repo"
    root.mkdir()
    marker = {"format": 2, "layout": "tape", "id": "ab" * 16, "chunk_size": None, "compression": None}
    (root / "vmsnap-repo.json").write_text(json.dumps(marker))
    with pytest.raises(RepositoryError, match="has layout 'tape', which this vmsnap does not know") as info:
        Repository.open(root)
    assert "install the package that provides it" in str(info.value) and "\n" not in str(info.value)
    (root / "vmsnap-repo.json").write_text(json.dumps({**marker, "layout": "chunks"}))
    with pytest.raises(RepositoryError, match="damaged: chunk size None"):  # chunks needs its chunk size
        Repository.open(root)


def test_a_layout_is_asked_for_by_name_and_a_wrong_one_refused(tmp_path: Path) -> None:
    Repository.open(tmp_path / "r", create=True, layout="qcow2")
    with pytest.raises(RepositoryError, match="has layout qcow2, not chunks"):
        Repository.open(tmp_path / "r", layout="chunks")
    with pytest.raises(UsageError, match="unknown repository layout 'zip'"):
        Repository.open(tmp_path / "r", layout="zip")
    with pytest.raises(UsageError, match="cannot be encrypted"):
        Repository.init(tmp_path / "q", layout="qcow2", encrypt=True, key_file=tmp_path / "key")
    assert not (tmp_path / "key").exists() and not (tmp_path / "q").exists()


def test_locate_writes_nothing_and_open_uses_the_store_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real = repository.open_store

    def counting(location: str | Path, *, create: bool = False) -> Store:
        opened.append(str(location))
        return real(location, create=create)

    monkeypatch.setattr(repository, "open_store", counting)
    found = Repository.locate(tmp_path / "new", create=True, layout="qcow2")
    assert found.marker is None and found.traits().name == "qcow2"
    assert not (tmp_path / "new").exists() and opened == []  # nothing made, nothing opened yet
    assert isinstance(found.open(), Qcow2Repository) and opened == [str(tmp_path / "new")]
    opened.clear()
    again = Repository.locate(tmp_path / "new", create=True)
    assert again.marker is not None and again.traits().name == "qcow2"
    again.open()
    assert opened == [str(tmp_path / "new")]  # the store is opened and the marker read once
    with pytest.raises(RepositoryError, match="no such directory"):
        Repository.locate(tmp_path / "absent")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", ".hidden", "", "x" * 200])
def test_names_with_slash_or_dots_never_become_paths(repo: Qcow2Repository, bad: str) -> None:
    with pytest.raises(UsageError):
        repo.vm_dir(bad)
    with pytest.raises(UsageError):
        repo.backup_dir("vm1", bad)


def test_one_damaged_manifest_does_not_hide_the_other_backups(repo: Qcow2Repository, tmp_path: Path) -> None:
    a = add_backup(repo, "vm1", W1)
    b = add_backup(repo, "vm1", W2)
    (repo.backup_dir("vm1", a.backup_id) / "manifest.json").write_text("{truncated")
    damaged: list = []
    assert [m.backup_id for m in repo.backups("vm1", damaged=damaged)] == [b.backup_id]
    assert [d.backup_id for d in damaged] == [a.backup_id]
    assert repo.get("vm1").backup_id == b.backup_id  # the latest is fine
    repo.restore("vm1", b.backup_id, tmp_path / "out")
    with pytest.raises(RepositoryError, match="unreadable"):
        repo.restore("vm1", a.backup_id, tmp_path / "out-a")
    report = repo.verify("vm1", reader="qemu")
    assert report.checked == tuple(sorted([("vm1", a.backup_id), ("vm1", b.backup_id)]))
    assert [(p.backup_id, p.disk) for p in report.problems] == [(a.backup_id, "")]
    with pytest.raises(RepositoryError):  # never prune around a damaged backup
        repo.prune("vm1", 1)
    # a damaged newest backup is not skipped silently: "latest" names it
    (repo.backup_dir("vm1", b.backup_id) / "manifest.json").write_text("[]")
    with pytest.raises(RepositoryError, match="damaged"):
        repo.get("vm1")


def test_one_run_per_vm_holds_the_lock(repo: Qcow2Repository) -> None:
    with repo.lock("vm1"):
        with pytest.raises(RepositoryError, match="another vmsnap run"), repo.lock("vm1"):
            pass
        with repo.lock("vm2"):
            pass
    with repo.lock("vm1"):
        pass
