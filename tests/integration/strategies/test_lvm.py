"""LvmSnapshotStrategy for real, inside the lab guest (this host's kernel has no device-mapper).

One lab guest serves the module, with three raw virtio disks set up as volume groups (see ``SETUP``):

- ``vg0`` for the tests of LVM's own behaviour: an ext4 LV holding data files ("VM images"), an LV that is a
  raw disk itself, one larger than the free space;
- ``vgc`` for the strategy contract (:class:`TestLvmContract`): its two disks are made anew, zeroed, for
  each test (:class:`LvmGuestLab`);
- ``vgfull``: one LV in a group that takes no more LVs, so that an ``lvcreate`` fails for real.

The strategy runs through the guest's AgentRunner and every check compares sha256 sums computed in the guest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from tests.integration.strategies.contract import Lab, StrategyContract, Write
from vmsnap.errors import NotFoundError, SnapshotError, UnsupportedError, UsageError
from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import LabImage
from vmsnap.lab.qemu import DriveSpec
from vmsnap.model import Disk, ExportSource
from vmsnap.runner import Runner
from vmsnap.strategies import strategy_class
from vmsnap.strategies.lvm import SNAPSHOT_TAG, LvmSnapshotStrategy
from vmsnap.strategies.lvm_tool import Lvm
from vmsnap.strategies.storage import StorageNoteWarning
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.machine import Machine
from vmsnap.vm.qmp import QMPMonitor

pytestmark = pytest.mark.guest

MiB = 1 << 20
FILES_MOUNT = "/mnt/lvfiles"
IMAGE = f"{FILES_MOUNT}/vm.img"
CONTRACT_MOUNT = "/mnt/contract"
#: every capture hashes a whole disk in the guest (sha256 under TCG: ~2-5 s for 64 MiB, ~0.5-1 s for 16 MiB),
#: so the contract's disks are small and its writes moved inside them (TestLvmContract)
CONTRACT_SIZE = 16 * MiB


@attrs.define
class GuestDisksMachine:
    """A stopped "VM" whose disks are files or LVs inside the lab guest, reached through its AgentRunner."""

    name: str
    runner: Runner
    disk_list: list[Disk]

    @property
    def is_running(self) -> bool:
        return False

    def disks(self) -> list[Disk]:
        return list(self.disk_list)

    def qmp(self) -> QMPMonitor:
        raise UnsupportedError(f"{self.name} has no QMP monitor: its disks live inside the lab guest")

    def agent(self) -> GuestAgent | None:
        return None

    def definition(self) -> str | None:
        return None

    def recover(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


SETUP = f"""set -e
for pv in pv0 pvc pvfull; do lvm pvcreate -q /dev/disk/by-id/virtio-$pv; done
lvm vgcreate -q vg0 /dev/disk/by-id/virtio-pv0
lvm vgcreate -q vgc /dev/disk/by-id/virtio-pvc
lvm vgcreate -q vgfull /dev/disk/by-id/virtio-pvfull
lvm lvcreate -q -n full -L 4M vgfull
lvm vgchange -q -l 1 vgfull
lvm lvcreate -q -n files -L 16M vg0
lvm lvcreate -q -n raw -L 8M vg0
lvm lvcreate -q -n big -L 64M vg0
mke2fs -q -t ext4 /dev/vg0/files
mkdir -p {FILES_MOUNT} {CONTRACT_MOUNT}
mount /dev/vg0/files {FILES_MOUNT}
dd if=/dev/urandom of={IMAGE} bs=1M count=2 status=none
dd if=/dev/urandom of={FILES_MOUNT}/vm2.img bs=1M count=1 status=none
echo other > {FILES_MOUNT}/other.txt
dd if=/dev/urandom of=/dev/vg0/raw bs=1M count=8 oflag=direct status=none
sync
"""

#: an LV whose snapshot passes every check and then fails in ``lvcreate`` (its group takes no more LVs)
FULL_DISK = Disk("full", "", Path("/dev/vgfull/full"), "raw", 4 * MiB)


@pytest.fixture(scope="module")
def lvm_guest(lab_image: LabImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    """One lab guest for this module with raw disks pv0 (128 MiB), pvc (512 MiB) and pvfull (32 MiB) set up
    by ``SETUP``."""
    workdir = tmp_path_factory.mktemp("lvm-guest")
    drives = []
    for serial, size in (("pv0", 128 * MiB), ("pvc", 512 * MiB), ("pvfull", 32 * MiB)):
        image = workdir / f"{serial}.raw"
        with open(image, "wb") as f:
            f.truncate(size)
        drives.append(DriveSpec(image, serial, format="raw", serial=serial))
    with LabGuest(workdir, extra_drives=drives, data_disk_size=None, image=lab_image, name="lvmlab") as guest:
        guest.runner.run(["sh", "-c", SETUP], timeout=300)
        yield guest


def sha256_in_guest(runner: Runner, path: str) -> str:
    """The sha256 of a file or device inside the guest, computed there."""
    return runner.run(["sha256sum", path], timeout=300).stdout.split()[0]


# -- the strategy contract ----------------------------------------------------------------------------

CONTRACT_DISKS = f"""set -e
lvm lvcreate -q -y -W y -n files -L 32M vgc
mke2fs -q -F -t ext4 /dev/vgc/files
mount /dev/vgc/files {CONTRACT_MOUNT}
truncate -s {CONTRACT_SIZE} {CONTRACT_MOUNT}/disk0.img
lvm lvcreate -q -y -W y -n disk1 -L {CONTRACT_SIZE}b vgc
dd if=/dev/zero of=/dev/vgc/disk1 bs=1M count={CONTRACT_SIZE // MiB} oflag=direct status=none
"""

#: writes ``$1`` bytes of the byte ``$2`` (``tr``'s octal escape) at byte ``$4`` of ``$3``, through the page
#: cache and not flushed, as a VM's writes may still be when a snapshot is taken
WRITE_PATTERN = 'head -c "$1" /dev/zero | tr "$5" "$2" | dd of="$3" bs=64K oflag=seek_bytes seek="$4" ' + (
    "conv=notrunc status=none"
)


class LvmGuestLab(Lab):
    """The contract's disks inside the lab guest, 16 MiB of zeros each when the test starts: ``disk0`` an
    image file on ext4 on ``vgc/files``, ``disk1`` the LV ``vgc/disk1`` itself.

    Content is a sha256 sum computed in the guest (the bytes never leave it); expected content is computed
    here from the writes. Removes every LV of ``vgc`` when closed, snapshots included.
    """

    def __init__(self, runner: Runner, workdir: Path) -> None:
        self.runner = runner
        self.workdir = workdir
        self.online = False
        self.disk_names = ("disk0", "disk1")
        self.origins = {"disk0": "vgc/files", "disk1": "vgc/disk1"}
        self.runner.run(["sh", "-c", CONTRACT_DISKS], timeout=300)
        self.machine: Machine = GuestDisksMachine(
            "lvmvm",
            runner,
            [
                Disk("disk0", "", Path(f"{CONTRACT_MOUNT}/disk0.img"), "raw", CONTRACT_SIZE),
                Disk("disk1", "", Path("/dev/vgc/disk1"), "raw", CONTRACT_SIZE),
            ],
        )

    def path(self, disk: str) -> str:
        return str(self.disks()[self.disk_names.index(disk)].file)

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        args = [str(length), f"\\{pattern:03o}", self.path(disk), str(offset), "\\000"]
        self.runner.run(["sh", "-c", WRITE_PATTERN, "sh", *args], timeout=300)

    def content(self, disk: str, tag: str) -> str:
        return sha256_in_guest(self.runner, self.path(disk))

    def export_content(self, source: ExportSource, tag: str) -> str:
        assert (source.kind, source.format) in {("file", "raw"), ("block", "raw")}, source
        return sha256_in_guest(self.runner, source.location)

    def expected_content(self, disk: Disk, writes: Sequence[Write], tag: str) -> str:
        data = bytearray(disk.virtual_size)
        for offset, length, pattern in writes:
            data[offset : offset + length] = bytes([pattern]) * length
        return hashlib.sha256(data).hexdigest()

    def assert_same(self, actual: str, expected: str) -> None:
        assert actual == expected, f"sha256 {actual} where {expected} was expected"

    def differ(self, a: str, b: str) -> bool:
        return a != b

    def check(self, disk: str) -> None:
        """Raw disks have no metadata to check: their LV must be active and no merge left half-done."""
        volume = Lvm(self.runner).volume(self.origins[disk])
        assert volume.is_active and not volume.is_merging, volume

    def finish_rollback(self) -> None:
        """What the strategy's warning asks for when the merge into the mounted ``vgc/files`` is deferred:
        unmount, deactivate and activate it, wait for the merge, mount it again."""
        if not Lvm(self.runner).volume("vgc/files").is_merging:
            return
        reactivate = f"umount {CONTRACT_MOUNT} && lvm lvchange -an vgc/files && lvm lvchange -ay vgc/files"
        self.runner.run(["sh", "-c", reactivate], timeout=300)
        deadline = time.monotonic() + 120
        while Lvm(self.runner).volume("vgc/files").is_merging:
            assert time.monotonic() < deadline, "the merge into vgc/files did not finish within 120 s"
            time.sleep(0.5)
        self.runner.run(["mount", "/dev/vgc/files", CONTRACT_MOUNT], timeout=300)

    def close(self) -> None:
        cleanup = (
            f"umount {CONTRACT_MOUNT} 2>/dev/null; lvm lvremove -q -y vgc @{SNAPSHOT_TAG} >/dev/null; true"
        )
        self.runner.run(["sh", "-c", f"{cleanup}; true"], timeout=300)
        assert Lvm(self.runner).volumes("vgc") == [], "vgc must be empty for the next test"


class TestLvmContract(StrategyContract):
    """The shared strategy contract, on LVM inside the lab guest (:class:`LvmGuestLab`).

    Offline only: no VM runs on the guest's LVs (the lab guest has no QEMU of its own, and a VM nested in it
    under TCG would take minutes per test). The pause around an online create is the skeleton this strategy
    shares with btrfs (:mod:`vmsnap.strategies.volume_snapshots`), whose contract runs online.
    """

    strategy_name = "lvm"
    modes = ("offline",)
    # the contract's writes, those past 16 MiB moved inside the disks (see CONTRACT_SIZE)
    second_writes = (
        (0, 512 * 1024, 1 * MiB, 0x33),
        (0, 12 * MiB, 64 * 1024, 0x34),
        (1, 3 * MiB, 4 * MiB, 0x43),
    )
    third_writes = ((0, 0, 64 * 1024, 0x66), (1, 10 * MiB, 64 * 1024, 0x77))
    late_write = (0, 15 * MiB, 4096, 0x55)

    @pytest.fixture(autouse=True)
    def _in_the_guest(self, lvm_guest: LabGuest) -> None:
        self.guest_runner = lvm_guest.runner

    def make_lab(self, mode: str, tmp_path: Path) -> Lab:
        return LvmGuestLab(self.guest_runner, tmp_path)

    def failing_disks(self, lab: Lab) -> list[Disk]:
        """The lab's disks, then one whose ``lvcreate`` fails after theirs succeeded (its volume group takes
        no more LVs): what was made is undone for real."""
        return [*lab.disks(), FULL_DISK]


# -- LVM's own behaviour --------------------------------------------------------------------------------


@attrs.define
class LvmLab:
    guest: LabGuest
    runner: Runner
    image_disk: Disk  # a raw image file on ext4 on vg0/files
    raw_disk: Disk  # the LV vg0/raw is the disk
    big_disk: Disk  # vg0/big, larger than the VG's free space
    image2_disk: Disk  # a second image file on vg0/files

    def machine(self, *disks: Disk) -> GuestDisksMachine:
        return GuestDisksMachine("lvmvm", self.runner, list(disks))

    def sh(self, script: str) -> str:
        return self.runner.run(["sh", "-c", script], timeout=300).stdout

    def sha(self, path: str) -> str:
        return sha256_in_guest(self.runner, path)

    def scribble(self, path: str, mib: int, *, seek: int = 0) -> None:
        """Overwrite ``mib`` MiB at ``seek`` MiB with random bytes, on stable storage before returning."""
        flags = ["oflag=direct"] if path.startswith("/dev/") else []
        argv = ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", f"seek={seek}"]
        self.runner.run([*argv, "conv=notrunc,fsync", *flags, "status=none"], timeout=300)

    def snapshot_lvs(self) -> list[str]:
        return sorted(v.full_name for v in Lvm(self.runner).volumes("vg0") if v.is_snapshot)


@pytest.fixture(scope="module")
def lvm_lab(lvm_guest: LabGuest) -> LvmLab:
    """The module's guest, with the disks of vg0 (see SETUP)."""
    return LvmLab(
        lvm_guest,
        lvm_guest.runner,
        Disk("vmimg", "", Path(IMAGE), "raw", 2 * MiB),
        Disk("rawdisk", "", Path("/dev/vg0/raw"), "raw", 8 * MiB),
        Disk("bigdisk", "", Path("/dev/vg0/big"), "raw", 64 * MiB),
        Disk("vmimg2", "", Path(f"{FILES_MOUNT}/vm2.img"), "raw", 1 * MiB),
    )


