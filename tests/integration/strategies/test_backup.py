"""The backup strategy (blockdev-backup): the shared contract in push and pull mode, plus what only it does —
targets that are the backup, private permissions, NBD pull with a dirty bitmap, and atomic failure."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningVm
from tests.integration.strategies.contract import (
    Lab,
    MiB,
    QemuImageLab,
    StrategyContract,
    compare_images,
    images_differ,
    run,
)
from vmsnap.errors import SnapshotError, UsageError, VmsnapError
from vmsnap.lab.qemu import qemu_io
from vmsnap.model import Disk
from vmsnap.strategies.base import Strategy
from vmsnap.strategies.blockdev_backup.plan import fleece_nodes, target_node
from vmsnap.strategies.blockdev_backup.strategy import (
    BlockdevBackupStrategy,
    Fleecing,
    IncrementalFallbackWarning,
)
from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine


def backup_dir(machine: Machine) -> Path:
    """Where a lab's backups go: next to its images, so a powered-off lab finds them again."""
    if isinstance(machine, QemuMachine):
        return machine.qmp_socket.parent / "backups"
    assert isinstance(machine, OfflineMachine)
    return machine.images[0].parent / "backups"


class TestBackupContract(StrategyContract):
    strategy_name = "backup"
    several_snapshots = False  # one backup per disk and target directory: target_dir/<disk>.qcow2

    def make_strategy(self, machine: Machine) -> Strategy:
        return BlockdevBackupStrategy(machine, target_dir=backup_dir(machine))


class FleecingLab(QemuImageLab):
    """While fleecing, a device's node is the copy-before-write filter: read the images themselves."""

    def capture(self, disk: str, dest: Path) -> Path:
        if self.is_running():
            qemu_io(self.machine.qmp(), disk, "flush")
        run(["qemu-img", "convert", "-U", "-f", "qcow2", str(self.images[disk]), "-O", "qcow2", str(dest)])
        return dest


class TestBackupPullContract(StrategyContract):
    """Pull mode: fleecing (copy-before-write + snapshot-access) read through QEMU's NBD server."""

    strategy_name = "backup"
    several_snapshots = False
    modes = ("online",)  # offline pull (qemu-nbd serves the image) is tested in test_backup_offline.py

    def make_lab(self, mode: str, tmp_path: Path) -> Lab:
        return FleecingLab(tmp_path, online=mode == "online")

    def make_strategy(self, machine: Machine) -> Strategy:
        mode = "pull" if machine.is_running else "push"
        return BlockdevBackupStrategy(machine, target_dir=backup_dir(machine), mode=mode)

    # a pull backup is read by the NBD client: there is no target to roll back to
    test_rollback_returns_exactly_the_snapshot_bytes = None  # type: ignore[assignment]


class TestBackupPullByJobContract(TestBackupPullContract):
    """Pull mode with the older fleecing: a blockdev-backup sync=none job into an overlay on the disk."""

    def make_strategy(self, machine: Machine) -> Strategy:
        mode = "pull" if machine.is_running else "push"
        return BlockdevBackupStrategy(machine, target_dir=backup_dir(machine), mode=mode, fleecing="job")


# -- push: what the target is -------------------------------------------------------------------------------


def _capture(vm: RunningVm, disk: str, dest: Path) -> Path:
    qemu_io(vm.machine.qmp(), disk, "flush")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.images[disk]), str(dest)], check=True)
    return dest


def _no_leftovers(vm: RunningVm, disks: list[Disk]) -> None:
    qmp = vm.machine.qmp()
    assert qmp.query_jobs() == []
    ours = {target_node(d.name) for d in disks} | {n for d in disks for n in fleece_nodes(d.name).values()}
    assert not (qmp.node_names() & ours)
    assert [b["qdev"] for b in qmp.query_block()] and all(
        b["inserted"]["node-name"] == f"fmt-{d.name}" for b, d in zip(qmp.query_block(), disks, strict=True)
    )


def _bitmaps(vm: RunningVm, disk: str) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in vm.machine.qmp().dirty_bitmaps(f"fmt-{disk}")}


