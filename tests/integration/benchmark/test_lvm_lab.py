"""The LVM row of the strategy costs, measured for real in a lab guest of its own (tiny LVs, one run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsnap.benchmark.costs import CostBench
from vmsnap.lab.image import LabImage
from vmsnap.runner import LocalRunner

pytestmark = pytest.mark.guest


def test_the_harness_measures_lvm_in_the_lab_guest_and_marks_the_row(
    lab_image: LabImage, tmp_path: Path
) -> None:
    """Classic and thin snapshots of an 8 MiB LV: a snapshot slows the first write, the merge of a classic
    snapshot writes back what was written, and the guest is gone afterwards."""
    bench = CostBench(tmp_path / "work", runs=1, size_mib=8, written_sizes_mib=[4])
    bench.run(["lvm"])
    assert bench.skipped == {}
    assert bench.notes["lvm"]["where"] in (
        "measured in the lab guest under TCG",
        "measured in the lab guest under KVM",
    )
    assert "classic 4 KiB chunks, thin 64 KiB chunks" in bench.notes["lvm"]["detail"]
    figures = {(m.metric, m.variant): m for m in bench.measurements}
    assert set(figures) == {
        (metric, variant)
        for variant in ("classic", "thin")
        for metric in ("write_baseline", "write_first", "write_again")
    } | {(metric, f"{v}, 4 MiB written") for v in ("classic", "thin") for metric in ("delete", "rollback")}
    assert all(m.value > 0 and m.strategy == "lvm" for m in bench.measurements)
    # every chunk the first write touches is copied first: slower than the same writes without a snapshot
    assert figures["write_first", "classic"].value < figures["write_baseline", "classic"].value
    merged = figures["rollback", "classic, 4 MiB written"]
    assert merged.bytes_written is not None and merged.bytes_written >= 4 * 1024 * 1024
    assert merged.relative is not None and merged.relative > 0
    # the guest was stopped: no QEMU of ours is left with the bench's disk open
    pv = str(tmp_path / "work" / "lvm" / "pv.raw")
    assert pv not in LocalRunner().run(["ps", "-eo", "args"]).stdout
