"""The external (overlay) strategy: the shared contract, then merge modes, raw disks, overlays a shut-down
VM left, offline snapshots merged online, and no VM left on an overlay after a failure."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from tests.conftest import make_image
from tests.integration.strategies.contract import (
    MiB,
    QemuImageLab,
    StrategyContract,
    compare_images,
    connect_machine,
    read_export,
    run,
)
from vmsnap.errors import CommandError, SnapshotError, UnsupportedError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.runner import DEFAULT_TIMEOUT, CommandResult, LocalRunner
from vmsnap.strategies.external import ExternalOverlayStrategy, overlay_path
from vmsnap.vm.machine import OfflineMachine


class TestExternalContract(StrategyContract):
    strategy_name = "external"


# -- beyond the contract ---------------------------------------------------------------------------


@pytest.fixture
def online(tmp_path: Path) -> Iterator[QemuImageLab]:
    lab = QemuImageLab(tmp_path, online=True)
    try:
        yield lab
    finally:
        lab.close()


def _snapshot_with_more_data(lab: QemuImageLab, strategy: ExternalOverlayStrategy, *, more: int) -> Path:
    lab.write("disk0", 0, 2 * MiB, 0x11)
    refs = strategy.create(lab.disks(), name="s1")
    lab.write("disk0", MiB, more, 0x22)
    assert [r.name for r in refs] == ["s1", "s1"]
    return lab.capture("disk0", lab.workdir / "after.qcow2")


def test_stream_merge_leaves_the_vm_on_the_overlay_with_all_data(online: QemuImageLab) -> None:
    strategy = ExternalOverlayStrategy(online.machine, merge="stream")
    after = _snapshot_with_more_data(online, strategy, more=MiB)
    for ref in strategy.list():
        strategy.delete(ref)
    overlay = overlay_path(online.images["disk0"], "s1")
    assert online.chain("disk0") == (overlay,)  # the overlay now holds everything, standalone
    assert online.images["disk0"].exists()  # the old image is left alone
    assert strategy.list() == []
    online.check("disk0")
    compare_images(online.capture("disk0", online.workdir / "now.qcow2"), after)


def test_auto_merge_streams_a_mostly_written_overlay(online: QemuImageLab) -> None:
    strategy = ExternalOverlayStrategy(online.machine)  # merge="auto"
    after = _snapshot_with_more_data(online, strategy, more=40 * MiB)
    (ref,) = [r for r in strategy.list() if r.disk.name == "disk0"]
    strategy.delete(ref)
    assert online.chain("disk0") == (overlay_path(online.images["disk0"], "s1"),)  # streamed, not committed
    compare_images(online.capture("disk0", online.workdir / "now.qcow2"), after)


def test_raw_disk_online_exports_raw_and_commits_back(tmp_path: Path) -> None:
    image = make_image(tmp_path / "data.raw", fmt="raw")
    process = QemuProcess(tmp_path, [DriveSpec(image, "data", format="raw")], name="rawvm").start()
    machine = connect_machine(process.qmp_socket)
    try:
        qmp = machine.qmp()
        qemu_io(qmp, "data", "write -P 0x31 0 3M")
        qemu_io(qmp, "data", "flush")
        expected = tmp_path / "expected.qcow2"
        run(["qemu-img", "convert", "-U", "-f", "raw", str(image), "-O", "qcow2", str(expected)])
        strategy = ExternalOverlayStrategy(machine)
        assert strategy.probe(machine.disks()[0])
        (ref,) = strategy.create(machine.disks(), name="s1")
        qemu_io(qmp, "data", "write -P 0x32 1M 1M")
        with strategy.export(ref) as source:
            assert (source.kind, source.format, source.location) == ("file", "raw", str(image))
            compare_images(read_export(source, tmp_path / "export.qcow2"), expected)
        strategy.delete(ref)
        assert not any(n.startswith("vmsnap-") for n in qmp.node_names())
        (disk,) = machine.disks()
        assert (disk.file, disk.format, disk.backing_chain) == (image, "raw", ())
        qemu_io(qmp, "data", "flush")
        data = image.read_bytes()
        assert data[: 1 * MiB] == b"\x31" * MiB and data[MiB : 2 * MiB] == b"\x32" * MiB
        assert data[2 * MiB : 3 * MiB] == b"\x31" * MiB
    finally:
        machine.close()
        process.stop()
        process.kill()


def test_offline_raw_image_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    image = make_image(tmp_path / "data.raw", fmt="raw")
    machine = OfflineMachine([image])
    strategy = ExternalOverlayStrategy(machine)
    assert not strategy.probe(machine.disks()[0])
    with pytest.raises(UnsupportedError, match="raw"):
        strategy.create(machine.disks(), name="s1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.raw"]


@attrs.define
class FailingRunner(LocalRunner):
    """A real local runner whose one program fails, as if the disk were full at that step."""

    failing: str = "chmod"

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        if argv[0] == self.failing:
            raise CommandError(argv, 1, "", f"{self.failing}: injected failure")
        return super().run(argv, ok_codes=ok_codes, input=input, timeout=timeout)


def test_a_failure_after_the_overlays_exist_merges_them_back(online: QemuImageLab) -> None:
    online.write("disk0", 0, MiB, 0x11)
    online.write("disk1", 0, MiB, 0x12)
    before = {d: online.capture(d, online.workdir / f"before-{d}.qcow2") for d in online.disk_names}
    chains = {d: online.chain(d) for d in online.disk_names}
    nodes = online.machine.qmp().node_names()
    strategy = ExternalOverlayStrategy(online.machine)
    strategy.runner = FailingRunner()
    with pytest.raises(SnapshotError, match="merged back"):
        strategy.create(online.disks(), name="s1")
    assert online.is_running()
    assert online.machine.qmp().node_names() == nodes  # the overlay nodes are gone too
    for disk in online.disk_names:
        assert online.chain(disk) == chains[disk]  # not left on a growing overlay
        assert not overlay_path(online.images[disk], "s1").exists()
        compare_images(online.capture(disk, online.workdir / f"now-{disk}.qcow2"), before[disk])


def test_overlays_left_by_a_shut_down_vm_are_listed_and_merged_offline(online: QemuImageLab) -> None:
    strategy = ExternalOverlayStrategy(online.machine)
    online.write("disk0", 0, MiB, 0x11)
    strategy.create(online.disks(), name="s1")
    online.write("disk0", 4 * MiB, MiB, 0x22)
    strategy.create(online.disks(), name="s2")
    online.write("disk0", 8 * MiB, MiB, 0x33)
    after = online.capture("disk0", online.workdir / "after.qcow2")
    offline = ExternalOverlayStrategy(online.power_off())  # the images are named, the VM ran on overlays
    refs = [r for r in offline.list() if r.disk.name == "disk0"]
    assert [(r.name, r.details["orphan"]) for r in refs] == [("s1", "True"), ("s2", "True")]
    offline.delete(refs[0])  # the older first: s2's overlay is rebased onto the image
    (ref2,) = [r for r in offline.list() if r.disk.name == "disk0"]
    offline.delete(ref2)
    image = online.images["disk0"]
    assert not overlay_path(image, "s1").exists() and not overlay_path(image, "s2").exists()
    run(["qemu-img", "check", str(image)])
    compare_images(online.capture("disk0", online.workdir / "now.qcow2"), after)


def test_an_offline_snapshot_is_merged_online_keeping_the_image_path(tmp_path: Path) -> None:
    lab = QemuImageLab(tmp_path, online=False)
    strategy = ExternalOverlayStrategy(lab.machine)
    lab.write("disk0", 0, MiB, 0x11)
    at_create = lab.capture("disk0", tmp_path / "at-create.qcow2")
    strategy.create(lab.disks(), name="s1")
    image = lab.images["disk0"]
    assert lab.chain("disk0") == (image, overlay_path(image, "s1"))  # the image's path stays on top
    lab.close()
    # start a VM on the very images that carry the offline snapshot
    process = QemuProcess(
        tmp_path, [DriveSpec(image, "disk0"), DriveSpec(lab.images["disk1"], "disk1", bus="scsi")], name="vm2"
    ).start()
    machine = connect_machine(process.qmp_socket)
    try:
        running = ExternalOverlayStrategy(machine)
        (ref,) = [r for r in running.list() if r.disk.name == "disk0"]
        qemu_io(machine.qmp(), "disk0", "write -P 0x22 512k 1M")
        with running.export(ref) as source:
            compare_images(read_export(source, tmp_path / "export.qcow2"), at_create)
        qemu_io(machine.qmp(), "disk0", "flush")
        after = tmp_path / "after.qcow2"
        run(["qemu-img", "convert", "-U", "-f", "qcow2", str(image), "-O", "qcow2", str(after)])
        running.delete(ref)  # streamed into the image: the VM stays on its path
        disk0 = machine.disks()[0]
        assert (disk0.file, disk0.backing_chain) == (image, ())
        assert not overlay_path(image, "s1").exists()
        qemu_io(machine.qmp(), "disk0", "flush")
        now = tmp_path / "now.qcow2"
        run(["qemu-img", "convert", "-U", "-f", "qcow2", str(image), "-O", "qcow2", str(now)])
        compare_images(now, after)
    finally:
        machine.close()
        process.stop()
        process.kill()


def test_a_leftover_overlay_file_blocks_create_with_a_hint(online: QemuImageLab) -> None:
    stray = overlay_path(online.images["disk1"], "s1")
    stray.write_bytes(b"not an overlay")
    chains = {d: online.chain(d) for d in online.disk_names}
    strategy = ExternalOverlayStrategy(online.machine)
    with pytest.raises(SnapshotError, match="recover"):
        strategy.create(online.disks(), name="s1")
    assert {d: online.chain(d) for d in online.disk_names} == chains
    assert stray.read_bytes() == b"not an overlay"
    assert not overlay_path(online.images["disk0"], "s1").exists()


def test_rollback_to_an_offline_snapshot_drops_the_overlays_a_shut_down_vm_left(tmp_path: Path) -> None:
    lab = QemuImageLab(tmp_path, online=False)
    strategy = ExternalOverlayStrategy(lab.machine)
    lab.write("disk0", 0, MiB, 0x11)
    at_a = lab.capture("disk0", tmp_path / "at-a.qcow2")
    strategy.create(lab.disks(), name="a")  # offline: the image path stays on top
    lab.write("disk0", MiB, MiB, 0x22)
    drives = [DriveSpec(lab.images["disk0"], "disk0"), DriveSpec(lab.images["disk1"], "disk1", bus="scsi")]
    process = QemuProcess(tmp_path, drives, name="vm3").start()
    try:
        machine = connect_machine(process.qmp_socket)
        ExternalOverlayStrategy(machine).create(machine.disks(), name="b")  # online: an overlay on top
        qemu_io(machine.qmp(), "disk0", "write -P 0x33 0 2M")
        machine.close()
    finally:
        process.stop()
        process.kill()
    names = sorted((r.disk.name, r.name) for r in strategy.list())
    assert names == [("disk0", "a"), ("disk0", "b"), ("disk1", "a"), ("disk1", "b")]
    for ref in [r for r in strategy.list() if r.name == "a"]:
        strategy.rollback(ref)
    compare_images(lab.capture("disk0", tmp_path / "now.qcow2"), at_a)
    assert strategy.list() == []
    assert sorted(p.name for p in tmp_path.glob("*.vmsnap-*")) == []
    run(["qemu-img", "check", str(lab.images["disk0"])])
