"""BtrfsSnapshotStrategy on a real loop-backed Btrfs with a running QEMU whose qcow2 disks live in subvolumes.

Every check compares bytes: the snapshot's image against a reference image given the same writes offline.
"""

from __future__ import annotations

import errno
import itertools
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli, qcow2_repo
from tests.integration.strategies.contract import Lab, QemuImageLab, StrategyContract
from tests.integration.strategies.loop_btrfs import LoopBtrfs, loop_btrfs, made_loop_btrfs
from vmsnap.errors import QMPConnectionError, SnapshotError, UnsupportedError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.model import ExportSource
from vmsnap.strategies import strategy_class
from vmsnap.strategies.btrfs import SNAPSHOT_DIR_NAME, BtrfsSnapshotStrategy
from vmsnap.strategies.storage import StorageScopeWarning
from vmsnap.vm.machine import OfflineMachine, QemuMachine

__all__ = ["loop_btrfs"]  # the fixture, imported so pytest finds it here

SIZE = "16M"


@attrs.define
class BtrfsVm:
    """A running QEMU (no OS) with disk0 in subvolume ``a`` (next to other.txt) and disk1 in ``b``."""

    process: QemuProcess
    machine: QemuMachine
    images: dict[str, Path]
    subvolumes: dict[str, Path]
    fs: LoopBtrfs
    workdir: Path


@pytest.fixture
def btrfs_vm(loop_btrfs: LoopBtrfs, tmp_path: Path) -> Iterator[BtrfsVm]:
    a, b = loop_btrfs.subvolume(), loop_btrfs.subvolume()
    (a / "other.txt").write_text("before\n")
    images = {"disk0": make_image(a / "disk0.qcow2", SIZE), "disk1": make_image(b / "disk1.qcow2", SIZE)}
    drives = [DriveSpec(images["disk0"], "disk0"), DriveSpec(images["disk1"], "disk1", bus="scsi")]
    process, machine = start_vm(tmp_path, drives, "btrfsvm")
    try:
        yield BtrfsVm(process, machine, images, {"disk0": a, "disk1": b}, loop_btrfs, tmp_path)
    finally:
        try:
            machine.close()
            process.stop()
        finally:
            process.kill()  # also when a clean stop failed: nothing may keep the loop mount busy


def start_vm(workdir: Path, drives: Sequence[DriveSpec], name: str) -> tuple[QemuProcess, QemuMachine]:
    """Start QEMU and connect, killing it when the connection fails (and trying again, twice).

    QemuProcess.start returns once the QMP socket file exists, which under load can be before QEMU
    listens on it (ECONNREFUSED); a QEMU left running would keep the loop mount busy.
    """
    for attempt in range(3):
        process = QemuProcess(workdir, drives, name=name).start()
        try:
            return process, QemuMachine(process.qmp_socket)
        except QMPConnectionError:
            process.kill()
            if attempt == 2:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


class BtrfsImageLab(QemuImageLab):
    """The contract's lab, with the same connection guard as :func:`start_vm`."""

    def _start(self) -> QemuMachine:
        for attempt in range(3):
            try:
                return super()._start()
            except QMPConnectionError:
                if self.process is not None:
                    self.process.kill()
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")


def reference(tmp_path: Path, name: str, writes: Sequence[str]) -> Path:
    """A qcow2 image given ``writes`` (qemu-io commands) offline: what a correct snapshot must read as."""
    image = make_image(tmp_path / f"ref-{name}.qcow2", SIZE)
    for command in writes:
        subprocess.run(["qemu-io", "-c", command, str(image)], check=True, capture_output=True)
    return image


def opts(source: ExportSource) -> str:
    """``--image-opts`` for an export source (how a transport reads it)."""
    keys = {"driver": source.format, "file.filename": source.location, **source.image_opts}
    return ",".join(f"{k}={v}" for k, v in keys.items())


