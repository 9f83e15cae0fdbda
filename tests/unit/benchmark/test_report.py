"""The benchmark harness's own tests: table rendering, result schema, and one tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsnap.benchmark.costs import CostBench
from vmsnap.benchmark.measure import Measurement
from vmsnap.benchmark.report import make_result, markdown, summarise, validate, write_outputs


def _sample() -> list[Measurement]:
    return [
        Measurement("internal", "write_baseline", "lazy_refcounts=off", 3000.0, "MB/s", (3000.0,)),
        Measurement("internal", "write_first", "lazy_refcounts=off", 30.0, "MB/s", (29.0, 30.0, 31.0)),
        Measurement("internal", "write_again", "lazy_refcounts=off", 2900.0, "MB/s", (2900.0,)),
        Measurement("external", "delete", "commit, 64 MiB written", 0.25, "s", (0.25,), 64 * 1024 * 1024.0),
        Measurement("external", "rollback", "64 MiB written", 0.002, "s", (0.002,), 0.0),
    ]


def test_summary_cells_name_ratio_and_cleanup() -> None:
    cells = summarise(_sample())
    assert cells["internal"]["write_cost"] == (
        "lazy_refcounts=off: first write 30 MB/s (100.0x slower than 3000 MB/s), again 2900 MB/s"
    )
    assert cells["external"]["delete_cost"] == "commit, 64 MiB written: 250 ms, 64 MiB written"
    assert cells["external"]["rollback_cost"] == "64 MiB written: 2 ms, 0 MiB written"


def test_markdown_table_keeps_trait_cells_and_fills_costs() -> None:
    result = make_result(_sample(), quick=True, image_mib=16, runs=3, skipped={"lvm": "no device-mapper"})
    document = result.to_json()
    validate(document)
    traits = {
        "internal": {"scope": "one VM", "write_cost": "high"},
        "lvm": {"scope": "all storage", "write_cost": "about 2 times lower"},
    }
    text = markdown(document, traits)
    lines = [line for line in text.splitlines() if line.startswith("| internal |")]
    assert "100.0x slower" in lines[0]
    assert "one VM" in lines[0]
    lvm = next(line for line in text.splitlines() if line.startswith("| lvm |"))
    assert "not measured: no device-mapper" in lvm
    assert "all storage" in lvm


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("measurements"), "measurements"),
        (lambda d: d.update(schema=2), "schema 2"),
        (lambda d: d["measurements"][0].pop("unit"), "unit"),
        (lambda d: d["measurements"][0].update(runs=[]), "no runs"),
    ],
)
def test_schema_violations_are_named(mutate: object, message: str) -> None:
    document = make_result(_sample(), quick=True, image_mib=16, runs=3, skipped={}).to_json()
    mutate(document)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        validate(document)


def test_a_tiny_real_run_writes_valid_outputs(tmp_path: Path) -> None:
    """External overlay costs on an 8 MiB image with real qemu-img: the figures must be positive."""
    bench = CostBench(tmp_path / "work", runs=1, size_mib=8, written_sizes_mib=[2])
    bench.run(["external"])
    metrics = {(m.metric, m.variant) for m in bench.measurements}
    assert ("write_first", "") in metrics
    assert ("delete", "commit, 2 MiB written") in metrics
    assert all(m.value > 0 for m in bench.measurements)
    result = make_result(bench.measurements, quick=True, image_mib=8, runs=1, skipped=bench.skipped)
    paths = write_outputs(result, tmp_path / "out", {})
    document = json.loads(paths["json"].read_text())
    validate(document)
    assert "external" in paths["markdown"].read_text()


def test_tiny_real_runs_of_the_qcow2_strategies_record_every_cleanup_row(tmp_path: Path) -> None:
    """Internal snapshots and blockdev-backup on 8 MiB images: each delete and rollback row is measured once
    per amount written, with the bytes the cleanup wrote."""
    bench = CostBench(tmp_path / "work", runs=1, size_mib=8, written_sizes_mib=[2])
    bench.run(["internal", "backup"])
    cleanup = [(m.strategy, m.metric, m.variant) for m in bench.measurements if m.unit == "s"]
    assert cleanup == [
        ("internal", "delete", "2 MiB written"),
        ("internal", "rollback", "2 MiB written"),
        ("backup", "delete", "remove target"),
        ("backup", "rollback", "restore 8 MiB"),
    ]
    assert all(m.value > 0 and m.bytes_written is not None for m in bench.measurements if m.unit == "s")
    # a restore writes the whole image: the kernel's accounting sees at least the 8 MiB of data
    restore = next(m for m in bench.measurements if m.variant == "restore 8 MiB")
    assert restore.bytes_written is not None and restore.bytes_written >= 8 * 1024 * 1024