def test_full_backup_is_a_private_standalone_image_of_create_time(
    two_disk_vm: RunningVm, tmp_path: Path
) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x5a 1M 3M")
    qemu_io(qmp, "disk1", "write -P 0xa5 10M 64k")
    expected = {d: _capture(vm, d, tmp_path / f"expected-{d}.qcow2") for d in ("disk0", "disk1")}
    target_dir = tmp_path / "out" / "b1"
    strategy = BlockdevBackupStrategy(vm.machine, target_dir=target_dir)
    disks = vm.machine.disks()
    refs = strategy.create(disks, name="b1")
    qemu_io(qmp, "disk0", "write -P 0x77 2M 1M")  # after create: must not reach the backup
    qemu_io(qmp, "disk1", "write -P 0x78 0 1M")
    for ref in refs:
        assert ref.details["kind"] == "full" and ref.details["fallback"] == ""
        assert ref.details["bitmap"] == "vmsnap"
        target = Path(ref.details["target"])
        assert target == target_dir / f"{ref.disk.name}.qcow2"
        assert (target.stat().st_mode & 0o777) == 0o600
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(target)], capture_output=True, check=True
            ).stdout
        )
        assert "backing-filename" not in info
        compare_images(target, expected[ref.disk.name])
    assert (target_dir.stat().st_mode & 0o777) == 0o700
    now = _capture(vm, "disk0", tmp_path / "now.qcow2")
    assert images_differ(now, expected["disk0"])
    # the bitmap starts exactly at the backup point: it holds only what was written after create
    assert _bitmaps(vm, "disk0")["vmsnap"]["count"] == 1 * MiB
    assert _bitmaps(vm, "disk1")["vmsnap"]["count"] == 1 * MiB
    assert set(_bitmaps(vm, "disk0")) == {"vmsnap"}
    for ref in refs:
        strategy.delete(ref)
        assert Path(ref.details["target"]).exists(), "a complete backup is the caller's, delete keeps it"
    _no_leftovers(vm, disks)
    assert strategy.list() == []


def test_export_waits_for_a_backup_started_without_waiting(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x31 0 8M")
    expected = _capture(vm, "disk0", tmp_path / "expected.qcow2")
    strategy = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "b", wait=False)
    refs = strategy.create(vm.machine.disks(), name="b1")
    qemu_io(qmp, "disk0", "write -P 0x32 0 8M")
    with strategy.export(refs[0]) as source:
        assert source.kind == "file" and source.format == "qcow2"
        compare_images(Path(source.location), expected)
    strategy.export(refs[1]).__enter__()
    for ref in refs:
        strategy.delete(ref)
    _no_leftovers(vm, vm.machine.disks())
    assert set(_bitmaps(vm, "disk0")) == {"vmsnap"}  # both confirmed: the pending bits are gone


def test_a_failing_action_leaves_no_bitmap_job_node_or_file(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    disks = vm.machine.disks()
    first = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "full")
    first.create(disks, name="full")
    qemu_io(qmp, "disk0", "write -P 0x41 0 2M")
    qemu_io(qmp, "disk1", "write -P 0x42 0 1M")
    before = {d: _bitmaps(vm, d) for d in ("disk0", "disk1")}
    parents = {d.name: tmp_path / "full" / f"{d.name}.qcow2" for d in disks}
    bogus = Disk("bogus", "no-such-node", tmp_path / "nothing.qcow2", "qcow2", disks[0].virtual_size)
    parents["bogus"] = parents["disk0"]
    strategy = BlockdevBackupStrategy(
        vm.machine, target_dir=tmp_path / "inc", incremental=True, parents=parents
    )
    # the bogus disk has no bitmap: a full backup is tried, and fails
    with pytest.warns(IncrementalFallbackWarning), pytest.raises(SnapshotError) as info:
        strategy.create([*disks, bogus], name="inc")
    assert "\n" not in str(info.value)
    assert {d: _bitmaps(vm, d) for d in ("disk0", "disk1")} == before
    _no_leftovers(vm, disks)
    assert sorted(os.listdir(tmp_path / "inc")) == []
    # and the same incremental without the bogus disk works, with exactly the bits from before
    del parents["bogus"]
    refs = BlockdevBackupStrategy(
        vm.machine, target_dir=tmp_path / "inc2", incremental=True, parents=parents
    ).create(disks, name="inc2")
    assert [r.details["kind"] for r in refs] == ["incremental", "incremental"]


