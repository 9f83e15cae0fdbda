"""The lab guest's LVM measurement: what it reads from dd and its marks, the ratios, and the order of its
commands (a scripted runner: the real run is tests/integration/strategies/test_lvm.py's)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import attrs
import pytest

from vmsnap.benchmark.costs import CostBench
from vmsnap.benchmark.lvm_lab import (
    MERGE,
    TIMED,
    LvmLabBench,
    LvmLabError,
    Timed,
    dm_name,
    lvm_in_lab_guest,
    parse_dd,
    parse_marks,
    with_relative,
)
from vmsnap.benchmark.measure import Measurement, median_of
from vmsnap.benchmark.report import make_result, markdown, summarise, validate
from vmsnap.lab.image import LabImage, LabImageError
from vmsnap.runner import DEFAULT_TIMEOUT, CommandResult

MiB = 1024 * 1024
DD = "2048+0 records in\n2048+0 records out\n134217728 bytes (134 MB, 128 MiB) copied, 6.98848 s, 19.2 MB/s\n"


def test_dd_rate_is_computed_from_bytes_and_seconds() -> None:
    assert parse_dd(DD) == pytest.approx(134217728 / 6.98848 / 1e6)
    assert parse_dd("1048576 bytes (1.0 MB, 1.0 MiB) copied, 1.5e-05 s, 70 GB/s") == pytest.approx(
        1048576 / 1.5e-5 / 1e6
    )
    with pytest.raises(LvmLabError, match="dd printed no summary"):
        parse_dd("dd: error writing '/dev/vg/lv': No space left on device\n")


def test_marks_give_seconds_and_bytes_between_the_first_and_the_last() -> None:
    out = "  removed\nvmsnap-mark 14.12 1000\nnoise\nvmsnap-mark 14.50 1000\nvmsnap-mark 15.02 3048\n"
    timed = parse_marks(out)
    assert timed.seconds == pytest.approx(0.90)
    assert timed.bytes_written == 2048 * 512.0
    # within one 10 ms tick: half a tick, never zero
    assert parse_marks("vmsnap-mark 3.00 5\nvmsnap-mark 3.00 5\n") == Timed(0.005, 0.0)
    with pytest.raises(LvmLabError, match="no pair of marks"):
        parse_marks("vmsnap-mark 3.00 5\n")
    with pytest.raises(LvmLabError, match="not two numbers"):
        parse_marks("vmsnap-mark 3.00 x\nvmsnap-mark 4.00 5\n")


def test_relative_is_cleanup_time_over_writing_the_same_data() -> None:
    cleanup = Measurement("lvm", "rollback", "classic, 64 MiB written", 2.0, "s", (2.0,), 64.0 * MiB)
    # 64 MiB at 67.108864 MB/s take one second
    assert with_relative(cleanup, 64, 67.108864).relative == pytest.approx(2.0)
    assert with_relative(cleanup, 64, 0.0).relative is None


def test_device_mapper_names_double_hyphens() -> None:
    assert dm_name("vmsnapbench/origin") == "vmsnapbench-origin"
    assert dm_name("vg-a/lv-b") == "vg--a-lv--b"


def test_median_keeps_runs_and_bytes() -> None:
    m = median_of("lvm", "delete", "x", "s", [(0.3, 10.0), (0.1, 30.0), (0.2, 20.0)])
    assert (m.value, m.runs, m.bytes_written) == (0.2, (0.3, 0.1, 0.2), 20.0)
    with pytest.raises(ValueError, match="no runs"):
        median_of("lvm", "delete", "x", "s", [])


@attrs.define
class ScriptedGuest:
    """Answers dd with a summary, the timing scripts with marks, ``lvs`` with no snapshot; records argv."""

    calls: list[tuple[str, ...]] = attrs.Factory(list)
    clock: float = 10.0

    @property
    def host(self) -> str:
        return "guest:scripted"

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        args = tuple(argv)
        self.calls.append(args)
        out, err = "", ""
        if args[0] == "dd":
            err = DD
        elif args[:2] == ("sh", "-c"):
            out = f"vmsnap-mark {self.clock:.2f} 0\nvmsnap-mark {self.clock + 0.5:.2f} 2048\n"
            self.clock += 1
        elif args[:2] == ("lvm", "lvs"):
            out = "  64.00\n" if "chunk_size" in args else "  origin\n"
        return CommandResult(args, 0, out, err, self.host)

    def which(self, name: str) -> str | None:
        return f"/usr/bin/{name}"


def test_the_bench_runs_each_step_in_order_and_records_every_figure() -> None:
    guest = ScriptedGuest()
    bench = LvmLabBench(guest, "vda", lv_mib=16, written_mib=[8], runs=2)
    bench.run("/dev/disk/by-id/virtio-pvbench")
    figures = [(m.metric, m.variant) for m in bench.measurements]
    assert figures == [
        ("write_baseline", "classic"),
        ("write_first", "classic"),
        ("write_again", "classic"),
        ("delete", "classic, 8 MiB written"),
        ("rollback", "classic, 8 MiB written"),
        ("write_baseline", "thin"),
        ("write_first", "thin"),
        ("write_again", "thin"),
        ("delete", "thin, 8 MiB written"),
        ("rollback", "thin, 8 MiB written"),
    ]
    rollback = bench.measurements[4]
    assert (rollback.value, rollback.bytes_written) == (0.5, 1 * MiB)
    assert rollback.relative == pytest.approx(0.5 / (8 * MiB / 1e6 / parse_dd(DD)), rel=1e-3)
    scripts = [c for c in guest.calls if c[:2] == ("sh", "-c")]
    # a classic merge waits for device-mapper in MERGE; a thin one is lvconvert alone, between marks
    assert [c[2] for c in scripts] == [TIMED, TIMED, MERGE, MERGE, TIMED, TIMED, TIMED, TIMED]
    assert ("sh", "-c", MERGE, "sh", "vda", "vmsnapbench/snap", "vmsnapbench-origin") in guest.calls
    assert ("sh", "-c", TIMED, "sh", "vda", "lvm", "lvconvert", "--merge", "-i", "1", "vmsnapbench/snap") in (
        guest.calls
    )
    assert all("oflag=direct" in c and "bs=64K" in c for c in guest.calls if c[0] == "dd")
    assert guest.calls[-1] == ("lvm", "lvremove", "-q", "-y", "vmsnapbench")
    assert bench.chunks_text() == "classic 64 KiB chunks, thin 64 KiB chunks"


def test_a_snapshot_left_after_a_timed_cleanup_is_an_error() -> None:
    class Deferring(ScriptedGuest):
        def run(self, argv: Sequence[str], **kwargs: object) -> CommandResult:
            result = super().run(argv)
            if tuple(argv[:2]) == ("lvm", "lvs"):
                return attrs.evolve(result, stdout="  origin\n  snap\n")
            return result

    bench = LvmLabBench(Deferring(), "vda", lv_mib=16, written_mib=[8], runs=1)
    with pytest.raises(LvmLabError, match="still there after the timed delete"):
        bench.run("/dev/vdz")


def test_the_table_marks_the_row_measured_in_the_lab_guest() -> None:
    measurements = [
        Measurement("lvm", "write_baseline", "classic", 200.0, "MB/s", (200.0,)),
        Measurement("lvm", "write_first", "classic", 20.0, "MB/s", (20.0,)),
        Measurement("lvm", "rollback", "classic, 64 MiB written", 2.0, "s", (2.0,), 66.0 * MiB, 3.0),
    ]
    cells = summarise(measurements)
    assert cells["lvm"]["write_cost"] == "classic: first write 20 MB/s (10.0x slower than 200 MB/s)"
    assert cells["lvm"]["rollback_cost"] == (
        "classic, 64 MiB written: 2.00 s (3.0x the time to write that data without a snapshot), "
        "66 MiB written"
    )
    notes = {"lvm": {"where": "measured in the lab guest under TCG", "detail": "measured … emulator's."}}
    document = make_result(measurements, quick=True, image_mib=16, runs=1, skipped={}, notes=notes).to_json()
    validate(document)
    text = markdown(document, {"lvm": {"scope": "all storage"}})
    row = next(line for line in text.splitlines() if line.startswith("| lvm |"))
    assert "(measured in the lab guest under TCG) classic: first write 20 MB/s (10.0x slower" in row
    assert "lvm: measured … emulator's." in text
    assert "| lvm | rollback | classic, 64 MiB written | 2.00 s | 2 | 66 | 3.00 |" in text
    document["notes"] = {"lvm": {"detail": "no where"}}
    with pytest.raises(ValueError, match="the note on lvm has no 'where'"):
        validate(document)


def test_without_a_lab_image_the_row_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_image(**kwargs: object) -> LabImage:
        raise LabImageError("building the lab guest failed while downloading linux-image-amd64: offline")

    monkeypatch.setattr("vmsnap.lab.image.build_lab_image", no_image)
    bench = CostBench(tmp_path, runs=1, size_mib=8, written_sizes_mib=[4])
    bench.run(["lvm"])
    assert bench.measurements == [] and bench.notes == {}
    assert bench.skipped["lvm"] == (
        "no lab guest image could be built (building the lab guest failed while downloading "
        "linux-image-amd64: offline)"
    )
    monkeypatch.setattr("shutil.which", lambda name: None)
    outcome = lvm_in_lab_guest(tmp_path / "x", lv_mib=8, written_mib=[4], runs=1)
    assert outcome.skipped == "the lab guest needs qemu-system-x86_64, which is not installed"


def test_a_failure_inside_the_guest_skips_the_row_with_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest is stopped and the host's rows survive: the table says what went wrong."""
    stopped: list[bool] = []

    class FailingGuest:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.runner = ScriptedGuest()
            self.process = None

        def start(self) -> FailingGuest:
            return self

        def stop(self) -> None:
            stopped.append(True)

    def failing_run(self: LvmLabBench, pv: str, *, thin: bool = True) -> None:
        raise LvmLabError("vmsnapbench/snap is still there after the timed rollback: LVM deferred it")

    monkeypatch.setattr("vmsnap.lab.image.build_lab_image", lambda **kwargs: None)
    monkeypatch.setattr("vmsnap.lab.guest.LabGuest", FailingGuest)
    monkeypatch.setattr(LvmLabBench, "run", failing_run)
    outcome = lvm_in_lab_guest(tmp_path, lv_mib=8, written_mib=[4], runs=1)
    assert outcome.skipped == (
        "the measurement in the lab guest failed (vmsnapbench/snap is still there after the timed rollback: "
        "LVM deferred it)"
    )
    assert outcome.measurements == () and stopped == [True]
