"""Argument building of the QEMU strategies, with a RecordingRunner (no QEMU runs here; the integration tests
in tests/integration/strategies prove the commands work)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes import RecordingRunner
from vmsnap.errors import SnapshotError, UsageError
from vmsnap.image.qemu_img import convert_argv, source_args
from vmsnap.model import Disk, ExportSource
from vmsnap.processes import stop as stop_process
from vmsnap.strategies.external import (
    ExternalOverlayStrategy,
    _node_name,
    overlay_path,
    parse_overlay_path,
    root_image,
)
from vmsnap.strategies.internal import InternalSnapshotStrategy
from vmsnap.vm.machine import OfflineMachine

DISK = Disk("disk0", "", Path("/img/disk0.qcow2"), "qcow2", 64 << 20)


def test_file_source_with_internal_snapshot_reads_with_dash_l() -> None:
    source = ExportSource(
        "file", "/img/a,b.qcow2", "qcow2", DISK, DISK.virtual_size, {"snapshot.name": "s,1"}, force_share=True
    )
    assert source_args(source) == ["-U", "-l", "snapshot.name=s,,1", "-f", "qcow2", "/img/a,b.qcow2"]


def test_other_image_opts_become_escaped_image_opts() -> None:
    source = ExportSource("file", "/img/a,b.qcow2", "qcow2", DISK, DISK.virtual_size, {"cache.direct": "on"})
    assert source_args(source) == [
        "--image-opts",
        "driver=qcow2,file.driver=file,file.filename=/img/a,,b.qcow2,cache.direct=on",
    ]


def test_nbd_source_is_raw_and_convert_writes_qcow2() -> None:
    source = ExportSource("nbd", "nbd+unix:///disk0?socket=/tmp/x/nbd.sock", "raw", DISK, DISK.virtual_size)
    assert convert_argv(source, Path("/out/d.qcow2")) == [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "nbd+unix:///disk0?socket=/tmp/x/nbd.sock",
        "-O",
        "qcow2",
        "/out/d.qcow2",
    ]


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,20}", fullmatch=True))
def test_overlay_names_round_trip(name: str) -> None:
    path = overlay_path(Path("/vm/disk0.qcow2"), name)
    assert path.parent == Path("/vm")
    assert parse_overlay_path(path) == (Path("/vm/disk0.qcow2"), name)
    assert root_image(overlay_path(path, "other")) == Path("/vm/disk0.qcow2")


def test_overlay_path_refuses_names_that_escape() -> None:
    for bad in ("../x", "a/b", ".hidden"):
        with pytest.raises(UsageError):
            overlay_path(Path("/vm/disk0.qcow2"), bad)
    assert parse_overlay_path(Path("/vm/disk0.qcow2")) is None


def test_node_names_fit_qemus_limit() -> None:
    long_disk = Disk("d" * 100, "n", Path("/" + "x" * 200), "qcow2", 1)
    name = _node_name(long_disk, "s" * 128)
    assert len(name) <= 31 and name[0].isalpha()
    assert name != _node_name(long_disk, "other")


def test_stop_process_ignores_a_pid_file_that_is_not_a_number() -> None:
    runner = RecordingRunner()
    stop_process(runner, "1; rm -rf /")
    stop_process(runner, "")
    assert runner.calls == []
    stop_process(runner, "4242")
    assert runner.calls[0][:2] == ("sh", "-c") and runner.calls[0][-2] == "4242"


def _offline(tmp_path: Path, runner: RecordingRunner) -> tuple[OfflineMachine, list[Disk]]:
    files = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for f in files:
        f.write_bytes(b"")
    info = {"virtual-size": 1 << 20, "format": "qcow2", "format-specific": {"data": {"lazy-refcounts": True}}}
    runner.responses[("qemu-img", "info")] = (0, json.dumps(info))
    disks = [Disk(f.stem, "", f, "qcow2", 1 << 20) for f in files]
    return OfflineMachine(files, runner=runner), disks


def test_internal_offline_create_is_one_qemu_img_snapshot_per_image(tmp_path: Path) -> None:
    runner = RecordingRunner()
    machine, disks = _offline(tmp_path, runner)
    refs = InternalSnapshotStrategy(machine).create(disks, name="s1")
    made = [c for c in runner.calls if c[:2] == ("qemu-img", "snapshot")]
    assert made == [("qemu-img", "snapshot", "-c", "s1", str(d.file)) for d in disks]
    assert [r.location for r in refs] == [str(d.file) for d in disks]


def test_internal_offline_create_undoes_earlier_disks_when_one_fails(tmp_path: Path) -> None:
    runner = RecordingRunner()
    machine, disks = _offline(tmp_path, runner)
    runner.responses[("qemu-img", "snapshot", "-c", "s1", str(disks[1].file))] = (1, "disk full")
    with pytest.raises(SnapshotError, match="no snapshot was kept"):
        InternalSnapshotStrategy(machine).create(disks, name="s1")
    assert runner.calls[-1] == ("qemu-img", "snapshot", "-d", "s1", str(disks[0].file))


def test_transaction_actions_address_the_format_node() -> None:
    disk = Disk("disk0", "fmt-disk0", Path("/vm/disk0.qcow2"), "qcow2", 1)
    machine = OfflineMachine([Path("/vm/disk0.qcow2")], runner=RecordingRunner())
    (internal,) = InternalSnapshotStrategy(machine).transaction_actions(disk, name="s1")
    assert internal == {
        "type": "blockdev-snapshot-internal-sync",
        "data": {"device": "fmt-disk0", "name": "s1"},
    }
    (external,) = ExternalOverlayStrategy(machine).transaction_actions(disk, name="s1")
    assert external["type"] == "blockdev-snapshot-sync"
    assert external["data"]["node-name"] == "fmt-disk0"
    assert external["data"]["snapshot-file"] == "/vm/disk0.qcow2.vmsnap-s1.qcow2"
    assert external["data"]["mode"] == "absolute-paths"


def test_unknown_options_are_usage_errors() -> None:
    machine = OfflineMachine([Path("/vm/disk0.qcow2")], runner=RecordingRunner())
    with pytest.raises(UsageError, match="merge"):
        ExternalOverlayStrategy(machine, merge="sideways")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="export_via"):
        InternalSnapshotStrategy(machine, export_via="smoke")  # type: ignore[arg-type]