def same_content(source: ExportSource, expected: Path) -> bool:
    """``qemu-img compare`` of the guest-visible content (exit 0: identical, 1: different)."""
    result = subprocess.run(
        ["qemu-img", "compare", "--image-opts", opts(source), f"driver=qcow2,file.filename={expected}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def assert_paused_once(events: Sequence[Mapping[str, Any]], paused_ms: float | None) -> None:
    """The VM stopped and resumed once (QEMU's STOP and RESUME events), and ``paused_ms`` measured a pause
    that covers the one QEMU saw."""
    runstate = [e for e in events if e["event"] in ("STOP", "RESUME")]
    assert [e["event"] for e in runstate] == ["STOP", "RESUME"], runstate

    def seconds(event: Mapping[str, Any]) -> float:
        return float(event["timestamp"]["seconds"]) + float(event["timestamp"]["microseconds"]) / 1e6

    stopped_ms = (seconds(runstate[1]) - seconds(runstate[0])) * 1000.0
    assert paused_ms is not None and paused_ms > 0.0
    assert 0.0 < stopped_ms <= paused_ms + 1.0  # QEMU's clock and ours may disagree by a tick


def subvolumes_below(path: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(path)], capture_output=True, text=True)
    return sorted(line.split()[-1] for line in out.stdout.splitlines())


def test_registered_under_its_name() -> None:
    assert strategy_class("btrfs") is BtrfsSnapshotStrategy
    assert BtrfsSnapshotStrategy.traits.scope == "all storage"


def test_snapshot_of_a_running_vm_holds_the_data_of_that_instant(btrfs_vm: BtrfsVm, tmp_path: Path) -> None:
    qmp = btrfs_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x11 0 1M")  # not flushed: the stop inside create must flush it
    qemu_io(qmp, "disk1", "write -P 0x22 1M 1M")
    strategy = BtrfsSnapshotStrategy(btrfs_vm.machine)
    assert all(strategy.probe(d) for d in btrfs_vm.machine.disks())
    qmp.events()  # drop what came before
    with pytest.warns(StorageScopeWarning, match="other.txt"):
        refs = strategy.create(btrfs_vm.machine.disks(), name="first")
    assert qmp.status() == "running"
    assert_paused_once(qmp.events(), strategy.last_pause_ms)
    qemu_io(qmp, "disk0", "write -P 0x33 0 2M")  # after the snapshot: must not show in it
    assert [r.disk.name for r in refs] == ["disk0", "disk1"]
    assert strategy.last_pause_ms is not None and strategy.last_pause_ms > 0.0
    for ref in refs:
        assert float(ref.details["paused_ms"]) == pytest.approx(strategy.last_pause_ms, abs=0.051)
    top = btrfs_vm.fs.mount / SNAPSHOT_DIR_NAME
    assert all(Path(r.location).is_relative_to(top) for r in refs)
    assert refs[0].details["snapshot_subvolume"] != refs[1].details["snapshot_subvolume"]
    assert (top.stat().st_mode & 0o777) == 0o700
    expected = {
        "disk0": reference(tmp_path, "d0", ["write -P 0x11 0 1M"]),
        "disk1": reference(tmp_path, "d1", ["write -P 0x22 1M 1M"]),
    }
    for ref in refs:
        with strategy.export(ref) as source:
            assert source.kind == "file"
            assert source.virtual_size == 16 << 20
            assert same_content(source, expected[ref.disk.name]), ref.disk.name
    # the snapshot is read-only
    with pytest.raises(OSError, match="Read-only file system"), Path(refs[0].location).open("r+b"):
        pass
    # other files of disk0's subvolume are captured too: the user is told
    assert "other.txt" in refs[0].details["warning"]
    assert "other_files" not in refs[1].details
    assert any("other.txt" in w for w in strategy.warnings)


def test_without_the_pause_a_snapshot_loses_unflushed_qcow2_metadata(
    btrfs_vm: BtrfsVm, tmp_path: Path
) -> None:
    qmp = btrfs_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x5a 0 1M")
    naive = btrfs_vm.fs.mount / "naive-snapshot"
    subprocess.run(
        ["btrfs", "-q", "subvolume", "snapshot", "-r", str(btrfs_vm.subvolumes["disk0"]), str(naive)],
        check=True,
    )
    try:
        expected = reference(tmp_path, "d0", ["write -P 0x5a 0 1M"])
        naive_source = ExportSource(
            "file", str(naive / "disk0.qcow2"), "qcow2", btrfs_vm.machine.disks()[0], 0
        )
        assert not same_content(naive_source, expected), "the hazard this strategy guards against is gone?"
        strategy = BtrfsSnapshotStrategy(btrfs_vm.machine)
        (ref,) = strategy.create(btrfs_vm.machine.disks()[:1], name="flushed")
        with strategy.export(ref) as source:
            assert same_content(source, expected)
    finally:
        subprocess.run(["btrfs", "-q", "subvolume", "delete", str(naive)], check=True)


def test_list_finds_snapshots_in_a_new_process_oldest_first_and_delete_removes_them(
    btrfs_vm: BtrfsVm, tmp_path: Path
) -> None:
    qmp = btrfs_vm.machine.qmp()
    first = BtrfsSnapshotStrategy(btrfs_vm.machine).create(btrfs_vm.machine.disks(), name="a-1")
    qemu_io(qmp, "disk0", "write -P 0x44 0 64k")
    second = BtrfsSnapshotStrategy(btrfs_vm.machine).create(btrfs_vm.machine.disks(), name="a-0")
    fresh = BtrfsSnapshotStrategy(btrfs_vm.machine)  # knows nothing but the machine
    listed = fresh.list()
    assert [(r.name, r.disk.name) for r in listed] == [
        ("a-1", "disk0"),
        ("a-1", "disk1"),
        ("a-0", "disk0"),
        ("a-0", "disk1"),
    ]
    assert [r.location for r in listed] == [
        first[0].location,
        first[1].location,
        second[0].location,
        second[1].location,
    ]
    with fresh.export(listed[2]) as source:
        assert same_content(source, reference(tmp_path, "d0", ["write -P 0x44 0 64k"]))
    for ref in listed[:2]:
        fresh.delete(ref)
        fresh.delete(ref)  # a second delete is a no-op
    assert not Path(first[0].details["snapshot_subvolume"]).exists()
    assert not (btrfs_vm.fs.mount / SNAPSHOT_DIR_NAME / first[0].details["set"]).exists()
    assert [r.name for r in fresh.list()] == ["a-0", "a-0"]
    assert Path(second[0].location).exists()


def test_rollback_swaps_the_subvolume_back_with_every_file_in_it(btrfs_vm: BtrfsVm, tmp_path: Path) -> None:
    qmp = btrfs_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x61 0 1M")
    strategy = BtrfsSnapshotStrategy(btrfs_vm.machine)
    refs = strategy.create(btrfs_vm.machine.disks(), name="before")
    qemu_io(qmp, "disk0", "write -P 0x62 0 3M")
    live = btrfs_vm.subvolumes["disk0"]
    (live / "other.txt").write_text("after\n")
    with pytest.raises(SnapshotError, match="running"):
        strategy.rollback(refs[0])
    # the machine says "off", but a QEMU still has the images open (another VM on the subvolume, say)
    offline = OfflineMachine([btrfs_vm.images["disk0"], btrfs_vm.images["disk1"]], name="btrfsvm")
    with pytest.raises(SnapshotError, match=f"have files open in {live} .pid {btrfs_vm.process.pid}"):
        BtrfsSnapshotStrategy(offline).rollback(refs[0])
    assert (live / "other.txt").read_text() == "after\n"
    btrfs_vm.machine.close()
    btrfs_vm.process.stop()
    BtrfsSnapshotStrategy(offline).rollback(refs[0])
    expected = reference(tmp_path, "d0", ["write -P 0x61 0 1M"])
    result = subprocess.run(["qemu-img", "compare", str(expected), str(btrfs_vm.images["disk0"])])
    assert result.returncode == 0
    assert (live / "other.txt").read_text() == "before\n"
    assert not [p.name for p in live.parent.iterdir() if "vmsnap-rollback" in p.name]
    # the rolled-back subvolume is writable again and still has its snapshot to go back to
    subprocess.run(["qemu-io", "-c", "write -P 0x63 0 64k", str(btrfs_vm.images["disk0"])], check=True)
    assert Path(refs[0].location).exists()


def fill(directory: Path) -> None:
    """Fill the filesystem of ``directory``: its data (one big file), then its metadata (small files)."""
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={directory / 'filler'}", "bs=1M", "status=none"],
        capture_output=True,
        check=False,  # it ends with "No space left on device"
    )
    small = directory / "small"
    small.mkdir()
    try:
        for n in itertools.count():
            (small / f"f{n}").write_bytes(b"x" * 1500)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err


