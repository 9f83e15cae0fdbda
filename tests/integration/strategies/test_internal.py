"""The internal (qcow2 internal snapshot) strategy: the shared contract, plus VM state, bitmaps, warnings."""

from __future__ import annotations

import json
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.strategies.contract import (
    StrategyContract,
    compare_images,
    connect_machine,
    images_differ,
    run,
)
from vmsnap.errors import NotFoundError, SnapshotError, UnsupportedError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.model import Disk, SnapshotRef
from vmsnap.strategies.internal import InternalSnapshotStrategy, LazyRefcountsWarning
from vmsnap.vm.machine import OfflineMachine, QemuMachine

pytestmark = pytest.mark.filterwarnings("ignore::vmsnap.strategies.internal.LazyRefcountsWarning")


class TestInternalContract(StrategyContract):
    strategy_name = "internal"


class TestInternalContractFileExport(StrategyContract):
    """The same contract with the snapshot read as a file source (qemu-img -l) instead of qemu-nbd."""

    strategy_name = "internal"

    def strategy_options(self) -> dict[str, str]:
        return {"export_via": "file"}

    # only the tests that export differ from the nbd run; skip the rest to keep the suite fast
    test_declares_name_traits_and_when_to_pick_it = None  # type: ignore[assignment]
    test_probe_accepts_the_lab_disks = None  # type: ignore[assignment]
    test_list_shows_what_exists = None  # type: ignore[assignment]
    test_delete_keeps_the_original_chain_and_all_data = None  # type: ignore[assignment]
    test_rollback_returns_exactly_the_snapshot_bytes = None  # type: ignore[assignment]
    test_a_failing_disk_leaves_no_snapshot_on_any_disk = None  # type: ignore[assignment]
    test_bad_names_are_refused_before_anything_happens = None  # type: ignore[assignment]
    test_two_snapshots_export_and_delete_independently = None  # type: ignore[assignment]
    test_rollback_to_the_older_of_two_snapshots = None  # type: ignore[assignment]
    test_an_existing_name_is_refused_and_the_snapshot_kept = None  # type: ignore[assignment]


# -- beyond the contract ---------------------------------------------------------------------------


def _vm(
    tmp_path: Path, *, extra_args: Sequence[str] = (), lazy: bool = False
) -> tuple[QemuProcess, QemuMachine]:
    images = [tmp_path / "disk0.qcow2", tmp_path / "disk1.qcow2"]
    for image in images:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if lazy:
            argv += ["-o", "lazy_refcounts=on"]
        subprocess.run([*argv, str(image), "64M"], check=True)
    drives = [DriveSpec(images[0], "disk0"), DriveSpec(images[1], "disk1", bus="scsi")]
    process = QemuProcess(tmp_path, drives, name="testvm", extra_args=extra_args).start()
    try:
        return process, connect_machine(process.qmp_socket)
    except BaseException:
        process.kill()
        raise


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[tuple[QemuProcess, QemuMachine]]:
    process, machine = _vm(tmp_path, extra_args=["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"])
    try:
        yield process, machine
    finally:
        machine.close()
        process.stop()
        process.kill()


def _capture(machine: QemuMachine, disk: Disk, dest: Path) -> Path:
    qemu_io(machine.qmp(), disk.name, "flush")
    run(["qemu-img", "convert", "-U", "-f", "qcow2", str(disk.file), "-O", "qcow2", str(dest)])
    return dest


def test_vm_state_snapshot_rolls_a_running_vm_back(
    vm: tuple[QemuProcess, QemuMachine], tmp_path: Path
) -> None:
    process, machine = vm
    strategy = InternalSnapshotStrategy(machine, vm_state=True)
    qmp = machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x61 0 1M")
    qemu_io(qmp, "disk1", "write -P 0x62 1M 1M")
    disks = machine.disks()
    expected = [_capture(machine, d, tmp_path / f"exp-{d.name}.qcow2") for d in disks]
    refs = strategy.create(disks, name="withram")
    # the VM was paused while its state was saved: a measured pause, not a default
    assert strategy.last_pause_ms is not None and strategy.last_pause_ms > 0
    pause_of_create = strategy.last_pause_ms
    assert qmp.status() == "running"
    assert int(refs[0].details["vm_state_size"]) > 0
    qemu_io(qmp, "disk0", "write -P 0x71 512k 1M")
    qemu_io(qmp, "disk1", "write -P 0x72 0 4M")
    strategy.rollback(refs[0])  # loads RAM and every disk of the snapshot
    assert qmp.status() == "running"
    assert strategy.last_pause_ms is not None and strategy.last_pause_ms > 0
    assert strategy.last_pause_ms != pause_of_create  # the rollback's own pause was measured
    for disk, exp in zip(machine.disks(), expected, strict=True):
        compare_images(_capture(machine, disk, tmp_path / f"now-{disk.name}.qcow2"), exp)
    assert process.alive()