@pytest.fixture
def lab(lvm_lab: LvmLab) -> Iterator[LvmLab]:
    """The module's guest; snapshots a test leaves behind (also on failure) are removed after it."""
    yield lvm_lab
    lvm_lab.runner.run(
        [
            "sh",
            "-c",
            f"mountpoint -q {FILES_MOUNT} || mount /dev/vg0/files {FILES_MOUNT}; "
            f"lvm lvremove -y @{SNAPSHOT_TAG} >/dev/null 2>&1; true",
        ],
        timeout=300,
    )


def test_registered_under_its_name() -> None:
    assert strategy_class("lvm") is LvmSnapshotStrategy
    assert LvmSnapshotStrategy.traits.scope == "all storage"


def test_snapshots_export_the_bytes_of_that_instant_for_an_image_file_and_a_whole_lv(lab: LvmLab) -> None:
    disks = [lab.image_disk, lab.raw_disk]
    before = {d.name: lab.sha(str(d.file)) for d in disks}
    machine = lab.machine(*disks)
    strategy = LvmSnapshotStrategy(machine)
    assert all(strategy.probe(d) for d in disks)
    refs = strategy.create(disks, name="first")
    assert strategy.last_pause_ms is None  # nothing runs on the disks: no pause
    assert [r.details["paused_ms"] for r in refs] == ["0.0", "0.0"]
    assert [r.details["kind"] for r in refs] == ["file", "device"]
    assert refs[0].details["snapshot_lv"] == "vg0/files.vmsnap.first"
    assert refs[0].location == "/dev/vg0/files.vmsnap.first"
    # the default rule asks for at least 64 MiB, capped at what an 8 MiB origin can ever need
    assert int(refs[1].details["cow_size"]) == 8 * MiB + 8 * MiB // 64 + MiB
    assert "all of /mnt/lvfiles" in refs[0].details["warning"]
    lab.scribble(IMAGE, 1, seek=1)
    lab.scribble("/dev/vg0/raw", 2, seek=3)
    for disk in disks:
        assert lab.sha(str(disk.file)) != before[disk.name]
    for ref in refs:
        with strategy.export(ref) as source:
            assert source.kind == ("file" if ref.disk.name == "vmimg" else "block")
            assert lab.sha(source.location) == before[ref.disk.name], ref.disk.name
            if source.kind == "file":  # its filesystem, mounted for the export: nothing runs from it
                (line,) = lab.sh("grep vmsnap-lvm /proc/self/mountinfo").splitlines()
                assert {"ro", "nodev", "nosuid", "noexec"} <= set(line.split()[5].split(",")), line
    assert "vmsnap-lvm" not in lab.sh("ls /tmp; grep vmsnap-lvm /proc/self/mountinfo || true")
    fill = strategy.fill(refs[1])
    assert fill is not None and 0.0 < fill < 100.0
    listed = LvmSnapshotStrategy(machine).list()  # a new instance knows only the machine
    assert [(r.name, r.disk.name, r.location) for r in listed] == [
        (r.name, r.disk.name, r.location) for r in refs
    ]
    for ref in listed:
        strategy.delete(ref)
        strategy.delete(ref)  # gone already: a no-op
    assert lab.snapshot_lvs() == []
    assert LvmSnapshotStrategy(machine).list() == []