def test_a_snapshot_on_a_full_filesystem_leaves_nothing_behind_and_the_vm_running(tmp_path: Path) -> None:
    """A real full Btrfs (data and metadata): the snapshots are made, recording their users is not (ENOSPC);
    both snapshots are deleted again, the VM runs on, and once space is freed the same snapshot works."""
    with made_loop_btrfs(tmp_path, 256 << 20) as fs:
        a, b = fs.subvolume(), fs.subvolume()
        images = {"disk0": make_image(a / "disk0.qcow2", SIZE), "disk1": make_image(b / "disk1.qcow2", SIZE)}
        drives = [DriveSpec(images["disk0"], "disk0"), DriveSpec(images["disk1"], "disk1", bus="scsi")]
        process, machine = start_vm(tmp_path / "vm", drives, "fullvm")
        try:
            qmp = machine.qmp()
            filler = fs.subvolume("filler")
            fill(filler)
            before = subvolumes_below(fs.mount)
            strategy = BtrfsSnapshotStrategy(machine)
            with pytest.raises(SnapshotError, match="No space left") as info:
                strategy.create(machine.disks(), name="doomed")
            assert "nothing was left behind" in str(info.value)
            assert qmp.status() == "running"
            assert subvolumes_below(fs.mount) == before
            assert not list((fs.mount / SNAPSHOT_DIR_NAME).glob("*-doomed"))
            subprocess.run(["btrfs", "-q", "subvolume", "delete", str(filler)], check=True)
            subprocess.run(["btrfs", "filesystem", "sync", str(fs.mount)], check=True)
            refs = strategy.create(machine.disks(), name="later")  # room again: it works
            assert [r.disk.name for r in refs] == ["disk0", "disk1"]
            for ref in refs:
                strategy.delete(ref)
        finally:
            machine.close()
            process.stop()
            process.kill()


