"""Parsing and argument building of vmsnap.strategies.storage, its btrfs/lvm tool wrappers and the lvm/btrfs
strategies (fakes only).

These show which commands would run and how outputs are read; the integration tests prove they work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes import RecordingRunner
from vmsnap.errors import CommandTimeoutError, NotFoundError, SnapshotError, UnsupportedError, UsageError
from vmsnap.model import Disk
from vmsnap.mounts import parse_mountinfo
from vmsnap.runner import CommandResult, Runner
from vmsnap.strategies.btrfs import name_of_set, snapshot_set_id
from vmsnap.strategies.btrfs_tool import btrfs_location
from vmsnap.strategies.lvm import LvmSnapshotStrategy, cow_size, snapshot_lv_name
from vmsnap.strategies.lvm_tool import LVS_FIELDS, lvm_location, parse_lvs_json, parse_vgs_json
from vmsnap.strategies.storage import mount_of_path
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.qmp import QMPMonitor

MiB = 1 << 20

MOUNTINFO = r"""1 1 0:2 / / rw - rootfs rootfs rw,size=218612k
23 1 0:5 / /dev rw,relatime - devtmpfs devtmpfs rw,mode=755
24 1 253:0 / /mnt/lvfiles rw,relatime - ext4 /dev/mapper/vg0-files rw
59 27 0:40 / /srv/vm\040images rw,relatime - btrfs /dev/loop0 rw,subvolid=5,subvol=/
60 59 0:41 /vms /srv/vm\040images/bind rw - btrfs /dev/loop0 rw,subvolid=256,subvol=/vms
"""


def lv_row(name: str, attr: str, **fields: str) -> dict[str, str]:
    row = {f: "" for f in LVS_FIELDS}
    row.update(lv_name=name, vg_name="vg0", lv_path=f"/dev/vg0/{name}", lv_attr=attr)
    row.update(lv_kernel_major="-1", lv_kernel_minor="-1", lv_time="2026-11-27 12:00:00 +0000")
    row.update(fields)
    return row


def lvs_json(*rows: dict[str, str]) -> str:
    return "  " + json.dumps({"report": [{"lv": list(rows)}]}, indent=4)


LVS = lvs_json(
    lv_row("files", "owi-aos---", lv_size="16777216", lv_kernel_major="253", lv_kernel_minor="0"),
    lv_row("raw", "-wi-a-----", lv_size="8388608", lv_kernel_major="253", lv_kernel_minor="1"),
    lv_row("[lvol0_pmspare]", "ewi-------"),
    lv_row("pool", "twi-aotz--", lv_size="16777216", snap_percent="100.00", lv_kernel_major="253"),
    lv_row("thin", "Vwi-a-tz--", pool_lv="pool", lv_size="8388608", snap_percent="100.00",
           lv_kernel_major="253", lv_kernel_minor="5"),
    lv_row("files.vmsnap.a", "swi-I-s---", origin="files", snap_percent="100.00", lv_tags="vmsnap",
           lv_size="4194304", lv_kernel_major="253", lv_kernel_minor="3"),
    lv_row("thin.vmsnap.b", "Vwi---tz-k", origin="thin", pool_lv="pool", lv_tags="vmsnap,other"),
    lv_row("files.vmsnap.shared", "swi-a-s---", origin="files", snap_percent="3.00", lv_size="4194304",
           lv_tags="vmsnap,vmsnap.disk=vmimg,vmsnap.disk=second", lv_kernel_major="253", lv_kernel_minor="6"),
)  # fmt: skip

VGS = json.dumps(
    {"report": [{"vg": [{"vg_name": "vg0", "vg_size": "130023424", "vg_free": "33554432",
                         "vg_extent_size": "4194304"}]}]}
)  # fmt: skip


def test_mountinfo_is_parsed_with_escaped_spaces() -> None:
    mounts = parse_mountinfo(MOUNTINFO + "garbage line\n")
    assert len(mounts) == 5
    lv = mounts[2]
    assert (lv.mount_point, lv.device, lv.fstype, lv.source) == (
        PurePosixPath("/mnt/lvfiles"),
        "253:0",
        "ext4",
        "/dev/mapper/vg0-files",
    )
    assert mounts[3].mount_point == PurePosixPath("/srv/vm images")
    assert mounts[4].root == "/vms"


def test_the_longest_mount_point_holds_a_path() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mount_of_path(PurePosixPath("/mnt/lvfiles/a/vm.img"), mounts).fstype == "ext4"
    assert mount_of_path(PurePosixPath("/mnt/lvfilesX/vm.img"), mounts).fstype == "rootfs"
    assert mount_of_path(PurePosixPath("/srv/vm images/bind/x"), mounts).root == "/vms"
    assert mount_of_path(PurePosixPath("/dev/vg0/raw"), mounts).fstype == "devtmpfs"
    with pytest.raises(NotFoundError):
        mount_of_path(PurePosixPath("/x"), [])


def test_lvs_json_is_parsed_and_attributes_decoded() -> None:
    volumes = {v.name: v for v in parse_lvs_json(LVS)}
    assert "lvol0_pmspare" in volumes  # hidden LVs lose their brackets
    files, thin, pool = volumes["files"], volumes["thin"], volumes["pool"]
    assert (files.full_name, files.size, files.kernel_device) == ("vg0/files", 16 * MiB, "253:0")
    assert files.is_open and files.is_active and not files.is_thin and not files.is_snapshot
    invalid = volumes["files.vmsnap.a"]
    assert invalid.is_snapshot and invalid.is_invalid and not invalid.is_active
    assert invalid.tags == ("vmsnap",)
    # thin volumes report their data fill as snap_percent: a full thin LV is not an invalid snapshot
    assert thin.is_thin and not thin.is_invalid and not pool.is_invalid
    thin_snap = volumes["thin.vmsnap.b"]
    assert thin_snap.is_thin and thin_snap.is_snapshot and thin_snap.kernel_device == ""
    assert thin_snap.tags == ("vmsnap", "other")
    assert thin_snap.snap_percent is None


def test_vgs_json_is_parsed_and_garbage_is_refused() -> None:
    (vg,) = parse_vgs_json(VGS)
    assert (vg.name, vg.free, vg.extent_size) == ("vg0", 32 * MiB, 4 * MiB)
    with pytest.raises(UnsupportedError, match="lvs did not print a JSON report"):
        parse_lvs_json("  LV VG Attr\n")
    with pytest.raises(UnsupportedError, match="vgs did not print"):
        parse_vgs_json("{}")


def test_cow_size_rules() -> None:
    origin = 1 << 30
    assert cow_size(None, origin) == int(origin * 0.2)
    assert cow_size(None, 16 * MiB) == 16 * MiB + 16 * MiB // 64 + MiB  # 64 MiB minimum, capped
    assert cow_size(0.25, origin) == origin // 4
    assert cow_size("25%", origin) == origin // 4
    assert cow_size("512M", origin) == 512 * MiB
    assert cow_size("1.5GiB", 4 * origin) == 3 * origin // 2
    assert cow_size(4096, origin) == 4096
    for bad in ("lots", "-5M", "x%", 0, -1, True):
        with pytest.raises(UsageError, match="snapshot_size"):
            cow_size(bad, origin)  # type: ignore[arg-type]


@given(
    rule=st.one_of(
        st.none(),
        st.integers(1, 1 << 45),
        st.floats(0.001, 4.0),
        st.builds(lambda n, u: f"{n}{u}", st.integers(1, 4096), st.sampled_from(["", "k", "M", "G", "T"])),
    ),
    origin=st.integers(MiB, 1 << 44),
)
def test_cow_size_is_positive_and_never_more_than_the_origin_needs(rule: object, origin: int) -> None:
    size = cow_size(rule, origin)  # type: ignore[arg-type]
    assert 0 < size <= origin + origin // 64 + MiB


def test_snapshot_names() -> None:
    assert snapshot_lv_name("files", "nightly") == "files.vmsnap.nightly"
    with pytest.raises(UsageError):
        snapshot_lv_name("files", "../x")
    with pytest.raises(UsageError, match="127"):
        snapshot_lv_name("f" * 100, "n" * 30)
    set_id = snapshot_set_id("night-ly")
    assert name_of_set(set_id) == "night-ly"
    assert set_id < snapshot_set_id("a")  # later sets sort after earlier ones, whatever their names
    with pytest.raises(UsageError):
        snapshot_set_id(".hidden")


# -- command building with a RecordingRunner --------------------------------------------------------


@attrs.define
class FakeMachine:
    """Just enough of a Machine for argument-building tests."""

    runner: Runner
    disk_list: list[Disk]
    name: str = "vm"
    running: bool = False

    @property
    def is_running(self) -> bool:
        return self.running

    def disks(self) -> list[Disk]:
        return list(self.disk_list)

    def qmp(self) -> QMPMonitor:
        raise UnsupportedError("no QMP in unit tests")

    def agent(self) -> GuestAgent | None:
        return None

    def close(self) -> None:
        pass


RAW = Disk("rawdisk", "", Path("/dev/vg0/raw"), "raw", 8 * MiB)
THIN = Disk("thindisk", "", Path("/dev/vg0/thin"), "raw", 8 * MiB)
IMAGE = Disk("vmimg", "", Path("/mnt/lvfiles/vm.img"), "raw", 2 * MiB)


def lvm_runner(**extra: tuple[int, str]) -> RecordingRunner:
    responses: dict[tuple[str, ...], tuple[int, str]] = {
        ("readlink", "-f", "--", "/dev/vg0/raw"): (0, "/dev/mapper/vg0-raw\n"),
        ("readlink", "-f", "--", "/dev/vg0/thin"): (0, "/dev/mapper/vg0-thin\n"),
        ("readlink", "-f", "--", "/mnt/lvfiles/vm.img"): (0, "/mnt/lvfiles/vm.img\n"),
        ("cat", "/proc/self/mountinfo"): (0, MOUNTINFO),
        ("stat", "-L", "-c", "%F|%t|%T", "--", "/dev/mapper/vg0-raw"): (0, "block special file|fd|1\n"),
        ("stat", "-L", "-c", "%F|%t|%T", "--", "/dev/mapper/vg0-thin"): (0, "block special file|fd|5\n"),
        ("stat", "-L", "-c", "%F|%t|%T", "--", "/mnt/lvfiles/vm.img"): (0, "regular file|0|0\n"),
        ("lvm", "lvs"): (0, LVS),
        ("lvm", "vgs"): (0, VGS),
        ("mktemp",): (0, "/tmp/vmsnap-lvm.abc123\n"),
    }
    for key, value in extra.items():
        responses[tuple(key.split(" "))] = value
    return RecordingRunner(responses=responses)


def commands(runner: RecordingRunner, *programs: str) -> list[tuple[str, ...]]:
    return [
        c for c in runner.calls if c[0] in programs and c[:2] != ("lvm", "lvs") and c[:2] != ("lvm", "vgs")
    ]


def test_lvm_location_of_a_device_and_of_a_file() -> None:
    runner = lvm_runner()
    raw = lvm_location(runner, "/dev/vg0/raw")
    assert raw.volume.full_name == "vg0/raw" and not raw.is_file
    image = lvm_location(runner, "/mnt/lvfiles/vm.img")
    assert image.volume.full_name == "vg0/files" and image.relative == PurePosixPath("vm.img")


def test_lvm_location_names_what_a_path_is_on_when_not_an_lv() -> None:
    runner = lvm_runner()
    runner.responses[("readlink", "-f", "--", "/tmp/x.img")] = (0, "/tmp/x.img\n")
    runner.responses[("stat", "-L", "-c", "%F|%t|%T", "--", "/tmp/x.img")] = (0, "regular file|0|0\n")
    with pytest.raises(UnsupportedError, match="is not on an LVM logical volume: it is on rootfs on rootfs"):
        lvm_location(runner, "/tmp/x.img")


def test_lvcreate_argv_classic_with_size_and_thin_without() -> None:
    runner = lvm_runner()
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [RAW, THIN]), snapshot_size="4M")
    refs = strategy.create([RAW, THIN], name="n1")
    assert commands(runner, "lvm") == [
        (
            "lvm",
            "lvcreate",
            "-s",
            "-n",
            "raw.vmsnap.n1",
            "-L",
            f"{4 * MiB}b",
            "--addtag",
            "vmsnap",
            "--addtag",
            "vmsnap.disk=rawdisk",
            "vg0/raw",
        ),
        (
            "lvm",
            "lvcreate",
            "-s",
            "-n",
            "thin.vmsnap.n1",
            "--addtag",
            "vmsnap",
            "--addtag",
            "vmsnap.disk=thindisk",
            "vg0/thin",
        ),
    ]
    assert [r.details["thin"] for r in refs] == ["0", "1"]
    assert refs[0].location == "/dev/vg0/raw.vmsnap.n1"


def test_no_lvcreate_runs_when_the_volume_group_lacks_space() -> None:
    runner = lvm_runner()
    runner.responses[("lvm", "vgs")] = (0, VGS.replace('"33554432"', '"8388608"'))  # 8 MiB free
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [RAW]), snapshot_size="40M")  # capped: 3 extents
    with pytest.raises(SnapshotError, match=r"volume group vg0 has 8 MiB free; the snapshot.s. need 12 MiB"):
        strategy.create([RAW], name="big")
    assert commands(runner, "lvm") == []


def test_a_failed_lvcreate_removes_the_snapshots_already_made() -> None:
    runner = lvm_runner()
    runner.responses[("lvm", "lvcreate", "-s", "-n", "thin.vmsnap.n2")] = (5, "Insufficient free space")
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [RAW, THIN]), snapshot_size="4M")
    with pytest.raises(SnapshotError, match="nothing was left behind"):
        strategy.create([RAW, THIN], name="n2")
    assert commands(runner, "lvm")[-1] == ("lvm", "lvremove", "-y", "vg0/raw.vmsnap.n2")


def test_a_timed_out_lvcreate_that_made_its_snapshot_is_removed_too() -> None:
    """The second lvcreate did its work and then ran past its timeout: both snapshots are removed."""
    runner = TimingOutRunner(responses=lvm_runner().responses, prefix=("lvm", "lvcreate"), nth=2)
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [RAW, THIN]), snapshot_size="4M")
    with pytest.raises(
        SnapshotError, match=r"lvcreate of a snapshot of vg0/thin failed: lvm ran past"
    ) as info:
        strategy.create([RAW, THIN], name="late")
    assert "nothing was left behind" in str(info.value)
    removed = [c for c in commands(runner, "lvm") if c[1] == "lvremove"]
    assert sorted(removed) == [
        ("lvm", "lvremove", "-y", "vg0/raw.vmsnap.late"),
        ("lvm", "lvremove", "-y", "vg0/thin.vmsnap.late"),
    ]
    assert strategy.last_pause_ms is None


@attrs.define
class TimingOutRunner(RecordingRunner):
    """Records like its parent; the ``nth`` command starting with ``prefix`` runs (is recorded) and then
    raises CommandTimeoutError, as a command killed by its timeout after it had done its work."""

    prefix: tuple[str, ...] = ()
    nth: int = 1
    seen: int = 0

    def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult:
        result = super().run(argv, **kwargs)
        if tuple(argv[: len(self.prefix)]) == self.prefix:
            self.seen += 1
            if self.seen == self.nth:
                raise CommandTimeoutError(tuple(argv), 600, host=self.host)
        return result


def test_export_of_a_thin_file_snapshot_activates_mounts_and_cleans_up() -> None:
    runner = lvm_runner()
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [IMAGE]))
    (ref,) = strategy.create([IMAGE], name="n3")
    thin_ref = attrs.evolve(ref, details={**ref.details, "thin": "1", "snapshot_lv": "vg0/thin.vmsnap.b"})
    runner.calls.clear()
    with strategy.export(thin_ref) as source:
        assert (source.kind, source.location) == ("file", "/tmp/vmsnap-lvm.abc123/vm.img")
    assert commands(runner, "lvm", "mount", "umount", "mktemp", "rmdir") == [
        ("lvm", "lvchange", "-ay", "-K", "vg0/thin.vmsnap.b"),
        ("mktemp", "-d", "-p", "/tmp", "vmsnap-lvm.XXXXXX"),
        ("mount", "-o", "ro,nodev,nosuid,noexec", "/dev/vg0/thin.vmsnap.b", "/tmp/vmsnap-lvm.abc123"),
        ("umount", "/tmp/vmsnap-lvm.abc123"),
        ("rmdir", "/tmp/vmsnap-lvm.abc123"),
        ("lvm", "lvchange", "-an", "vg0/thin.vmsnap.b"),
    ]


def test_an_invalid_snapshot_is_never_exported_and_rollback_needs_the_vm_off() -> None:
    runner = lvm_runner()
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [IMAGE]))
    (ref,) = strategy.create([IMAGE], name="n4")
    invalid = attrs.evolve(ref, details={**ref.details, "snapshot_lv": "vg0/files.vmsnap.a"})
    with (
        pytest.raises(SnapshotError, match=r"vg0/files\.vmsnap\.a of disk vmimg is invalid"),
        strategy.export(invalid),
    ):
        pytest.fail("must not be reached")
    running = LvmSnapshotStrategy(FakeMachine(runner, [IMAGE], running=True))
    with pytest.raises(SnapshotError, match="is running"):
        running.rollback(ref)
    runner.calls.clear()
    strategy.delete(invalid)
    assert commands(runner, "lvm") == [("lvm", "lvremove", "-y", "vg0/files.vmsnap.a")]


def test_rollback_runs_lvconvert_merge_and_explains_a_deferred_merge() -> None:
    runner = lvm_runner()
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [IMAGE]))
    (ref,) = strategy.create([IMAGE], name="n5")
    pending = attrs.evolve(ref, details={**ref.details, "snapshot_lv": "vg0/thin.vmsnap.b"})
    strategy.rollback(pending)  # the LV is still listed afterwards: the merge waits for reactivation
    assert ("lvm", "lvconvert", "--merge", "-i", "1", "vg0/thin.vmsnap.b") in runner.calls
    assert "next activation" in strategy.warnings[-1]


def test_btrfs_location_finds_the_nearest_subvolume_root() -> None:
    runner = RecordingRunner(
        responses={
            ("readlink",): (0, "/srv/vm images/vms/a/disk.qcow2\n"),
            ("cat", "/proc/self/mountinfo"): (0, MOUNTINFO),
            ("stat", "-c", "%i"): (0, "300\n256\n256\n"),
        }
    )
    location = btrfs_location(runner, "/srv/vm images/vms/a/disk.qcow2")
    assert location.subvolume == PurePosixPath("/srv/vm images/vms")
    assert location.relative == PurePosixPath("a/disk.qcow2")
    assert runner.calls[-1] == (
        "stat",
        "-c",
        "%i",
        "--",
        "/srv/vm images/vms/a",
        "/srv/vm images/vms",
        "/srv/vm images",
    )
    runner.responses[("readlink",)] = (0, "/mnt/lvfiles/vm.img\n")
    with pytest.raises(
        UnsupportedError, match=r"is on ext4 \(/dev/mapper/vg0-files mounted at /mnt/lvfiles\)"
    ):
        btrfs_location(runner, "/mnt/lvfiles/vm.img")


def test_a_snapshot_shared_by_two_disks_is_removed_with_its_last_user() -> None:
    runner = lvm_runner()
    strategy = LvmSnapshotStrategy(FakeMachine(runner, [IMAGE]))
    (ref,) = strategy.create([IMAGE], name="n6")
    shared = attrs.evolve(ref, details={**ref.details, "snapshot_lv": "vg0/files.vmsnap.shared"})
    runner.calls.clear()
    strategy.delete(shared)
    assert commands(runner, "lvm") == [
        ("lvm", "lvchange", "--deltag", "vmsnap.disk=vmimg", "vg0/files.vmsnap.shared")
    ]
    runner.calls.clear()
    strategy.delete(attrs.evolve(shared, disk=attrs.evolve(IMAGE, name="third")))  # not a user: no-op
    assert commands(runner, "lvm") == []