def test_existing_target_and_bad_options_are_refused(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    vm = two_disk_vm
    with pytest.raises(UsageError):
        BlockdevBackupStrategy(vm.machine, target_dir=tmp_path, mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        BlockdevBackupStrategy(vm.machine, target_dir=tmp_path, bitmap="../b")
    target_dir = tmp_path / "t"
    target_dir.mkdir()
    (target_dir / "disk1.qcow2").write_bytes(b"precious")
    strategy = BlockdevBackupStrategy(vm.machine, target_dir=target_dir)
    with pytest.raises(UsageError, match="disk1"):
        strategy.create(vm.machine.disks(), name="b1")
    assert (target_dir / "disk1.qcow2").read_bytes() == b"precious"
    assert not (target_dir / "disk0.qcow2").exists()
    _no_leftovers(vm, vm.machine.disks())
    assert _bitmaps(vm, "disk0") == {}


def test_offline_full_backup_resets_the_bitmap_for_later_online_incrementals(tmp_path: Path) -> None:
    image = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(image)], check=True, capture_output=True
    )
    strategy = BlockdevBackupStrategy(OfflineMachine([image]), target_dir=tmp_path / "b")
    (ref,) = strategy.create(OfflineMachine([image]).disks(), name="b1")
    compare_images(Path(ref.details["target"]), image)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)], capture_output=True, check=True
        ).stdout
    )
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["vmsnap"]


# -- pull: NBD with the dirty bitmap ---------------------------------------------------------------------


def _nbd_dirty_extents(uri: str, context: str) -> list[tuple[int, int]]:
    out = subprocess.run(["nbdinfo", f"--map={context}", "--json", uri], capture_output=True, check=True)
    return [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] & 1]


def _raw(path: Path, fmt: str = "qcow2") -> bytes:
    raw = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(raw)], check=True)
    data = raw.read_bytes()
    raw.unlink()
    return data


@pytest.mark.parametrize("fleecing", ["filter", "job"])
def test_pull_incremental_exports_exactly_the_changed_blocks(
    two_disk_vm: RunningVm, tmp_path: Path, fleecing: Fleecing
) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    disks = vm.machine.disks()
    qemu_io(qmp, "disk0", "write -P 0x11 0 4M")
    full = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "full")
    full.create(disks, name="full")
    base = _raw(tmp_path / "full" / "disk0.qcow2")
    qemu_io(qmp, "disk0", "write -P 0x22 1M 100k")
    qemu_io(qmp, "disk0", "write -P 0x23 40M 64k")
    expected = _raw(_capture(vm, "disk0", tmp_path / "expected.qcow2"))
    parents = {d.name: tmp_path / "full" / f"{d.name}.qcow2" for d in disks}
    pull = BlockdevBackupStrategy(
        vm.machine,
        target_dir=tmp_path / "pull",
        incremental=True,
        parents=parents,
        mode="pull",
        fleecing=fleecing,
    )
    refs = pull.create(disks, name="inc")
    assert refs[0].details["fleecing"] == fleecing
    if fleecing == "filter":
        qdev, cbw = refs[0].details["qdev"], refs[0].details["cbw"]
        assert qmp.query_block()[0]["inserted"]["node-name"] == cbw
        qmp.set_device_node(qdev, cbw)  # qom-set to the node a device already has aborts QEMU: skipped
        assert vm.process.alive()
    qemu_io(qmp, "disk0", "write -P 0x99 0 8M")  # after the backup point: invisible through the export
    with pull.export(refs[0]) as source:
        assert source.kind == "nbd" and source.dirty_bitmap
        extents = _nbd_dirty_extents(source.location, source.dirty_bitmap)
        pulled = tmp_path / "pulled.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", source.location, str(pulled)], check=True
        )
    data = bytearray(base)
    snapshot = pulled.read_bytes()
    for offset, length in extents:
        data[offset : offset + length] = snapshot[offset : offset + length]
    assert bytes(data) == expected
    assert sum(length for _, length in extents) <= 4 * 64 * 1024  # the changed clusters, not the disk
    with pull.export(refs[1]) as source:
        assert _nbd_dirty_extents(source.location, source.dirty_bitmap or "") == []
    for ref in refs:
        pull.delete(ref)
    _no_leftovers(vm, disks)
    # both disks confirmed: the bitmap counts from the pull's backup point (the 8M write only)
    assert _bitmaps(vm, "disk0")["vmsnap"]["count"] == 8 * MiB
    assert set(_bitmaps(vm, "disk0")) == {"vmsnap"}