def test_a_snapshot_directory_elsewhere_fails_and_leaves_nothing(btrfs_vm: BtrfsVm, tmp_path: Path) -> None:
    qmp = btrfs_vm.machine.qmp()
    before = subvolumes_below(btrfs_vm.fs.mount)
    # a snapshot directory on another filesystem fails for real
    elsewhere = BtrfsSnapshotStrategy(btrfs_vm.machine, snapshot_dir=tmp_path / "not-btrfs")
    with pytest.raises(SnapshotError, match="btrfs snapshot of"):
        elsewhere.create(btrfs_vm.machine.disks(), name="cross")
    assert qmp.status() == "running"
    assert subvolumes_below(btrfs_vm.fs.mount) == before
    assert not list((tmp_path / "not-btrfs").iterdir())


def test_a_disk_not_on_btrfs_is_refused_naming_the_filesystem(tmp_path: Path) -> None:
    image = make_image(tmp_path / "plain.qcow2", SIZE)
    machine = OfflineMachine([image])
    strategy = BtrfsSnapshotStrategy(machine)
    (disk,) = machine.disks()
    assert not strategy.probe(disk)
    fstype = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(image)], capture_output=True, text=True
    )
    with pytest.raises(
        UnsupportedError, match=f"disk plain: .* is on {fstype.stdout.strip()} .*not on Btrfs"
    ):
        strategy.create([disk], name="x")