def test_an_overflowing_snapshot_fails_the_export_loudly_and_breaks_nothing(lab: LvmLab) -> None:
    strategy = LvmSnapshotStrategy(lab.machine(lab.raw_disk), snapshot_size="4M")
    (ref,) = strategy.create([lab.raw_disk], name="tiny")
    assert int(ref.details["cow_size"]) == 4 * MiB
    # the snapshot overflows while a transport reads it: the export must not end quietly
    overflow = r"is invalid: its copy-on-write area .* ran full"
    with pytest.raises(SnapshotError, match=overflow), strategy.export(ref):
        lab.scribble("/dev/vg0/raw", 6)
    written = lab.sha("/dev/vg0/raw")
    with pytest.raises(SnapshotError, match="invalid"), strategy.export(ref):
        pytest.fail("an invalid snapshot must not be exported")
    assert lab.sha("/dev/vg0/raw") == written  # the origin has every write
    strategy.delete(ref)
    assert lab.snapshot_lvs() == []


def test_no_space_for_a_snapshot_is_refused_before_anything_is_created(lab: LvmLab) -> None:
    strategy = LvmSnapshotStrategy(lab.machine(lab.raw_disk, lab.big_disk), snapshot_size=1.0)
    with pytest.raises(SnapshotError, match=r"volume group vg0 has \d+ MiB free; the snapshot\(s\) need"):
        strategy.create([lab.raw_disk, lab.big_disk], name="huge")
    assert lab.snapshot_lvs() == []


