"""The metrics text file, read back with prometheus_client's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmsnap.errors import VmsnapError
from vmsnap.jobs.metrics import VmSample, escape_label, merge, parse_series, render, update


def families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """metric family → {sorted labels: value}, through prometheus_client's parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def vm(name: str, job: str = "nightly") -> tuple[tuple[str, str], ...]:
    return (("job", job), ("vm", name))


def test_a_run_then_a_failure_keeps_the_last_success(tmp_path: Path) -> None:
    path = tmp_path / "vmsnap-nightly.prom"
    update(
        path,
        "nightly",
        [
            VmSample("vm1", True, 1000.0, 2.5, 4096, 0.042, False),
            VmSample("vm2", True, 1001.0, 1.0, 512, None, False),
        ],
        job_finished=1002.0,
        job_duration=3.0,
    )
    text = update(
        path,
        "nightly",
        [VmSample("vm1", True, 2000.0, 0.5, 128, 0.01, True), VmSample("vm2", False, 2001.0, 0.2)],
        job_finished=2002.0,
        job_duration=1.5,
    )
    got = families(text)
    assert got["vmsnap_backup_last_success_timestamp_seconds"] == {vm("vm1"): 2000.0, vm("vm2"): 1001.0}
    assert got["vmsnap_backup_last_run_timestamp_seconds"] == {vm("vm1"): 2000.0, vm("vm2"): 2001.0}
    assert got["vmsnap_backup_last_status"] == {vm("vm1"): 1.0, vm("vm2"): 0.0}
    assert got["vmsnap_backup_last_bytes"] == {vm("vm1"): 128.0, vm("vm2"): 512.0}
    assert got["vmsnap_backup_last_incremental"] == {vm("vm1"): 1.0, vm("vm2"): 0.0}
    assert got["vmsnap_backup_last_freeze_seconds"][vm("vm1")] == pytest.approx(0.01)
    assert got["vmsnap_backup_failures_total"] == {vm("vm1"): 0.0, vm("vm2"): 1.0}
    assert got["vmsnap_job_last_status"] == {(("job", "nightly"),): 0.0}
    assert got["vmsnap_job_last_failed"] == {(("job", "nightly"),): 1.0}
    assert got["vmsnap_job_last_run_timestamp_seconds"] == {(("job", "nightly"),): 2002.0}
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["vmsnap_backup_failures"] == "counter"  # the parser drops _total from a counter's name
    assert kinds["vmsnap_backup_last_status"] == "gauge"
    assert text.count("# HELP vmsnap_backup_last_status ") == 1 and text.count("# TYPE ") == 12
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_another_jobs_series_are_kept_and_a_vm_that_left_the_job_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "shared.prom"
    update(path, "other", [VmSample("db", True, 10.0, 1.0, 1)], job_finished=11.0, job_duration=1.0)
    update(path, "nightly", [VmSample("old", True, 20.0, 1.0, 1)], job_finished=21.0, job_duration=1.0)
    got = families(
        update(path, "nightly", [VmSample("new", True, 30.0, 1.0, 1)], job_finished=31, job_duration=1)
    )
    assert set(got["vmsnap_backup_last_status"]) == {vm("db", "other"), vm("new")}
    assert got["vmsnap_job_last_status"] == {(("job", "nightly"),): 1.0, (("job", "other"),): 1.0}


def test_when_some_vms_could_not_be_listed_absent_vms_stay_to_go_stale() -> None:
    previous = merge({}, "j", [VmSample("web-1", True, 5.0, 1.0, 7)], job_finished=6.0, job_duration=1.0)
    series = merge(previous, "j", [], job_finished=9.0, job_duration=1.0, failed_entries=1)
    assert series[("vmsnap_backup_last_success_timestamp_seconds", vm("web-1", "j"))] == 5.0
    assert series[("vmsnap_job_last_failed", (("job", "j"),))] == 1.0
    dropped = merge(previous, "j", [], job_finished=9.0, job_duration=1.0)
    assert ("vmsnap_backup_last_success_timestamp_seconds", vm("web-1", "j")) not in dropped


def test_label_values_are_escaped() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    weird = 'we"ird\\na\nme'
    text = render({("vmsnap_backup_last_status", (("job", "j"), ("vm", weird))): 1.0})
    assert families(text)["vmsnap_backup_last_status"] == {(("job", "j"), ("vm", weird)): 1.0}
    assert parse_series(text) == {("vmsnap_backup_last_status", (("job", "j"), ("vm", weird))): 1.0}


def test_a_missing_directory_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(VmsnapError, match="cannot write the metrics file"):
        update(tmp_path / "no" / "x.prom", "j", [], job_finished=1.0, job_duration=1.0)
