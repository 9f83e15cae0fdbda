"""The backup strategy's QMP arguments and small rules, without QEMU (the integration tests run them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.fakes import RecordingRunner
from vmsnap.errors import UsageError
from vmsnap.image import qemu_img
from vmsnap.image.qcow2 import read_header
from vmsnap.model import Disk
from vmsnap.strategies.blockdev_backup import BlockdevBackupStrategy
from vmsnap.strategies.blockdev_backup.bitmaps import (
    PENDING_SUFFIX,
    BitmapState,
    ImageBitmaps,
    bitmap_state,
    overlay_bitmap_actions,
    park_actions,
)
from vmsnap.strategies.blockdev_backup.plan import DiskPlan, fleece_nodes, target_node
from vmsnap.strategies.blockdev_backup.push import backup_actions
from vmsnap.vm.machine import OfflineMachine

NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")  # QEMU: a letter first, under 32 characters


def _strategy(tmp_path: Path, **options: object) -> BlockdevBackupStrategy:
    machine = OfflineMachine([tmp_path / "disk0.qcow2"], runner=RecordingRunner())
    return BlockdevBackupStrategy(machine, target_dir=tmp_path / "out", **options)  # type: ignore[arg-type]


def _disk(fmt: str = "qcow2") -> Disk:
    return Disk("disk0", "fmt-disk0", Path("/images/disk0.qcow2"), fmt, 64 << 20)


def test_node_names_are_valid_for_the_longest_disk_names() -> None:
    for name in ("d", "disk0", "a" * 128, "x.y+z-1_2"):
        names = [target_node(name), *fleece_nodes(name).values()]
        assert all(NODE_NAME.match(n) for n in names), names
        assert len(set(names)) == len(names)
    assert target_node("disk0") != target_node("disk1")


@pytest.mark.parametrize(
    ("info", "state", "why"),
    [
        ([], "missing", "does not exist"),
        ([{"name": "other", "recording": True}], "missing", "does not exist"),
        ([{"name": "vmsnap", "recording": True, "busy": False}], "ok", ""),
        ([{"name": "vmsnap", "recording": True, "inconsistent": True}], "broken", "inconsistent"),
        ([{"name": "vmsnap", "recording": False}], "broken", "disabled"),
        ([{"name": "vmsnap", "recording": True, "busy": True}], "broken", "in use"),
    ],
)
def test_bitmap_state(info: list[dict[str, object]], state: str, why: str) -> None:
    got, reason = bitmap_state(info, "vmsnap")
    assert got == state
    assert why in reason


def test_full_backup_with_a_good_bitmap_parks_its_bits_and_clears_it(tmp_path: Path) -> None:
    plan = DiskPlan(disk=_disk(), target=tmp_path / "out/disk0.qcow2", parent=None, bitmap_state="ok")
    actions = backup_actions(plan, "vmsnap", job_id="job1", target="tgt")
    pending = "vmsnap" + PENDING_SUFFIX
    assert [a["type"] for a in actions] == [
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-merge",
        "block-dirty-bitmap-clear",
        "blockdev-backup",
    ]
    assert actions[0]["data"] == {"node": "fmt-disk0", "name": pending, "persistent": False, "disabled": True}
    assert actions[1]["data"] == {"node": "fmt-disk0", "target": pending, "bitmaps": ["vmsnap"]}
    assert actions[2]["data"] == {"node": "fmt-disk0", "name": "vmsnap"}
    assert actions[3]["data"] == {
        "job-id": "job1",
        "device": "fmt-disk0",
        "target": "tgt",
        "sync": "full",
        "auto-dismiss": False,
    }


def test_incremental_copies_the_parked_bits_and_leaves_them_to_us(tmp_path: Path) -> None:
    plan = DiskPlan(
        disk=_disk(),
        target=tmp_path / "t.qcow2",
        parent=tmp_path / "p.qcow2",
        bitmap_state="ok",
        incremental=True,
    )
    backup = backup_actions(plan, "chain1", job_id="j", target="tgt")[-1]["data"]
    assert backup["sync"] == "bitmap"
    assert backup["bitmap"] == "chain1" + PENDING_SUFFIX
    assert backup["bitmap-mode"] == "never"  # the job never touches the bits: delete settles them


@pytest.mark.parametrize(("fmt", "persistent"), [("qcow2", True), ("raw", False)])
def test_a_missing_bitmap_is_created_in_the_transaction(tmp_path: Path, fmt: str, persistent: bool) -> None:
    actions = park_actions(_disk(fmt), "vmsnap", "missing")
    assert actions == [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": "fmt-disk0", "name": "vmsnap", "persistent": persistent},
        }
    ]


def test_overlay_bitmap_actions_name_the_overlay() -> None:
    (action,) = overlay_bitmap_actions("overlay-node", bitmap="b")
    assert action == {
        "type": "block-dirty-bitmap-add",
        "data": {"node": "overlay-node", "name": "b", "persistent": True},
    }


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        _strategy(tmp_path, mode="both")
    with pytest.raises(UsageError, match="fleecing"):
        _strategy(tmp_path, mode="pull", fleecing="magic")
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(UsageError):
            _strategy(tmp_path, bitmap=bad)


def test_the_qcow2_reader_takes_the_virtual_size_from_the_header(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(20) + (123456789).to_bytes(8, "big") + bytes(64))
    assert read_header(image).virtual_size == 123456789
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(512))
    with pytest.raises(ValueError, match="not a qcow2"):
        read_header(raw)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (
            "ok",  # the bits move to a disabled pending bitmap first, so a crash leaves them in both
            [
                ("--add", "--merge", "vmsnap", "--disable", "-f", "qcow2", "/img/d.qcow2", "vmsnap.pending"),
                ("--clear", "-f", "qcow2", "/img/d.qcow2", "vmsnap"),
            ],
        ),
        ("missing", [("--add", "-f", "qcow2", "/img/d.qcow2", "vmsnap")]),
        (
            "broken",
            [
                ("--remove", "-f", "qcow2", "/img/d.qcow2", "vmsnap"),
                ("--add", "-f", "qcow2", "/img/d.qcow2", "vmsnap"),
            ],
        ),
    ],
)
def test_an_offline_image_parks_its_bits_with_qemu_img_bitmap(
    state: BitmapState, expected: list[tuple[str, ...]]
) -> None:
    runner = RecordingRunner()
    ImageBitmaps(runner, Path("/img/d.qcow2")).park("vmsnap", state)
    assert runner.calls == [("qemu-img", "bitmap", *argv) for argv in expected]


def test_offline_bitmaps_read_as_qmp_reports_them() -> None:
    bitmaps = [
        {"name": "vmsnap", "flags": ["auto"]},
        {"name": "off", "flags": []},
        {"name": "torn", "flags": ["in-use", "auto"]},
    ]
    runner = RecordingRunner()
    info = {"format-specific": {"type": "qcow2", "data": {"bitmaps": bitmaps}}}
    runner.responses[("qemu-img", "info")] = (0, json.dumps(info))
    infos = ImageBitmaps(runner, Path("/img/d.qcow2")).infos()
    assert runner.calls == [("qemu-img", "info", "--output=json", "-f", "qcow2", "/img/d.qcow2")]  # no -U
    assert [bitmap_state(infos, name)[0] for name in ("vmsnap", "off", "torn", "gone")] == [
        "ok",
        "broken",
        "broken",
        "missing",
    ]


def test_qemu_img_bitmap_needs_an_operation() -> None:
    with pytest.raises(UsageError):
        qemu_img.bitmap(RecordingRunner(), Path("/img/d.qcow2"), "vmsnap")