@pytest.mark.parametrize("fleecing", ["filter", "job"])
def test_pull_not_read_gives_the_bits_back(
    two_disk_vm: RunningVm, tmp_path: Path, fleecing: Fleecing
) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    disks = vm.machine.disks()
    BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "full").create(disks, name="full")
    qemu_io(qmp, "disk0", "write -P 0x22 1M 1M")
    parents = {d.name: tmp_path / "full" / f"{d.name}.qcow2" for d in disks}
    pull = BlockdevBackupStrategy(
        vm.machine,
        target_dir=tmp_path / "pull",
        incremental=True,
        parents=parents,
        mode="pull",
        fleecing=fleecing,
    )
    refs = pull.create(disks, name="inc")
    qemu_io(qmp, "disk0", "write -P 0x33 10M 1M")
    with pytest.raises(RuntimeError), pull.export(refs[0]):
        raise RuntimeError("the NBD client died")
    for ref in refs:
        pull.delete(ref)
    _no_leftovers(vm, disks)
    assert _bitmaps(vm, "disk0")["vmsnap"]["count"] == 2 * MiB  # before + after the failed pull
    assert set(_bitmaps(vm, "disk0")) == {"vmsnap"}


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: backup jobs writing more than that fail with ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_failing_job_keeps_every_disks_bits_and_removes_every_target(
    two_disk_vm: RunningVm, tmp_path: Path, tiny_fs: Path
) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    disks = vm.machine.disks()
    BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "full").create(disks, name="full")
    qemu_io(qmp, "disk0", "write -P 0x51 0 4M")  # too much for the tiny filesystem
    qemu_io(qmp, "disk1", "write -P 0x52 0 64k")  # fits: this disk's job succeeds
    before = {d: _bitmaps(vm, d) for d in ("disk0", "disk1")}
    parents = {d.name: tmp_path / "full" / f"{d.name}.qcow2" for d in disks}
    strategy = BlockdevBackupStrategy(
        vm.machine, target_dir=tiny_fs / "inc", incremental=True, parents=parents
    )
    with pytest.raises(SnapshotError) as info:
        strategy.create(disks, name="inc")
    assert "disk0" in str(info.value)
    assert {d: _bitmaps(vm, d) for d in ("disk0", "disk1")} == before
    _no_leftovers(vm, disks)
    assert os.listdir(tiny_fs / "inc") == []
    assert strategy.list() == []


def test_rollback_refuses_a_running_vm_and_a_missing_backup(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    vm = two_disk_vm
    strategy = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "b")
    refs = strategy.create(vm.machine.disks(), name="b1")
    with pytest.raises(SnapshotError, match="while the VM runs"):
        strategy.rollback(refs[0])
    offline = BlockdevBackupStrategy(OfflineMachine([vm.images["disk0"]]), target_dir=tmp_path / "b")
    Path(refs[0].details["target"]).unlink()
    vm.machine.close()
    vm.process.stop()
    with pytest.raises(VmsnapError, match="does not exist"):
        offline.rollback(refs[0])


