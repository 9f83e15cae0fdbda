"""The contract every snapshot strategy meets, as a base test class each strategy's test module subclasses.

Like fsspec's abstract test suite: a subclass names its strategy and, when its disks live elsewhere (a Btrfs
loop mount, LVM inside the lab guest), overrides :meth:`StrategyContract.make_lab` to return its own
:class:`Lab`. Every test writes known patterns, snapshots, writes more, and compares the disks' guest-visible
content through the lab's content hooks (:meth:`Lab.content`, :meth:`Lab.export_content`,
:meth:`Lab.expected_content`, :meth:`Lab.assert_same`, :meth:`Lab.differ`): by default standalone qcow2
copies compared with ``qemu-img compare``; the LVM lab keeps sha256 sums computed inside the lab guest.

Usage::

    class TestExternal(StrategyContract):
        strategy_name = "external"

The ``lab`` fixture is parametrised ``online`` (a running QEMU without guest OS, writes through ``qemu-io``
over HMP) and ``offline`` (the same two qcow2 images, no QEMU, writes with the ``qemu-io`` program).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import pytest

from tests.conftest import make_image
from vmsnap.errors import QMPConnectionError, UsageError, VmsnapError
from vmsnap.image.qemu_img import convert_argv
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits
from vmsnap.strategies import strategy_class
from vmsnap.strategies.base import Strategy
from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine, find_disk

MiB = 1 << 20

Content: TypeAlias = Any
"""What a lab keeps of a disk's guest-visible content; only the same lab compares two of them (the default
labs: a standalone qcow2 copy on the host; the LVM lab: a sha256 hex digest computed inside the guest)."""

Write: TypeAlias = tuple[int, int, int]
"""(offset, length, pattern byte) of one write to a disk."""


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a test-side command, failing the test with its output when it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True)
    assert result.returncode == 0, f"{argv} exited {result.returncode}: {result.stdout}{result.stderr}"
    return result


def compare_images(a: Path, b: Path) -> None:
    """Assert two qcow2 images hold the same guest-visible bytes (``qemu-img compare``)."""
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"{a} and {b} differ: {result.stdout}{result.stderr}"


def images_differ(a: Path, b: Path) -> bool:
    """True when the two images' guest-visible bytes differ."""
    result = subprocess.run(
        ["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2", str(a), str(b)], capture_output=True
    )
    assert result.returncode in (0, 1), result
    return result.returncode == 1


def read_export(source: ExportSource, dest: Path) -> Path:
    """Copy what an ExportSource serves into a standalone qcow2 ``dest`` (the copy transport's read path)."""
    run(convert_argv(source, dest))
    return dest


def connect_machine(qmp_socket: Path, *, timeout: float = 10.0) -> QemuMachine:
    """A QemuMachine on a QEMU just started: its socket file can exist a moment before QEMU listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QemuMachine(qmp_socket)
        except QMPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _nbd_socket(source: ExportSource) -> Path | None:
    if source.kind != "nbd" or "socket=" not in source.location:
        return None
    return Path(source.location.split("socket=", 1)[1].split("&", 1)[0])


class Lab:
    """A machine with disks to snapshot, and test-side ways to write to them and capture their content.

    Override it when the disks live elsewhere; the contract only uses these methods.
    """

    online: bool
    machine: Machine
    workdir: Path
    disk_names: tuple[str, ...]

    def disks(self) -> list[Disk]:
        """The machine's disks in :attr:`disk_names` order."""
        disks = self.machine.disks()
        return [find_disk(disks, name) for name in self.disk_names]

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset`` as the guest would."""
        raise NotImplementedError

    def capture(self, disk: str, dest: Path) -> Path:
        """Copy the disk's current guest-visible content into a standalone qcow2 ``dest``."""
        raise NotImplementedError

    # -- content: what the contract keeps and compares (a lab overrides all five, or none) -------------

    def content(self, disk: str, tag: str) -> Content:
        """The disk's current guest-visible content (default: a qcow2 copy ``<tag>-<disk>.qcow2``)."""
        return self.capture(disk, self.workdir / f"{tag}-{disk}.qcow2")

    def export_content(self, source: ExportSource, tag: str) -> Content:
        """What ``source`` serves, read as a transport reads it (default: ``qemu-img convert`` into a qcow2
        ``export-<disk>-<tag>.qcow2``)."""
        return read_export(source, self.workdir / f"export-{source.disk.name}-{tag}.qcow2")

    def expected_content(self, disk: Disk, writes: Sequence[Write], tag: str) -> Content:
        """What ``disk`` holds after ``writes`` on a fresh (zeroed) disk, built without asking the machine
        (default: a new qcow2 given the writes with ``qemu-io``)."""
        dest = self.workdir / f"{tag}-{disk.name}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(dest), str(disk.virtual_size)])
        for offset, length, pattern in writes:
            run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(dest)])
        return dest

    def assert_same(self, actual: Content, expected: Content) -> None:
        """Assert two contents are the same bytes (default: ``qemu-img compare``)."""
        compare_images(actual, expected)

    def differ(self, a: Content, b: Content) -> bool:
        """True when two contents are not the same bytes."""
        return images_differ(a, b)

    def finish_rollback(self) -> None:
        """Do what the strategy's rollback leaves to the user, as its warning says (default: nothing; LVM
        defers the merge into an origin that is open to the origin's next activation)."""

    def chain(self, disk: str) -> tuple[Path, ...]:
        """The disk's active file and its backing files (what the VM runs on)."""
        d = find_disk(self.machine.disks(), disk)
        return (d.file, *d.backing_chain)

    def check(self, disk: str) -> None:
        """Assert the disk's image files are consistent (``qemu-img check``)."""
        for image in self.chain(disk):
            if image.suffix == ".qcow2":
                run(["qemu-img", "check", "-U", str(image)])

    def is_running(self) -> bool:
        """True while the VM runs (always False offline)."""
        return False

    def power_off(self) -> Machine:
        """Stop the VM (if any) cleanly and return an offline machine for the same disks."""
        return self.machine

    def close(self) -> None:
        """Stop whatever the lab started (also after a failed test)."""


