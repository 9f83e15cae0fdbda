"""Incremental chains of the backup strategy against a byte model: hypothesis writes, full + incrementals,
and the chain's top must read exactly as the disk read at each backup; bitmap loss after kill -9 → full."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_image
from vmsnap.errors import QMPConnectionError, SnapshotError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.model import SnapshotRef
from vmsnap.strategies.blockdev_backup.strategy import BlockdevBackupStrategy, IncrementalFallbackWarning
from vmsnap.vm.machine import OfflineMachine, QemuMachine

MiB = 1 << 20
SIZE = 64 * MiB
DISKS = ("disk0", "disk1")


class Vm:
    """A QEMU without guest OS on two 64 MiB qcow2 disks, with a byte model of what each disk holds."""

    def __init__(self, workdir: Path, size: int = SIZE) -> None:
        self.workdir = workdir
        self.images = {d: make_image(workdir / f"{d}.qcow2", size=str(size)) for d in DISKS}
        self.model = {d: bytearray(size) for d in DISKS}
        self.process: QemuProcess | None = None
        self.machine: QemuMachine | None = None

    def start(self) -> QemuMachine:
        drives = [
            DriveSpec(self.images["disk0"], "disk0"),
            DriveSpec(self.images["disk1"], "disk1", bus="scsi"),
        ]
        self.process = QemuProcess(self.workdir, drives, name="incvm").start()
        for attempt in range(50):  # the socket file appears a moment before QEMU listens on it
            try:
                self.machine = QemuMachine(self.process.qmp_socket)
                break
            except QMPConnectionError:
                if attempt == 49:
                    raise
                time.sleep(0.05)
        assert self.machine is not None
        return self.machine

    def write(self, disk: str, offset: int, length: int, pattern: int | None) -> None:
        assert self.machine is not None
        if pattern is None:
            qemu_io(self.machine.qmp(), disk, f"write -z {offset} {length}")
            self.model[disk][offset : offset + length] = bytes(length)
        else:
            qemu_io(self.machine.qmp(), disk, f"write -P {pattern} {offset} {length}")
            self.model[disk][offset : offset + length] = bytes([pattern]) * length

    def stop(self) -> None:
        """Quit QEMU cleanly (persistent bitmaps are written to the images)."""
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        if self.process is not None:
            self.process.stop()
            self.process.kill()
            self.process = None

    def kill9(self) -> None:
        """Kill QEMU with SIGKILL: nothing is written on the way out (the guest did flush its data)."""
        if self.machine is not None:
            for disk in DISKS:
                qemu_io(self.machine.qmp(), disk, "flush")
            self.machine.close()
            self.machine = None
        if self.process is not None:
            self.process.kill()
            self.process = None


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Vm]:
    machine = Vm(tmp_path)
    machine.start()
    try:
        yield machine
    finally:
        machine.stop()


def read_chain(top: Path) -> bytes:
    """The guest-visible bytes of a backup chain (its top and every backing file)."""
    raw = top.with_name(top.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(raw)], check=True)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def backing_of(image: Path) -> str | None:
    """The backing file name in a qcow2 header (None for a standalone image)."""
    with open(image, "rb") as f:
        header = f.read(20)
        assert header[:4] == b"QFI\xfb"
        offset, length = int.from_bytes(header[8:16], "big"), int.from_bytes(header[16:20], "big")
        if not offset:
            return None
        f.seek(offset)
        return f.read(length).decode()


def backup(
    vm: Vm, target_dir: Path, parents: dict[str, Path] | None, disks: tuple[str, ...] = DISKS
) -> dict[str, Path]:
    """One backup of ``disks`` (incremental when ``parents`` is given); its targets by disk."""
    assert vm.machine is not None
    strategy = BlockdevBackupStrategy(
        vm.machine, target_dir=target_dir, incremental=parents is not None, parents=parents
    )
    refs = strategy.create([d for d in vm.machine.disks() if d.name in disks], name=target_dir.name)
    for ref in refs:
        strategy.delete(ref)
    return {r.disk.name: Path(r.details["target"]) for r in refs}


# -- hypothesis: write patterns, full + N incrementals -----------------------------------------------------

CHAIN_SIZE = 16 * MiB  # the property needs many examples: a smaller disk keeps each one cheap
Write = tuple[int, int, int | None]


def _write(size: int) -> st.SearchStrategy[Write]:
    def clamp(t: Write) -> Write:
        offset, length, pattern = t
        return offset, min(length, size - offset), pattern

    return st.tuples(
        # anywhere (unaligned, partial clusters), or on cluster boundaries
        st.one_of(st.integers(0, size - 1), st.integers(0, size // 65536 - 1).map(lambda i: i * 65536)),
        st.one_of(st.integers(1, 256 * 1024), st.sampled_from([512, 65536, 65537, 2 * MiB])),
        st.one_of(st.none(), st.integers(0, 255)),  # None: write zeroes (qemu-io write -z)
    ).map(clamp)


def check_chain(vm: Vm, tmp_path: Path, rounds: list[list[Write]], n: int) -> None:
    """Round 0's writes then a full backup of disk0; each later round's writes then an incremental one;
    the last round's writes come after the last backup. The chain's top must read exactly as the model
    did when that backup was taken: nothing written before it missing, nothing written after it there."""
    base = tmp_path / f"example-{n}"
    parents: dict[str, Path] | None = None
    expected = b""
    for i, writes in enumerate(rounds):
        for offset, length, pattern in writes:
            vm.write("disk0", offset, length, pattern)
        if i == len(rounds) - 1:
            break
        expected = bytes(vm.model["disk0"])
        targets = backup(vm, base / f"b{i}", parents, disks=("disk0",))
        assert (backing_of(targets["disk0"]) is None) == (i == 0)
        parents = targets
    assert parents is not None
    assert read_chain(parents["disk0"]) == expected
    shutil.rmtree(base)


@pytest.fixture
def chain_vm(tmp_path: Path) -> Iterator[Vm]:
    machine = Vm(tmp_path, size=CHAIN_SIZE)
    machine.start()
    try:
        yield machine
    finally:
        machine.stop()


def test_incremental_chains_restore_exactly(chain_vm: Vm, tmp_path: Path) -> None:
    counter = itertools.count()

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rounds=st.lists(st.lists(_write(CHAIN_SIZE), max_size=4), min_size=3, max_size=5))
    def chain(rounds: list[list[Write]]) -> None:
        check_chain(chain_vm, tmp_path, rounds, next(counter))

    chain()


@pytest.mark.slow
def test_incremental_chains_restore_exactly_many(chain_vm: Vm, tmp_path: Path) -> None:
    counter = itertools.count()

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rounds=st.lists(st.lists(_write(CHAIN_SIZE), max_size=12), min_size=3, max_size=10))
    def chain(rounds: list[list[Write]]) -> None:
        check_chain(chain_vm, tmp_path, rounds, next(counter))

    chain()


# -- bitmap loss ------------------------------------------------------------------------------------------


def test_bitmap_survives_a_clean_restart_but_not_kill_9(vm: Vm, tmp_path: Path) -> None:
    vm.write("disk0", 0, 4 * MiB, 0x11)
    vm.write("disk1", 8 * MiB, 1 * MiB, 0x12)
    b0 = backup(vm, tmp_path / "b0", None)
    vm.write("disk0", 1 * MiB, 64 * 1024, 0x21)
    vm.stop()  # clean: the bitmap is stored in the qcow2
    vm.start()
    b1 = backup(vm, tmp_path / "b1", b0)
    assert backing_of(b1["disk0"]) == "../b0/disk0.qcow2"
    assert read_chain(b1["disk0"]) == bytes(vm.model["disk0"])
    at_b1 = bytes(vm.model["disk0"])
    vm.write("disk1", 30 * MiB, 64 * 1024, 0x31)
    vm.kill9()  # the bitmap stays marked in use in the image: inconsistent on the next start
    vm.start()
    with pytest.warns(IncrementalFallbackWarning, match="inconsistent"):
        b2 = backup(vm, tmp_path / "b2", b1)
    assert backing_of(b2["disk1"]) is None  # full, for every disk
    assert backing_of(b2["disk0"]) is None
    for disk in DISKS:
        assert read_chain(b2[disk]) == bytes(vm.model[disk])
    # the chain restarts from the fallback: the next incremental works again
    vm.write("disk0", 50 * MiB, 4096, 0x41)
    b3 = backup(vm, tmp_path / "b3", b2)
    assert backing_of(b3["disk0"]) == "../b2/disk0.qcow2"
    for disk in DISKS:
        assert read_chain(b3[disk]) == bytes(vm.model[disk])
    # rollback (VM off) to the incremental b1: the disk becomes its whole chain, standalone
    vm.stop()
    offline = OfflineMachine([vm.images["disk0"]])
    (disk0,) = offline.disks()
    strategy = BlockdevBackupStrategy(offline, target_dir=tmp_path / "b1")
    strategy.rollback(SnapshotRef("backup", "b1", disk0, details={"target": str(b1["disk0"])}))
    assert read_chain(vm.images["disk0"]) == at_b1
    assert backing_of(vm.images["disk0"]) is None


def test_bitmap_never_written_before_kill_9_means_a_full_backup(vm: Vm, tmp_path: Path) -> None:
    vm.write("disk0", 0, 1 * MiB, 0x51)
    b0 = backup(vm, tmp_path / "b0", None)
    vm.write("disk0", 2 * MiB, 1 * MiB, 0x52)
    vm.kill9()  # the bitmap lived only in memory
    vm.start()
    assert vm.machine is not None
    strategy = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "b1", incremental=True, parents=b0)
    with pytest.warns(IncrementalFallbackWarning, match="does not exist"):
        refs = strategy.create(vm.machine.disks(), name="b1")
    assert {r.details["kind"] for r in refs} == {"full"}
    assert all("does not exist" in r.details["fallback"] for r in refs)
    for ref in refs:
        assert read_chain(Path(ref.details["target"])) == bytes(vm.model[ref.disk.name])


def test_missing_parent_falls_back_to_full_for_every_disk(vm: Vm, tmp_path: Path) -> None:
    b0 = backup(vm, tmp_path / "b0", None)
    vm.write("disk1", 0, 64 * 1024, 0x61)
    with pytest.warns(IncrementalFallbackWarning, match="no parent"):
        b1 = backup(vm, tmp_path / "b1", {"disk0": b0["disk0"]})
    assert backing_of(b1["disk0"]) is None and backing_of(b1["disk1"]) is None
    b0["disk0"].unlink()
    with pytest.warns(IncrementalFallbackWarning, match="does not exist"):
        backup(vm, tmp_path / "b2", b0)


def test_an_incremental_not_taken_to_the_end_keeps_its_bits(vm: Vm, tmp_path: Path) -> None:
    assert vm.machine is not None
    b0 = backup(vm, tmp_path / "b0", None)
    vm.write("disk0", 0, 3 * MiB, 0x71)
    qmp = vm.machine.qmp()
    counts = {d: {b["name"]: b["count"] for b in qmp.dirty_bitmaps(f"fmt-{d}")} for d in DISKS}
    assert counts["disk0"] == {"vmsnap": 3 * MiB}
    # started without waiting, then deleted before it was exported: cancelled or unconfirmed, the bits stay
    strategy = BlockdevBackupStrategy(
        vm.machine, target_dir=tmp_path / "b1", incremental=True, parents=b0, wait=False
    )
    refs = strategy.create(vm.machine.disks(), name="b1")
    vm.write("disk0", 10 * MiB, 1 * MiB, 0x72)
    for ref in refs:
        strategy.delete(ref)
    after = {d: {b["name"]: b["count"] for b in qmp.dirty_bitmaps(f"fmt-{d}")} for d in DISKS}
    assert after["disk0"] == {"vmsnap": 4 * MiB}
    assert qmp.query_jobs() == []
    # the next incremental on the same parent holds everything
    b1 = backup(vm, tmp_path / "b1-again", b0)
    assert read_chain(b1["disk0"]) == bytes(vm.model["disk0"])
    counts = {d: {b["name"]: b["count"] for b in qmp.dirty_bitmaps(f"fmt-{d}")} for d in DISKS}
    assert counts["disk0"] == {"vmsnap": 0}


def test_what_a_dead_run_left_is_recovered_without_losing_a_bit(vm: Vm, tmp_path: Path) -> None:
    assert vm.machine is not None
    b0 = backup(vm, tmp_path / "b0", None)
    vm.write("disk1", 5 * MiB, 2 * MiB, 0x81)
    # a run that dies right after create: jobs and target nodes stay in QEMU, the bits in a pending bitmap
    dead = BlockdevBackupStrategy(
        vm.machine, target_dir=tmp_path / "dead", incremental=True, parents=b0, wait=False
    )
    dead.create(vm.machine.disks(), name="dead")
    del dead
    vm.write("disk1", 20 * MiB, 64 * 1024, 0x82)
    later = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "b1", incremental=True, parents=b0)
    with pytest.raises(SnapshotError, match="still in QEMU"):
        later.create(vm.machine.disks(), name="b1")
    # recovery, from a new strategy object: list what exists, delete it
    recover = BlockdevBackupStrategy(vm.machine, target_dir=tmp_path / "dead")
    refs = recover.list()
    assert sorted(r.disk.name for r in refs) == ["disk0", "disk1"]
    assert {r.name for r in refs} == {"dead"}
    for ref in refs:
        recover.delete(ref)
    assert recover.list() == []
    qmp = vm.machine.qmp()
    assert qmp.query_jobs() == []
    assert {b["name"] for b in qmp.dirty_bitmaps("fmt-disk1")} == {"vmsnap"}
    b1 = backup(vm, tmp_path / "b1", b0)  # on the old parent, as a repository does after a dead run
    assert backing_of(b1["disk1"]) == "../b0/disk1.qcow2"
    assert read_chain(b1["disk1"]) == bytes(vm.model["disk1"])