def test_failed_vm_state_load_resumes_the_vm(vm: tuple[QemuProcess, QemuMachine], tmp_path: Path) -> None:
    _, machine = vm
    strategy = InternalSnapshotStrategy(machine, vm_state=True)
    refs = strategy.create(machine.disks(), name="whole-vm")
    qmp = machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x44 0 1M")
    disk0 = machine.disks()[0]
    now = _capture(machine, disk0, tmp_path / "now.qcow2")
    # disk1 loses the snapshot: loading RAM with disk1 not reverted would corrupt a guest, so QEMU refuses
    # (after pausing the VM for the load)
    qmp.execute("blockdev-snapshot-delete-internal-sync", {"device": "fmt-disk1", "name": "whole-vm"})
    with pytest.raises(SnapshotError, match="snapshot-load") as info:
        strategy.rollback(refs[0])
    assert "resumed" in str(info.value)
    assert qmp.status() == "running"
    compare_images(_capture(machine, disk0, tmp_path / "after.qcow2"), now)


def test_rollback_is_refused_while_dirty_bitmaps_exist(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk0.qcow2")
    machine = OfflineMachine([image])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(image)])
    expected = run_copy(image, tmp_path / "expected.qcow2")
    strategy = InternalSnapshotStrategy(machine)
    (ref,) = strategy.create(machine.disks(), name="s1")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 1M", str(image)])
    run(["qemu-img", "bitmap", "--add", str(image), "backup-chain"])
    with pytest.raises(SnapshotError, match="backup-chain") as info:
        strategy.rollback(ref)
    assert "drop" in str(info.value) and "full" in str(info.value)
    assert images_differ(run_copy(image, tmp_path / "now.qcow2"), expected)  # nothing reverted
    InternalSnapshotStrategy(machine, drop_bitmaps=True).rollback(ref)
    compare_images(run_copy(image, tmp_path / "rolled.qcow2"), expected)
    assert "bitmaps" not in json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout).get(
        "format-specific", {}
    ).get("data", {})


def test_online_rollback_refuses_with_bitmaps_before_anything(vm: tuple[QemuProcess, QemuMachine]) -> None:
    _, machine = vm
    strategy = InternalSnapshotStrategy(machine, vm_state=True)
    refs = strategy.create(machine.disks(), name="s1")
    qmp = machine.qmp()
    qmp.execute("block-dirty-bitmap-add", {"node": "fmt-disk0", "name": "b0", "persistent": True})
    with pytest.raises(SnapshotError, match="b0"):
        strategy.rollback(refs[0])
    assert qmp.status() == "running"
    assert [b["name"] for b in qmp.dirty_bitmaps("fmt-disk0")] == ["b0"]


def test_lazy_refcounts_off_warns_and_on_does_not(tmp_path: Path) -> None:
    off = OfflineMachine([make_image(tmp_path / "off.qcow2")])
    with pytest.warns(LazyRefcountsWarning, match="lazy_refcounts"):
        strategy = InternalSnapshotStrategy(off)
        strategy.create(off.disks(), name="s1")
    assert len(strategy.warnings) == 1
    on_image = tmp_path / "on.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(on_image), "64M"])
    on = OfflineMachine([on_image])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy = InternalSnapshotStrategy(on)
        strategy.create(on.disks(), name="s1")
    assert strategy.warnings == []


def test_raw_disks_are_refused_with_a_hint(tmp_path: Path) -> None:
    raw = make_image(tmp_path / "disk.raw", fmt="raw")
    machine = OfflineMachine([raw])
    strategy = InternalSnapshotStrategy(machine)
    assert not strategy.probe(machine.disks()[0])
    with pytest.raises(UnsupportedError, match="qcow2"):
        strategy.create(machine.disks(), name="s1")


def test_offline_snapshot_of_an_image_a_running_qemu_holds_is_refused(
    vm: tuple[QemuProcess, QemuMachine],
) -> None:
    _, running = vm
    offline = OfflineMachine([d.file for d in running.disks()])
    with pytest.raises(SnapshotError, match="no snapshot was kept"):
        InternalSnapshotStrategy(offline).create(offline.disks(), name="s1")
    assert InternalSnapshotStrategy(running).list() == []


def test_missing_snapshot_is_not_found(tmp_path: Path) -> None:
    machine = OfflineMachine([make_image(tmp_path / "disk0.qcow2")])
    strategy = InternalSnapshotStrategy(machine)
    ghost = SnapshotRef("internal", "ghost", machine.disks()[0], location=str(machine.images[0]))
    for action in (strategy.delete, strategy.rollback):
        with pytest.raises(NotFoundError, match="ghost"):
            action(ghost)
    with pytest.raises(NotFoundError), strategy.export(ghost):
        pass


def run_copy(image: Path, dest: Path) -> Path:
    run(["qemu-img", "convert", "-U", "-f", "qcow2", str(image), "-O", "qcow2", str(dest)])
    return dest


def test_vm_state_needs_a_running_vm(tmp_path: Path) -> None:
    machine = OfflineMachine([make_image(tmp_path / "disk0.qcow2")])
    with pytest.raises(UnsupportedError, match="not running"):
        InternalSnapshotStrategy(machine, vm_state=True).create(machine.disks(), name="s1")
    assert InternalSnapshotStrategy(machine).list() == []
