"""The repository on its own: format, ids, commit, chains, restore, verify (QEMU and libqcow readers), prune.

Backups are built here with real qemu-img/qemu-io (no VM), the same files a backup run leaves.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.errors import (
    ChainError,
    ChecksumMismatchError,
    NotFoundError,
    RepositoryError,
    UsageError,
    VmsnapError,
)
from vmsnap.image.digest import image_chunks
from vmsnap.image.libqcow import libqcow_chunks
from vmsnap.repo.manifest import DiskRecord, Manifest, new_backup_id, utc_now_iso
from vmsnap.repo.prune import plan_retention
from vmsnap.repo.qcow2_layout import qcow2_backing_file
from vmsnap.repo.repository import Repository
from vmsnap.strategies.base import BackupContext, Checkpoint

DISKS = ("disk0", "disk1")
SIZE = 4 * 1024 * 1024


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def add_backup(
    repo: Repository, vm: str, writes: dict[str, list[str]], parent: str | None = None
) -> Manifest:
    """Stage and commit a backup whose disks get the qemu-io ``writes`` (on top of ``parent``'s, if any)."""
    backup_id = repo.new_backup_id(vm)
    staging = repo.stage(vm, backup_id)
    records = []
    for disk in DISKS:
        image = staging / f"{disk}.qcow2"
        if parent is None:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
        else:
            backing = f"../{parent}/{disk}.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(image)],
                check=True,
            )
        qemu_io(image, *writes.get(disk, []))
        digest = repo.digest_staged(staging, disk, SIZE, parent=repo.get(vm, parent) if parent else None)
        records.append(DiskRecord(disk, image.name, SIZE, image.stat().st_size, digest))
    manifest = Manifest(
        vm=vm,
        backup_id=backup_id,
        kind="incremental" if parent else "full",
        parent=parent,
        strategy="backup",
        transport="none",
        created=utc_now_iso(),
        quiesced=False,
        bitmap="vmsnap",
        disks=tuple(records),
    )
    repo.commit(staging, manifest)
    return manifest


def expected_raw(tmp: Path, name: str, *write_lists: list[str]) -> Path:
    """A reference qcow2 with the same writes applied in order (what the guest saw)."""
    image = tmp / f"expected-{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    for writes in write_lists:
        qemu_io(image, *writes)
    return image


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(tmp_path / "repo", create=True)


W1 = {"disk0": ["write -P 0x11 0 1M", "write -P 0x12 2M 64k"], "disk1": ["write -P 0x21 1M 1M"]}
W2 = {"disk0": ["write -P 0x31 512k 1M", "write -z 2M 64k"], "disk1": ["write -P 0x41 0 64k"]}
W3 = {"disk0": ["write -P 0x51 3M 64k"], "disk1": ["discard 1M 64k"]}


# -- format and opening ---------------------------------------------------------------------------------


def test_open_needs_a_repository_and_create_makes_one_private(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no vmsnap repository"):
        Repository.open(tmp_path / "nothing")
    repo = Repository.open(tmp_path / "new", create=True)
    assert json.loads((repo.root / "vmsnap-repo.json").read_text()) == {"format": 1}
    assert stat.S_IMODE(repo.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((repo.root / "vmsnap-repo.json").stat().st_mode) == 0o600
    Repository.open(tmp_path / "new")  # opens again


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
    (root / "vmsnap-repo.json").write_text('{"format": 2}')
    with pytest.raises(RepositoryError, match="format 2") as info:
        Repository.open(root)
    assert "\n" not in str(info.value)
    (root / "vmsnap-repo.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="damaged"):
        Repository.open(root)


def test_backup_ids_sort_by_time_and_new_ones_sort_last(repo: Repository) -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [new_backup_id(base + dt.timedelta(microseconds=i * 7919)) for i in range(200)]
    assert sorted(ids) == ids
    # an id from the future (clock went back since): the next one still sorts after it
    future = new_backup_id(dt.datetime(2099, 1, 1, tzinfo=dt.UTC))
    (repo.root / "vm1").mkdir()
    (repo.root / "vm1" / future).mkdir()
    assert repo.new_backup_id("vm1") > future


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", ".hidden", "", "x" * 200])
def test_names_with_slash_or_dots_never_become_paths(repo: Repository, bad: str) -> None:
    with pytest.raises(UsageError):
        repo.vm_dir(bad)
    with pytest.raises(UsageError):
        repo.backup_dir("vm1", bad)


# -- commit, list, chains, restore ----------------------------------------------------------------------


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


def flip_data_byte(image: Path) -> None:
    """Change one byte of guest data inside a qcow2 (found through qemu-img map)."""
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True
        ).stdout
    )
    offset = next(e["offset"] for e in extents if e["data"] and "offset" in e)
    with open(image, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


# -- verify ---------------------------------------------------------------------------------------------


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


def test_one_damaged_manifest_does_not_hide_the_other_backups(repo: Repository, tmp_path: Path) -> None:
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


# -- locking and retention ------------------------------------------------------------------------------


def test_one_run_per_vm_holds_the_lock(repo: Repository) -> None:
    with repo.lock("vm1"):
        with pytest.raises(RepositoryError, match="another vmsnap run"), repo.lock("vm1"):
            pass
        with repo.lock("vm2"):
            pass
    with repo.lock("vm1"):
        pass


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


# -- the journal ----------------------------------------------------------------------------------------


def test_journal_round_trips_snapshot_refs_and_survives_a_reload(tmp_path: Path) -> None:
    from vmsnap.model import Disk, SnapshotRef
    from vmsnap.repo.journal import Journal, snapshot_to_json

    disk = Disk(
        "disk0", "fmt-disk0", Path("/images/d0.qcow2"), "qcow2", 1 << 26, (Path("/images/base.qcow2"),)
    )
    ref = SnapshotRef(
        "external", "backup-x", disk, "/images/d0.qcow2.vmsnap-x.qcow2", {"overlay_node": "ov-1"}
    )
    context = BackupContext(
        tmp_path / "staging",
        "bm1",
        Checkpoint("20260101T000000.000000Z-abcd", {"disk0": tmp_path / "p"}),
        True,
    )
    path = tmp_path / ".journal.json"
    journal = Journal.start(path, vm="vm1", staging=str(tmp_path / "staging"), context=context.to_json())
    journal.record("creating", name="backup-x")
    journal.record("created", snapshots=[snapshot_to_json(ref)])
    journal.record("deleted", disk="disk9")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Journal.load(path)
    assert loaded is not None
    assert loaded.snapshots() == [ref]
    assert loaded.deleted_disks() == {"disk9"}
    assert loaded.last_step == "deleted"
    assert BackupContext.from_json(loaded.header["context"]) == context
    with pytest.raises(RepositoryError, match="not been recovered"):
        Journal.start(path, vm="vm1")
    loaded.remove()
    assert Journal.load(path) is None
    path.write_text('{"header": {"format": 9}, "steps": []}')
    with pytest.raises(RepositoryError, match="damaged"):
        Journal.load(path)