def test_a_backing_chain_is_read_from_the_snapshot(loop_btrfs: LoopBtrfs, tmp_path: Path) -> None:
    sub = loop_btrfs.subvolume()
    base = make_image(sub / "base.qcow2", SIZE)
    subprocess.run(["qemu-io", "-c", "write -P 0x71 0 1M", str(base)], check=True, capture_output=True)
    top = make_image(sub / "top.qcow2", SIZE, backing=base)  # absolute backing path into the live subvolume
    subprocess.run(["qemu-io", "-c", "write -P 0x72 1M 1M", str(top)], check=True, capture_output=True)
    machine = OfflineMachine([top])
    strategy = BtrfsSnapshotStrategy(machine)
    (ref,) = strategy.create(machine.disks(), name="chain")
    assert strategy.last_pause_ms is None and ref.details["paused_ms"] == "0.0"  # nothing to pause
    assert strategy.traits.scope == "all storage"
    subprocess.run(["qemu-io", "-c", "write -P 0x73 0 1M", str(base)], check=True, capture_output=True)
    with strategy.export(ref) as source:
        assert same_content(
            source, reference(tmp_path, "chain", ["write -P 0x71 0 1M", "write -P 0x72 1M 1M"])
        )


class TestBtrfsContract(StrategyContract):
    """The shared strategy contract, with both disks' images in one subvolume of the loop-backed Btrfs."""

    strategy_name = "btrfs"

    @pytest.fixture(autouse=True)
    def _on_btrfs(self, loop_btrfs: LoopBtrfs) -> None:
        self.fs = loop_btrfs

    def make_lab(self, mode: str, tmp_path: Path) -> Lab:
        return BtrfsImageLab(tmp_path, online=mode == "online", image_dir=self.fs.subvolume())


def test_cli_backup_of_a_running_vm_on_btrfs_restores_the_bytes_of_that_instant(
    btrfs_vm: BtrfsVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qmp = btrfs_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x5c 0 2M")  # unflushed: the backup's pause must flush it
    qemu_io(qmp, "disk1", "write -P 0x5d 4M 1M")
    btrfs_vm.machine.close()  # QEMU serves one QMP client at a time: the CLI's turn
    repo, out = qcow2_repo(tmp_path / "repo"), tmp_path / "restored"
    argv = ["backup", "--repo", repo, "--strategy", "btrfs", "--transport", "copy"]
    result = cli(capsys, *argv, "--qmp", btrfs_vm.process.qmp_socket, "--quiesce", "off", "--json")
    assert result.code == 0, result.err
    assert result.json()["strategy"] == "btrfs"
    assert cli(capsys, "restore", "--repo", repo, "--vm", "btrfsvm", "--to", out).code == 0
    expected = {
        "disk0": reference(tmp_path, "d0", ["write -P 0x5c 0 2M"]),
        "disk1": reference(tmp_path, "d1", ["write -P 0x5d 4M 1M"]),
    }
    for disk, ref in expected.items():
        assert subprocess.run(["qemu-img", "compare", str(ref), str(out / f"{disk}.qcow2")]).returncode == 0
    for subvolume in btrfs_vm.subvolumes.values():  # the backup deleted its snapshots
        assert not list((btrfs_vm.fs.mount / SNAPSHOT_DIR_NAME).glob(f"*/{subvolume.name}"))
    assert btrfs_vm.machine.qmp().status() == "running"