def test_rollback_merges_the_snapshot_back_now_or_on_next_activation(lab: LvmLab) -> None:
    machine = lab.machine(lab.raw_disk, lab.image_disk)
    strategy = LvmSnapshotStrategy(machine)
    raw_before, image_before = lab.sha("/dev/vg0/raw"), lab.sha(IMAGE)
    raw_ref, image_ref = strategy.create([lab.raw_disk, lab.image_disk], name="undo")
    lab.scribble("/dev/vg0/raw", 4, seek=2)
    lab.scribble(IMAGE, 2)
    lab.sh(f"echo changed > {FILES_MOUNT}/other.txt; sync")
    # nothing holds vg0/raw open: the merge runs to the end inside lvconvert
    strategy.rollback(raw_ref)
    assert not strategy.merge_pending(raw_ref)
    assert lab.sha("/dev/vg0/raw") == raw_before
    # vg0/files is mounted: LVM defers the merge, and the user is told how to finish it
    with pytest.warns(StorageNoteWarning, match="next activation"):
        strategy.rollback(image_ref)
    strategy.rollback(image_ref)  # a second disk on the same LV: nothing more to do
    assert strategy.merge_pending(image_ref)
    assert any("next activation" in w and "lvchange -an vg0/files" in w for w in strategy.warnings)
    lab.sh(f"umount {FILES_MOUNT} && lvm lvchange -an vg0/files && lvm lvchange -ay vg0/files")
    deadline = time.monotonic() + 60
    while strategy.merge_pending(image_ref) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not strategy.merge_pending(image_ref)
    lab.sh(f"mount /dev/vg0/files {FILES_MOUNT}")
    assert lab.sha(IMAGE) == image_before
    assert lab.sh(f"cat {FILES_MOUNT}/other.txt") == "other\n"  # scope: the whole filesystem went back
    assert lab.snapshot_lvs() == []