def test_auto_fleecing_falls_back_to_the_job_where_no_device_can_be_swapped(
    two_disk_vm: RunningVm, tmp_path: Path
) -> None:
    """A node that no guest device uses (an export, a qemu-storage-daemon image) gets no filter put
    above it: fleecing='auto' takes the sync=none job there, for all disks of the backup."""
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    image = tmp_path / "loose.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x4c 0 1M", str(image)], check=True, capture_output=True
    )
    qmp.blockdev_add(
        {"driver": "qcow2", "node-name": "loose", "file": {"driver": "file", "filename": str(image)}}
    )
    loose = Disk("loose", "loose", image, "qcow2", 64 * MiB)
    disks = [vm.machine.disks()[0], loose]
    pull = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "pull", mode="pull")
    refs = pull.create(disks, name="p1")
    assert {r.details["fleecing"] for r in refs} == {"job"}
    assert not (qmp.node_names() & set(fleece_nodes("disk0").values()) - {fleece_nodes("disk0")["fleece"]})
    with pull.export(refs[1]) as source:
        pulled = tmp_path / "pulled.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", source.location, str(pulled)], check=True
        )
    assert pulled.read_bytes()[: 1 * MiB] == b"\x4c" * MiB
    for ref in refs:
        pull.delete(ref)
    _no_leftovers(vm, vm.machine.disks())
    assert not (tmp_path / "pull" / "loose.fleece").exists()


def test_push_targets_bypass_the_page_cache(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x3c 1M 2M")
    expected = _capture(vm, "disk0", tmp_path / "expected.qcow2")
    target_dir = tmp_path / "b"
    strategy = BlockdevBackupStrategy(vm.machine, target_dir=target_dir, wait=False)
    refs = strategy.create(vm.machine.disks(), name="b1")
    files = {n["file"]: n["cache"]["direct"] for n in qmp.query_named_block_nodes() if n.get("drv") == "file"}
    assert files[str(target_dir / "disk0.qcow2")] is True  # O_DIRECT (a filesystem without it: default)
    with strategy.export(refs[0]) as source:
        compare_images(Path(source.location), expected)
    for ref in refs:
        strategy.delete(ref)
    _no_leftovers(vm, vm.machine.disks())


def test_a_dead_pull_runs_filters_are_found_by_list_and_removed_by_delete(
    two_disk_vm: RunningVm, tmp_path: Path
) -> None:
    """A run that died after the filters went in but before it recorded its backups: list() finds the
    fleecing graph in QEMU (the disk's node under the filter from the block graph) and delete() puts every
    device back on its own node and gives the bits back."""
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    disks = vm.machine.disks()
    BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "full").create(disks, name="full")
    qemu_io(qmp, "disk0", "write -P 0x21 0 1M")
    pull = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "dead", mode="pull", fleecing="filter")
    refs = pull.create(disks, name="dead")
    for ref in refs:
        (tmp_path / "dead" / f".{ref.disk.name}.vmsnap-backup.json").unlink()  # as if it died before
    assert qmp.filter_child(refs[0].details["cbw"]) == "fmt-disk0"
    recover = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "dead")
    found = recover.list()
    assert sorted(r.disk.name for r in found) == ["disk0", "disk1"]
    assert {r.details["device_node"] for r in found} == {"fmt-disk0", "fmt-disk1"}
    for ref in found:
        recover.delete(ref)
    _no_leftovers(vm, disks)
    assert _bitmaps(vm, "disk0")["vmsnap"]["count"] == 1 * MiB
    assert set(_bitmaps(vm, "disk0")) == {"vmsnap"}


def test_delete_stops_the_nbd_server_a_dead_export_left(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    """An export that was never left (the process died while a client read it): delete, from another
    strategy object as `vmsnap recover` makes it, removes the export and stops QEMU's NBD server."""
    vm = two_disk_vm
    qmp = vm.machine.qmp()
    pull = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "pull", mode="pull")
    refs = pull.create(vm.machine.disks(), name="p1")
    serving = pull.export(refs[0])
    source = serving.__enter__()  # never left: the export and the server stay
    socket = Path(source.location.split("socket=", 1)[1])
    assert socket.is_socket() and (socket.parent.stat().st_mode & 0o777) == 0o700
    assert [e["id"] for e in qmp.query_block_exports()] == [refs[0].details["export"]]
    recover = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "pull")
    for ref in recover.list():
        recover.delete(ref)
    assert qmp.query_block_exports() == []
    assert not socket.parent.exists()
    _no_leftovers(vm, vm.machine.disks())
    other = tmp_path / "other.sock"
    qmp.nbd_server_start(other)  # QEMU runs one NBD server: ours is gone
    qmp.nbd_server_stop()
    del serving