class QemuImageLab(Lab):
    """Two 64 MiB qcow2 images in ``workdir``; online behind a QEMU without guest OS, offline bare."""

    def __init__(self, workdir: Path, *, online: bool, image_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.online = online
        self.disk_names = ("disk0", "disk1")
        where = image_dir or workdir
        self.images = {name: make_image(where / f"{name}.qcow2") for name in self.disk_names}
        self.process: QemuProcess | None = None
        self.machine = self._start() if online else self._offline()

    def _offline(self) -> OfflineMachine:
        return OfflineMachine(
            [self.images[n] for n in self.disk_names], name="testvm", disk_names=self.disk_names
        )

    def _start(self) -> QemuMachine:
        drives = [
            DriveSpec(self.images["disk0"], "disk0", serial="d0"),
            DriveSpec(self.images["disk1"], "disk1", bus="scsi", serial="d1"),
        ]
        self.process = QemuProcess(self.workdir, drives, name="testvm").start()
        try:
            return connect_machine(self.process.qmp_socket)
        except BaseException:
            self.process.kill()
            raise

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        command = f"write -P {pattern:#x} {offset} {length}"
        if self.is_running():
            qemu_io(self.machine.qmp(), disk, command)
        else:
            image = find_disk(self.machine.disks(), disk).file
            out = run(["qemu-io", "-f", "qcow2", "-c", command, str(image)])
            assert "error" not in out.stdout.lower(), out.stdout

    def capture(self, disk: str, dest: Path) -> Path:
        d = find_disk(self.machine.disks(), disk)
        if self.is_running():
            # QEMU caches qcow2 metadata: flush so a reader of the files sees every write
            qemu_io(self.machine.qmp(), disk, "flush")
        run(["qemu-img", "convert", "-U", "-f", d.format, str(d.file), "-O", "qcow2", str(dest)])
        return dest

    def is_running(self) -> bool:
        return self.process is not None and self.process.alive()

    def power_off(self) -> Machine:
        if self.process is not None:
            self.machine.close()
            self.process.stop()
            self.process.kill()
            self.process = None
            self.machine = self._offline()
        return self.machine

    def close(self) -> None:
        self.machine.close()
        if self.process is not None:
            self.process.stop()
            self.process.kill()


def _data_of(lab: Lab, tag: str) -> dict[str, Content]:
    return {d: lab.content(d, tag) for d in lab.disk_names}


class StrategyContract:
    """Tests every strategy must pass. Subclasses set :attr:`strategy_name` and may override the hooks."""

    strategy_name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = ("online", "offline")
    online_rollback: ClassVar[bool] = False
    """True when the strategy rolls back a running VM; else it must refuse clearly and work once it is off."""
    several_snapshots: ClassVar[bool] = True
    """True when a disk may carry more than one snapshot of this strategy at a time."""

    # -- hooks ------------------------------------------------------------------------------------

    def make_lab(self, mode: str, tmp_path: Path) -> Lab:
        """The machine and disks to test on (``mode`` is "online" or "offline")."""
        return QemuImageLab(tmp_path, online=mode == "online")

    def strategy_options(self) -> Mapping[str, Any]:
        """Keyword options for the strategy's constructor."""
        return {}

    def make_strategy(self, machine: Machine) -> Strategy:
        """The strategy under test, bound to ``machine``."""
        cls = strategy_class(self.strategy_name)
        strategy: Strategy = cls(machine, **self.strategy_options())
        return strategy

    def failing_disks(self, lab: Lab) -> list[Disk]:
        """Disks whose snapshot must fail as a whole: the lab's disks plus one that does not exist (last)."""
        good = lab.disks()
        bogus = Disk(
            name="bogus",
            node_name="no-such-node",
            file=lab.workdir / "no-such-image.qcow2",
            format="qcow2",
            virtual_size=good[0].virtual_size,
        )
        return [*good, bogus]

    first_writes: ClassVar[tuple[tuple[int, int, int, int], ...]] = (
        (0, 0, 1 * MiB, 0x11),
        (0, 5 * MiB + 4096, 300 * 1024, 0x12),
        (1, 2 * MiB, 2 * MiB, 0x21),
    )
    """(disk index, offset, length, pattern) written before the snapshot; some unaligned."""
    second_writes: ClassVar[tuple[tuple[int, int, int, int], ...]] = (
        (0, 512 * 1024, 1 * MiB, 0x33),
        (0, 40 * MiB, 64 * 1024, 0x34),
        (1, 3 * MiB, 4 * MiB, 0x43),
    )
    """Written after the snapshot: overwrites part of the first data and fills new regions."""
    third_writes: ClassVar[tuple[tuple[int, int, int, int], ...]] = (
        (0, 0, 64 * 1024, 0x66),
        (1, 30 * MiB, 64 * 1024, 0x77),
    )
    """Written after a second snapshot (before a rollback to the older one: only the first of them)."""
    late_write: ClassVar[tuple[int, int, int, int]] = (0, 60 * MiB, 4096, 0x55)
    """Written after a delete, to show the disk still takes writes."""
    disks_start_zeroed: ClassVar[bool] = True
    """True when the lab's disks read as zeros before the first writes (fresh images)."""

    def first_patterns(self, lab: Lab) -> None:
        """Known data before the snapshot: different patterns per disk."""
        for index, offset, length, pattern in self.first_writes:
            lab.write(lab.disk_names[index], offset, length, pattern)

    def second_patterns(self, lab: Lab) -> None:
        """Data after the snapshot."""
        for index, offset, length, pattern in self.second_writes:
            lab.write(lab.disk_names[index], offset, length, pattern)

    def expected_after_first(self, lab: Lab, disk: Disk) -> Content:
        """What ``disk`` holds after :meth:`first_patterns`, built on a fresh image without asking the VM."""
        index = lab.disk_names.index(disk.name)
        writes = [(offset, length, pattern) for i, offset, length, pattern in self.first_writes if i == index]
        return lab.expected_content(disk, writes, "expected")

    # -- fixtures ---------------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Tests that cannot apply to a strategy are not generated for it (rather than skipped)."""
        super().__init_subclass__(**kwargs)
        if not cls.several_snapshots:
            cls.test_two_snapshots_export_and_delete_independently = None  # type: ignore[assignment]
            cls.test_rollback_to_the_older_of_two_snapshots = None  # type: ignore[assignment]
        if not cls.disks_start_zeroed:
            cls.test_export_holds_writes_the_vm_had_not_flushed = None  # type: ignore[assignment]

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run each test in the modes the strategy supports (``modes``), and only those."""
        if "lab" in metafunc.fixturenames:
            metafunc.parametrize("lab", list(self.modes), indirect=True)

    @pytest.fixture
    def lab(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
        mode = str(request.param)
        lab = self.make_lab(mode, tmp_path)
        try:
            yield lab
        finally:
            lab.close()

    # -- helpers ----------------------------------------------------------------------------------

    def snapshot_names(self, strategy: Strategy) -> dict[str, set[str]]:
        """Disk name → names of this strategy's snapshots on it, from ``list()``."""
        names: dict[str, set[str]] = {}
        for ref in strategy.list():
            assert ref.strategy == self.strategy_name
            names.setdefault(ref.disk.name, set()).add(ref.name)
        return names

    def assert_export_holds(self, lab: Lab, strategy: Strategy, ref: SnapshotRef, expected: Content) -> None:
        with strategy.export(ref) as source:
            assert isinstance(source, ExportSource)
            assert source.virtual_size == ref.disk.virtual_size
            copy = lab.export_content(source, ref.name)
            socket = _nbd_socket(source)
            if socket is not None:  # served from a private directory
                assert socket.exists() and (socket.parent.stat().st_mode & 0o777) == 0o700
        lab.assert_same(copy, expected)
        if socket is not None:
            assert not socket.parent.exists(), "the NBD server's directory outlived the export"

    # -- the contract -----------------------------------------------------------------------------

    def test_declares_name_traits_and_when_to_pick_it(self) -> None:
        cls = strategy_class(self.strategy_name)
        assert cls.name == self.strategy_name
        assert isinstance(cls.traits, Traits)
        assert all(str(getattr(cls.traits, field)).strip() for field, _ in Traits.columns())
        assert cls.__doc__ and len(cls.__doc__.split()) > 20, "a paragraph saying when to pick it"

    def test_probe_accepts_the_lab_disks(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        assert isinstance(strategy, Strategy)
        assert all(strategy.probe(disk) for disk in lab.disks())

    def test_export_holds_the_bytes_of_create_time(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        self.first_patterns(lab)
        at_create = _data_of(lab, "at-create")
        refs = strategy.create(lab.disks(), name="snap1")
        assert sorted(r.disk.name for r in refs) == sorted(lab.disk_names)
        assert all(r.name == "snap1" and r.strategy == self.strategy_name for r in refs)
        self.second_patterns(lab)
        after = _data_of(lab, "after")
        for disk in lab.disk_names:
            assert lab.differ(at_create[disk], after[disk]), "the test's second writes changed nothing"
        for ref in refs:
            self.assert_export_holds(lab, strategy, ref, at_create[ref.disk.name])
        # exporting changed nothing the VM sees
        for disk in lab.disk_names:
            lab.assert_same(lab.content(disk, "now"), after[disk])
        assert lab.is_running() == lab.online

    def test_export_holds_writes_the_vm_had_not_flushed(self, lab: Lab) -> None:
        """No capture (which flushes) between the writes and create: the strategy itself must make QEMU's
        cached metadata part of the snapshot."""
        strategy = self.make_strategy(lab.machine)
        self.first_patterns(lab)
        refs = strategy.create(lab.disks(), name="snap1")
        self.second_patterns(lab)
        for ref in refs:
            expected = self.expected_after_first(lab, ref.disk)
            self.assert_export_holds(lab, strategy, ref, expected)

    def test_list_shows_what_exists(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        assert self.snapshot_names(strategy) == {}
        refs = strategy.create(lab.disks(), name="snap1")
        assert self.snapshot_names(strategy) == {d: {"snap1"} for d in lab.disk_names}
        for ref in refs:
            strategy.delete(ref)
        assert self.snapshot_names(strategy) == {}

    def test_delete_keeps_the_original_chain_and_all_data(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        chains = {d: lab.chain(d) for d in lab.disk_names}
        self.first_patterns(lab)
        refs = strategy.create(lab.disks(), name="snap1")
        self.second_patterns(lab)
        after = _data_of(lab, "after")
        for ref in refs:
            strategy.delete(ref)
        for disk in lab.disk_names:
            assert lab.chain(disk) == chains[disk]
            lab.check(disk)
            lab.assert_same(lab.content(disk, "now"), after[disk])
        assert lab.is_running() == lab.online
        # the disk still takes writes after the delete
        index, offset, length, pattern = self.late_write
        lab.write(lab.disk_names[index], offset, length, pattern)
        lab.check(lab.disk_names[index])

    def test_rollback_returns_exactly_the_snapshot_bytes(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        self.first_patterns(lab)
        at_create = _data_of(lab, "at-create")
        refs = strategy.create(lab.disks(), name="snap1")
        self.second_patterns(lab)
        if lab.online and not self.online_rollback:
            after = _data_of(lab, "after")
            with pytest.raises(VmsnapError) as info:
                strategy.rollback(refs[0])
            assert "\n" not in str(info.value)
            assert lab.is_running()
            for disk in lab.disk_names:  # refused: nothing changed
                lab.assert_same(lab.content(disk, "now"), after[disk])
            strategy = self.make_strategy(lab.power_off())
            refs = [r for r in strategy.list() if r.name == "snap1"]
            assert sorted(r.disk.name for r in refs) == sorted(lab.disk_names)
        for ref in refs:
            strategy.rollback(ref)
        lab.finish_rollback()
        for disk in lab.disk_names:
            lab.assert_same(lab.content(disk, "rolled"), at_create[disk])
            lab.check(disk)

    def test_a_failing_disk_leaves_no_snapshot_on_any_disk(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        chains = {d: lab.chain(d) for d in lab.disk_names}
        self.first_patterns(lab)
        before = _data_of(lab, "before")
        with pytest.raises(VmsnapError) as info:
            strategy.create(self.failing_disks(lab), name="snap1")
        assert "\n" not in str(info.value)
        assert self.snapshot_names(strategy) == {}
        assert lab.is_running() == lab.online
        for disk in lab.disk_names:
            assert lab.chain(disk) == chains[disk]
            lab.assert_same(lab.content(disk, "now"), before[disk])
        # and a later snapshot of the good disks works
        refs = strategy.create(lab.disks(), name="snap1")
        assert len(refs) == len(lab.disk_names)

    def test_bad_names_are_refused_before_anything_happens(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        for bad in ("../escape", "a/b", "", ".hidden", "-opt"):
            with pytest.raises(UsageError):
                strategy.create(lab.disks(), name=bad)
        assert self.snapshot_names(strategy) == {}

    def test_an_existing_name_is_refused_and_the_snapshot_kept(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        self.first_patterns(lab)
        at_create = _data_of(lab, "at-create")
        refs = strategy.create(lab.disks(), name="snap1")
        self.second_patterns(lab)
        after = _data_of(lab, "after")
        with pytest.raises(VmsnapError) as info:
            strategy.create(lab.disks(), name="snap1")
        assert "snap1" in str(info.value)
        assert self.snapshot_names(strategy) == {d: {"snap1"} for d in lab.disk_names}
        for disk in lab.disk_names:  # the refused create changed nothing the VM sees
            lab.assert_same(lab.content(disk, "now"), after[disk])
        for ref in refs:
            self.assert_export_holds(lab, strategy, ref, at_create[ref.disk.name])

    def test_two_snapshots_export_and_delete_independently(self, lab: Lab) -> None:
        strategy = self.make_strategy(lab.machine)
        chains = {d: lab.chain(d) for d in lab.disk_names}
        self.first_patterns(lab)
        first = _data_of(lab, "first")
        refs1 = strategy.create(lab.disks(), name="snap1")
        self.second_patterns(lab)
        second = _data_of(lab, "second")
        refs2 = strategy.create(lab.disks(), name="snap2")
        for index, offset, length, pattern in self.third_writes:
            lab.write(lab.disk_names[index], offset, length, pattern)
        last = _data_of(lab, "last")
        assert self.snapshot_names(strategy) == {d: {"snap1", "snap2"} for d in lab.disk_names}
        for ref in refs1:
            self.assert_export_holds(lab, strategy, ref, first[ref.disk.name])
        for ref in refs2:
            self.assert_export_holds(lab, strategy, ref, second[ref.disk.name])
        for ref in refs1:  # the older one first: the newer must survive it
            strategy.delete(ref)
        assert self.snapshot_names(strategy) == {d: {"snap2"} for d in lab.disk_names}
        refs2 = [r for r in strategy.list() if r.name == "snap2"]
        for ref in refs2:
            self.assert_export_holds(lab, strategy, ref, second[ref.disk.name])
            strategy.delete(ref)
        for disk in lab.disk_names:
            assert lab.chain(disk) == chains[disk]
            lab.check(disk)
            lab.assert_same(lab.content(disk, "now"), last[disk])

    def test_rollback_to_the_older_of_two_snapshots(self, lab: Lab) -> None:
        """Bytes of the older snapshot come back; whatever snapshots survive still export their own bytes."""
        strategy = self.make_strategy(lab.machine)
        self.first_patterns(lab)
        first = _data_of(lab, "first")
        strategy.create(lab.disks(), name="snap1")
        self.second_patterns(lab)
        second = _data_of(lab, "second")
        strategy.create(lab.disks(), name="snap2")
        index, offset, length, pattern = self.third_writes[0]
        lab.write(lab.disk_names[index], offset, length, pattern)
        if lab.online and not self.online_rollback:
            strategy = self.make_strategy(lab.power_off())
        for ref in [r for r in strategy.list() if r.name == "snap1"]:
            strategy.rollback(ref)
        lab.finish_rollback()
        for disk in lab.disk_names:
            lab.assert_same(lab.content(disk, "rolled"), first[disk])
            lab.check(disk)
        expected = {"snap1": first, "snap2": second}
        for ref in strategy.list():
            self.assert_export_holds(lab, strategy, ref, expected[ref.name][ref.disk.name])