def test_a_thin_volume_is_snapshotted_without_a_size_and_read_after_activation(lab: LvmLab) -> None:
    lab.sh("lvm lvcreate -q -T vg0/pool -L 16M && lvm lvcreate -q -V 8M -T vg0/pool -n thin")
    try:
        lab.scribble("/dev/vg0/thin", 3)
        disk = Disk("thindisk", "", Path("/dev/vg0/thin"), "raw", 8 * MiB)
        before = lab.sha("/dev/vg0/thin")
        strategy = LvmSnapshotStrategy(lab.machine(disk))
        (ref,) = strategy.create([disk], name="thin1")
        assert ref.details["thin"] == "1" and "cow_size" not in ref.details
        lab.scribble("/dev/vg0/thin", 2, seek=1)
        with strategy.export(ref) as source:
            assert lab.sha(source.location) == before
        (volume,) = [v for v in Lvm(lab.runner).volumes("vg0") if v.name == "thin.vmsnap.thin1"]
        assert volume.is_thin and not volume.is_active  # deactivated again after the export
        strategy.delete(ref)
        assert lab.snapshot_lvs() == []
    finally:
        lab.sh("lvm lvremove -y vg0/thin vg0/pool >/dev/null 2>&1 || true")


def test_a_disk_not_on_lvm_is_refused_naming_what_it_is_on(lab: LvmLab) -> None:
    lab.sh("dd if=/dev/zero of=/tmp/plain.img bs=1k count=64 status=none")
    disk = Disk("plain", "", Path("/tmp/plain.img"), "raw", 64 << 10)
    strategy = LvmSnapshotStrategy(lab.machine(disk))
    assert not strategy.probe(disk)
    with pytest.raises(
        UnsupportedError,
        match=r"disk plain: /tmp/plain.img is not on an LVM logical volume: "
        r"it is on rootfs",
    ):
        strategy.create([disk], name="x")
    assert lab.snapshot_lvs() == []


