"""Copy between repositories of either layout (only missing chunks sent; re-encoded for another key;
standalone images for a qcow2 target), retention by borg's rules on both layouts, and what gc frees."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import same_content
from tests.integration.repo.chunks.mounts import loop_device
from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.errors import UnsupportedError, UsageError
from vmsnap.repo.chunks.copy import ChunksCopy
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.copy import copy_backups
from vmsnap.repo.progress import no_progress
from vmsnap.repo.repository import Repository
from vmsnap.repo.retention import RetentionPolicy
from vmsnap.vm.machine import OfflineMachine

VM = "disk0"


def _write(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


def _snapshot(image: Path, path: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(path)], check=True)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    made = make_image(tmp_path / "disk0.qcow2", "20M")
    _write(made, "write -P 0x11 0 6M")
    return made


def _backups(
    repo: Path, image: Path, tmp_path: Path, count: int, *, first: int = 0, key: Path | None = None
) -> list[tuple[str, Path]]:
    """``count`` backups of ``image`` (strategy internal), each after writing the n-th pattern (from
    ``first``) over 1 MiB at 8 MiB (so each backup has one chunk of its own), each in a second of its own
    (borg's keep_last counts seconds), with the image's content at each."""
    made = []
    for n in range(first, first + count):
        time.sleep(1 - time.time() % 1)
        _write(image, f"write -P {0x21 + n} 8M 1M")
        config = BackupConfig(repo=repo, strategy="internal", key_file=key)
        result = Backup(OfflineMachine([image]), config).run()
        made.append((result.backup_id, _snapshot(image, tmp_path / f"at-{result.backup_id}.qcow2")))
    return made


def _restores(repo: Path, made: list[tuple[str, Path]], out: Path, key: Path | None = None) -> None:
    library = Repository.open(repo, key_file=key)
    for backup_id, expected in made:
        _, (restored,) = library.restore(VM, backup_id, out / backup_id)
        assert same_content(restored.path, expected), backup_id


def test_copy_between_layouts_and_keys_sends_only_what_is_missing(image: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    made = _backups(plain, image, tmp_path, 2)
    key = tmp_path / "offsite.key"
    Repository.init(tmp_path / "offsite", encrypt=True, key_file=key)
    offsite = Repository.open(tmp_path / "offsite", key_file=key)
    first = copy_backups(Repository.open(plain), offsite)  # re-encoded with the other key
    assert [b.backup_id for b in first.backups] == [m[0] for m in made] and first.chunks_sent == 4
    again = copy_backups(Repository.open(plain), offsite)
    assert not any(b.copied for b in again.backups) and again.chunks_sent == 0
    _restores(tmp_path / "offsite", made, tmp_path / "r-offsite", key)
    assert offsite.latest(VM).bitmap is None  # type: ignore[union-attr]  # never an incremental's parent

    images = Repository.init(tmp_path / "images", layout="qcow2")
    copy_backups(offsite, images)  # chunks → standalone qcow2 images
    assert all(m.kind == "full" and m.parent is None for m in images.backups(VM))
    assert images.verify().ok
    _restores(tmp_path / "images", made, tmp_path / "r-images")
    (image_path,) = (tmp_path / "images" / VM / made[1][0]).glob("*.qcow2")
    assert same_content(image_path, made[1][1])  # plain files QEMU opens without vmsnap

    more = _backups(plain, image, tmp_path, 1, first=2)
    back = Repository.init(tmp_path / "back")  # qcow2 → chunks, each chunk checked as it passes
    report = copy_backups(images, back, vm=VM, backup_id=made[1][0])
    assert [b.backup_id for b in report.backups] == [made[1][0]]
    later = copy_backups(Repository.open(plain), back)  # chunks → chunks, same ids: only what is new
    assert later.chunks_sent == 2  # the chunks of its own of made[0] and of more[0]
    _restores(tmp_path / "back", [*made, *more], tmp_path / "r-back")
    with pytest.raises(UsageError, match="--backup needs --vm"):
        copy_backups(images, back, backup_id=made[0][0])


def test_a_disk_a_layout_serves_through_its_checking_reader_is_copied_whole(
    image: Path, tmp_path: Path
) -> None:
    """The path a layout other than chunks takes into a chunks repository, driven with a chunks source: its
    disk served by the reader nbdkit would run (every chunk checked), read in this process."""
    made = _backups(tmp_path / "a", image, tmp_path, 1)
    source = Repository.open(tmp_path / "a")
    target = Repository.init(tmp_path / "b")
    assert isinstance(target, ChunksRepository)
    manifest = source.get(VM)
    assert source.chunk_digests(manifest, "disk0") is None  # chunks keeps none: its reader checks
    with source.reading(VM), target.lock(VM):
        into = ChunksCopy(target, manifest)
        into.add_from_source(source, manifest.disk("disk0"), no_progress)
        into.seal(source.definition(manifest))
    assert into.sent_chunks == 3  # chunks 0 and 1 (6 MiB of 0x11) and 2 (the 1 MiB pattern); the rest zeros
    _restores(tmp_path / "b", made, tmp_path / "r-b")


@pytest.mark.parametrize("layout", ["chunks", "qcow2"])
def test_prune_by_policy_then_gc_frees_what_no_backup_needs(image: Path, tmp_path: Path, layout: str) -> None:
    repo = tmp_path / "repo"
    Repository.init(repo, layout=layout)
    made = _backups(repo, image, tmp_path, 4)
    library = Repository.open(repo)
    with pytest.raises(UsageError, match="keeps no backup"):
        library.prune(VM, RetentionPolicy())
    plan = library.prune(VM, RetentionPolicy(keep_last=2), dry_run=True)
    assert plan.kept == (made[2][0], made[3][0]) and plan.reasons[made[3][0]] == "last #1"
    assert [m.backup_id for m in library.backups(VM)] == [m[0] for m in made]  # a dry run removes nothing
    result = library.prune(VM, RetentionPolicy(keep_last=2))
    assert result.removed == (made[0][0], made[1][0])  # internal backups are all full: no chain to keep
    assert [m.backup_id for m in library.backups(VM)] == [made[2][0], made[3][0]]
    report = library.gc(dry_run=True)
    if layout == "chunks":
        assert report.chunks_freed == 2 and report.bytes_freed > 0  # the 1 MiB pieces of backups 0 and 1
        assert library.gc().chunks_freed == 2 and library.gc().chunks_freed == 0
    _restores(repo, made[2:], tmp_path / "r")
    assert library.verify().ok


def test_daily_retention_keeps_one_per_day(image: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    made = _backups(repo, image, tmp_path, 3)
    library = Repository.open(repo)
    result = library.prune(VM, RetentionPolicy(keep_daily=1))
    day = dt.datetime.now().date()  # backups taken seconds apart fall into one day (two at most)
    assert made[-1][0] in result.kept and len(result.kept) <= 2, (day, result)


@pytest.mark.parametrize("layout", ["chunks", "qcow2"])
def test_restore_to_sparse_raw_files_and_onto_a_block_device(
    image: Path, tmp_path: Path, layout: str
) -> None:
    repo = tmp_path / "repo"
    Repository.init(repo, layout=layout)
    ((backup_id, expected),) = _backups(repo, image, tmp_path, 1)
    library = Repository.open(repo)
    _, (raw,) = library.restore(VM, backup_id, tmp_path / "raw", format="raw")
    assert raw.path.name == "disk0.raw" and same_content(raw.path, expected)
    assert raw.path.stat().st_blocks * 512 < raw.virtual_size // 2  # holes stayed holes
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xee" * raw.virtual_size)  # old data everywhere: holes must be zeroed
    with loop_device(backing) as device:
        if layout == "qcow2":
            with pytest.raises(UnsupportedError, match="block device"):
                library.restore(VM, backup_id, tmp_path / "x", devices={VM: device})
            return
        _, (written,) = library.restore(VM, backup_id, tmp_path / "x", devices={VM: device})
        assert written.path == device
    assert same_content(backing, expected)
