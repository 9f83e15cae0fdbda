"""The backup strategy on powered-off images: incrementals from the image's persistent dirty bitmap
(``qemu-img bitmap`` parks the bits, ``qemu-nbd --bitmap`` serves them), in push mode (the strategy writes
the overlay) and pull mode (an NBD client reads it), with the same pending-bitmap safety as online; and
through the CLI with ``--image``, restored and compared."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli, qcow2_repo, same_content
from tests.integration.strategies.contract import MiB, compare_images, read_export
from vmsnap.model import SnapshotRef
from vmsnap.strategies.blockdev_backup import BlockdevBackupStrategy
from vmsnap.strategies.blockdev_backup.strategy import IncrementalFallbackWarning, Mode
from vmsnap.vm.machine import OfflineMachine


def qemu_io(image: Path, command: str, fmt: str = "qcow2") -> None:
    """Write into a powered-off image as a VM would (qemu-io keeps its persistent bitmaps recording)."""
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(image)], check=True, capture_output=True)


def bitmaps(image: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, check=True)
    return [b["name"] for b in json.loads(out.stdout)["format-specific"]["data"].get("bitmaps", [])]


def dirty_extents(uri: str, context: str) -> list[tuple[int, int]]:
    out = subprocess.run(["nbdinfo", f"--map={context}", "--json", uri], capture_output=True, check=True)
    return [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] & 1]


def backing_of(image: Path) -> str | None:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, check=True)
    value = json.loads(out.stdout).get("backing-filename")
    return str(value) if value is not None else None


def take(
    image: Path, target_dir: Path, *, parent: Path | None = None, mode: Mode = "push"
) -> tuple[BlockdevBackupStrategy, SnapshotRef]:
    """One offline backup of ``image`` (incremental on ``parent`` when given)."""
    machine = OfflineMachine([image])
    strategy = BlockdevBackupStrategy(
        machine,
        target_dir=target_dir,
        incremental=parent is not None,
        parents={"disk0": parent} if parent is not None else None,
        parent_id=parent.parent.name if parent is not None else None,
        mode=mode,
    )
    (ref,) = strategy.create(machine.disks(), name=target_dir.name)
    return strategy, ref


@pytest.fixture
def image(tmp_path: Path) -> Path:
    disk = make_image(tmp_path / "disk0.qcow2")
    qemu_io(disk, "write -P 0x61 0 4M")
    return disk


def test_push_incremental_holds_exactly_what_the_bitmap_marks(image: Path, tmp_path: Path) -> None:
    full, ref0 = take(image, tmp_path / "b0")
    assert ref0.details["kind"] == "full"
    full.delete(ref0)
    at_b0 = tmp_path / "at-b0.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(at_b0)], check=True)
    qemu_io(image, "write -P 0x62 1M 64k")
    qemu_io(image, "write -z 2M 64k")  # zeros over old data: the incremental must hide the parent's bytes
    qemu_io(image, "write -P 0x63 40M 1M")

    strategy, ref = take(image, tmp_path / "b1", parent=tmp_path / "b0" / "disk0.qcow2")
    assert ref.details["kind"] == "incremental" and ref.details["fallback"] == ""
    target = Path(ref.details["target"])
    assert backing_of(target) == "../b0/disk0.qcow2"
    assert (target.stat().st_mode & 0o777) == 0o600
    compare_images(target, image)  # the chain reads as the image does now
    assert target.stat().st_blocks * 512 < 3 * MiB  # the changed clusters, not the disk
    assert bitmaps(image) == ["vmsnap"]  # the pending bits were dropped once the target was complete
    with strategy.export(ref) as source:
        assert source.kind == "file" and source.since == "b0" and Path(source.location) == target
    strategy.delete(ref)
    assert target.exists() and strategy.list() == []

    # the bitmap counts from the incremental on: the next one holds only the write after it
    qemu_io(image, "write -P 0x64 8M 64k")
    _, ref2 = take(image, tmp_path / "b2", parent=target)
    compare_images(Path(ref2.details["target"]), image)
    assert Path(ref2.details["target"]).stat().st_blocks * 512 < 1 * MiB
    assert not same_content(at_b0, image)  # the comparisons above could fail


def test_pull_serves_the_image_with_the_bits_and_settles_them_after_reading(
    image: Path, tmp_path: Path
) -> None:
    take(image, tmp_path / "b0")
    qemu_io(image, "write -P 0x72 10M 128k")
    strategy, ref = take(image, tmp_path / "p1", parent=tmp_path / "b0" / "disk0.qcow2", mode="pull")
    assert set(bitmaps(image)) == {"vmsnap", "vmsnap.pending"}  # parked until the read succeeded
    with strategy.export(ref) as source:
        assert source.kind == "nbd" and source.since == "b0"
        assert source.dirty_bitmap == "qemu:dirty-bitmap:vmsnap.pending"
        assert dirty_extents(source.location, source.dirty_bitmap) == [(10 * MiB, 128 * 1024)]
        copy = read_export(source, tmp_path / "pulled.qcow2")
    compare_images(copy, image)
    assert bitmaps(image) == ["vmsnap"]
    strategy.delete(ref)
    assert strategy.list() == []


def test_a_pull_not_read_and_a_dead_runs_pending_bitmap_give_the_bits_back(
    image: Path, tmp_path: Path
) -> None:
    take(image, tmp_path / "b0")
    parent = tmp_path / "b0" / "disk0.qcow2"
    qemu_io(image, "write -P 0x81 3M 64k")
    strategy, ref = take(image, tmp_path / "p1", parent=parent, mode="pull")
    with pytest.raises(RuntimeError), strategy.export(ref):
        raise RuntimeError("the NBD client died")
    strategy.delete(ref)
    assert bitmaps(image) == ["vmsnap"]
    qemu_io(image, "write -P 0x82 20M 64k")
    take(image, tmp_path / "dead", parent=parent, mode="pull")  # dies after create: bits left parked
    qemu_io(image, "write -P 0x83 30M 64k")
    strategy, ref = take(image, tmp_path / "p2", parent=parent, mode="pull")
    with strategy.export(ref) as source:
        extents = dirty_extents(source.location, source.dirty_bitmap or "")
    assert extents == [(3 * MiB, 64 * 1024), (20 * MiB, 64 * 1024), (30 * MiB, 64 * 1024)]
    strategy.delete(ref)


def test_a_raw_image_falls_back_to_a_full_backup(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk0.raw", fmt="raw")
    qemu_io(image, "write -P 0x91 0 1M", fmt="raw")
    take(image, tmp_path / "b0")
    with pytest.warns(IncrementalFallbackWarning, match="does not exist"):
        _, ref = take(image, tmp_path / "b1", parent=tmp_path / "b0" / "disk0.qcow2")
    assert ref.details["kind"] == "full"
    assert backing_of(Path(ref.details["target"])) is None
    compare_images(Path(ref.details["target"]), make_copy(image, tmp_path / "now.qcow2"))


def make_copy(image: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(dest)], check=True)
    return dest


@pytest.mark.parametrize(
    ("layout", "transport", "recorded"),
    [("qcow2", [], "none"), ("qcow2", ["--transport", "nbd"], "nbd"), ("chunks", [], "nbd")],
    ids=["qcow2-push", "qcow2-pull", "chunks-pull"],
)
def test_incrementals_of_a_powered_off_image_through_the_cli(
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: str,
    transport: list[str],
    recorded: str,
) -> None:
    repo = qcow2_repo(tmp_path / "repo") if layout == "qcow2" else tmp_path / "repo"
    argv = ["backup", "--repo", repo, "--image", image, "--strategy", "backup", *transport, "--json"]
    first = cli(capsys, *argv)
    assert first.code == 0, first.err
    full = first.json()
    assert full["kind"] == "full"
    at_full = make_copy(image, tmp_path / "at-full.qcow2")
    qemu_io(image, "write -P 0xb2 40M 3M")  # the persistent bitmap records it

    second = cli(capsys, *argv, "--incremental")
    assert second.code == 0, second.err
    incremental = second.json()
    assert incremental["kind"] == "incremental"
    assert incremental["transport"] == recorded  # chunks: qemu-nbd serves the image with its bitmap
    (disk,) = incremental["disks"]
    assert disk["bytes_written"] < 8 * MiB  # the 3 MiB that changed (plus qcow2 metadata), not 64 MiB

    for backup_id, expected in ((full["backup_id"], at_full), (incremental["backup_id"], image)):
        out = tmp_path / f"restore-{backup_id}"
        restored = cli(capsys, "restore", "--repo", repo, "--vm", "disk0", "--backup", backup_id, "--to", out)
        assert restored.code == 0, restored.err
        assert same_content(out / "disk0.qcow2", expected)
    assert not same_content(at_full, image)  # the two moments differ: the comparison above can fail
    assert cli(capsys, "verify", "--repo", repo).code == 0
    assert bitmaps(image) == ["vmsnap"]