def test_two_images_on_one_lv_share_one_snapshot_until_both_let_go(lab: LvmLab) -> None:
    disks = [lab.image_disk, lab.image2_disk]
    strategy = LvmSnapshotStrategy(lab.machine(*disks))
    for bad in ("../escape", "a/b", "", ".hidden", "-opt"):
        with pytest.raises(UsageError):
            strategy.create(disks, name=bad)
    with pytest.raises(NotFoundError, match="does not exist"):  # one bad disk: nothing is created
        strategy.create([lab.raw_disk, Disk("bogus", "", Path("/nonexistent.img"), "raw", MiB)], name="x")
    assert lab.snapshot_lvs() == []
    second_before = lab.sha(str(lab.image2_disk.file))
    first, second = strategy.create(disks, name="pair")
    assert first.details["snapshot_lv"] == second.details["snapshot_lv"] == "vg0/files.vmsnap.pair"
    with pytest.raises(SnapshotError, match=r"files\.vmsnap\.pair exists already"):
        strategy.create(disks, name="pair")
    lab.scribble(str(lab.image2_disk.file), 1)
    strategy.delete(first)  # the second image still needs the snapshot
    with strategy.export(second) as source:
        assert lab.sha(source.location) == second_before
    assert lab.snapshot_lvs() == ["vg0/files.vmsnap.pair"]
    strategy.delete(second)
    assert lab.snapshot_lvs() == []
