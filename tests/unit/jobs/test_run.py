"""run_job with scripted backup functions (the real orchestrator runs in tests/integration/test_jobs.py)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import pytest

from vmsnap.errors import LeaseError, QMPConnectionError
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import EntryFailure, JobConfig, VmSpec, parse_job
from vmsnap.jobs.run import (
    NEXT_BACKUP,
    BackupInfo,
    Prediction,
    VmBackup,
    apply_retention,
    as_prune_result,
    hook_environment,
    prune_json,
    run_job,
)
from vmsnap.repo.reports import GcReport, PruneResult
from vmsnap.repo.retention import RetentionPolicy


def job_with(tmp_path: Path, extra: str = "", vms: int = 3) -> tuple[JobConfig, tuple[VmSpec, ...]]:
    text = f'repository = "/r"\nconcurrency = {vms}\nmetrics = "{tmp_path / "m.prom"}"\n{extra}\n'
    text += "".join(f'[[vm]]\nqmp = "/run/vm{i}.qmp"\n' for i in range(vms))
    job = parse_job(text, path=tmp_path / "j.toml")
    specs, _ = expand_vms(job, lambda uri: [])
    return job, specs


def test_one_failing_vm_stops_no_other_and_vms_run_at_once(tmp_path: Path) -> None:
    job, specs = job_with(tmp_path)
    together = threading.Barrier(3, timeout=30)  # passes only when three backups run at the same time

    def backup(spec: VmSpec) -> VmBackup:
        together.wait()
        if spec.name == "vm1":
            raise QMPConnectionError("QMP socket /run/vm1.qmp does not exist")
        if spec.name == "vm2":
            raise RuntimeError("bug\nwith two lines")
        return VmBackup("id-0", "full", 42, 0.5, 12.0)

    report = run_job(job, specs, backup=backup, lock_dir=tmp_path / "locks")
    assert report.exit_status == 1
    ok, qmp, bug = report.outcomes
    assert ok.ok and ok.bytes_written == 42 and ok.freeze_ms == 12.0
    assert not qmp.ok and qmp.line == 8 and "does not exist" in str(qmp.error)
    assert bug.error == "RuntimeError: bug with two lines"
    assert [o.vm for o in report.failed] == ["vm1", "vm2"]
    as_json = json.loads(json.dumps(report.to_json()))
    assert [v["ok"] for v in as_json["vms"]] == [True, False, False]


def test_retention_after_each_backup_and_its_failure(tmp_path: Path) -> None:
    job, specs = job_with(tmp_path, "[retention]\nkeep_last = 1\n", vms=2)
    calls: list[tuple[str, bool]] = []

    def retention(spec: VmSpec, policy: RetentionPolicy, *, dry_run: bool) -> PruneResult:
        calls.append((spec.name, dry_run))
        if spec.name == "vm1":
            raise OSError("disk gone")
        return PruneResult(spec.name, (), ("b",), ())

    report = run_job(
        job, specs, backup=lambda s: VmBackup("b", "full", 1, 0.1), retention=retention, lock_dir=tmp_path
    )
    assert sorted(calls) == [("vm0", False), ("vm1", False)]
    vm0, vm1 = report.outcomes
    assert vm0.ok and vm0.retention == PruneResult("vm0", (), ("b",), ())
    assert vm1.backed_up and not vm1.ok and vm1.retention_error == "OSError: disk gone"
    text = (tmp_path / "m.prom").read_text()
    assert 'vmsnap_backup_last_status{job="j",vm="vm1"} 0' in text
    assert 'vmsnap_backup_last_success_timestamp_seconds{job="j",vm="vm1"}' in text  # the backup did happen


def test_a_dry_run_backs_up_nothing_and_writes_nothing(tmp_path: Path) -> None:
    job, specs = job_with(tmp_path, "[retention]\nkeep_daily = 1\n", vms=2)

    def backup(spec: VmSpec) -> VmBackup:
        raise AssertionError("a dry run must not back up")

    def retention(spec: VmSpec, policy: RetentionPolicy, *, dry_run: bool) -> PruneResult:
        assert dry_run
        return PruneResult(spec.name, ("old",), (), ())

    report = run_job(
        job,
        specs,
        backup=backup,
        retention=retention,
        predict=lambda s: Prediction("incremental", "after x"),
        dry_run=True,
        entry_failures=[EntryFailure(9, "domain * at qemu+ssh://hv2/system", "cannot connect")],
    )
    assert [o.kind for o in report.outcomes] == ["incremental", "incremental"]
    assert not (tmp_path / "m.prom").exists() and report.hook is None
    assert "would remove 1" in report.summary() and "line 9" in report.summary()
    assert report.exit_status == 1  # an entry that could not be expanded fails the run


def test_apply_retention_removes_newest_first_and_plans_the_next_backup() -> None:
    day = dt.timedelta(days=1)
    now = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
    backups = [
        BackupInfo("f1", now - 3 * day),
        BackupInfo("i2", now - 2 * day, parent="f1"),
        BackupInfo("f3", now - day),
    ]
    removed: list[str] = []
    result = apply_retention(backups, RetentionPolicy(keep_last=1), removed.append, chains=True)
    assert result.kept_ids == ("f3",) and removed == ["i2", "f1"]  # a child before its parent
    preview = apply_retention(backups, RetentionPolicy(keep_last=2), None, upcoming=now, chains=True)
    assert preview.kept_ids == (NEXT_BACKUP, "f3") and preview.removed == ("i2", "f1")
    # as the repository's prune reports it: oldest first, a parent kept only for a chain is "needed"
    chained = [*backups, BackupInfo("i4", now - day / 2, parent="f3")]
    pruned = as_prune_result("vm", apply_retention(chained, RetentionPolicy(keep_last=1), None, chains=True))
    assert pruned == PruneResult(
        "vm", ("f1", "i2"), ("i4",), ("f3",), {"i4": "last #1", "f3": "parent of i4"}
    )
    assert prune_json(pruned) == {
        "kept": [{"backup_id": "f3", "reason": "parent of i4"}, {"backup_id": "i4", "reason": "last #1"}],
        "removed": ["f1", "i2"],
    }


def test_the_hook_gets_a_clean_environment_and_cannot_break_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("VMSNAP_KEY_FILE", "/etc/vmsnap/key")
    job, specs = job_with(tmp_path, f'on_failure = ["{tmp_path / "no-such-hook"}"]', vms=1)

    def backup(spec: VmSpec) -> VmBackup:
        raise QMPConnectionError("gone")

    report = run_job(job, specs, backup=backup, lock_dir=tmp_path)
    assert (
        report.hook is not None and report.hook.exit_code is None and "no-such-hook" in str(report.hook.error)
    )
    env = hook_environment(report, job)
    assert env["VMSNAP_FAILED_VMS"] == "vm0" and env["VMSNAP_STATUS"] == "failed"
    assert "s3cr3t" not in env.values() and "VMSNAP_KEY_FILE" not in env


def test_gc_runs_once_after_every_vm_and_its_failure_fails_the_run(tmp_path: Path) -> None:
    job, specs = job_with(tmp_path, "gc = true", vms=2)
    order: list[str] = []

    def backup(spec: VmSpec) -> VmBackup:
        order.append(spec.name)
        return VmBackup("b", "full", 1, 0.1)

    def gc() -> GcReport:
        order.append("gc")
        return GcReport(chunks_kept=3, chunks_freed=2, bytes_freed=8 << 20)

    report = run_job(job, specs, backup=backup, gc=gc, lock_dir=tmp_path)
    assert sorted(order[:2]) == ["vm0", "vm1"] and order[2:] == ["gc"]
    assert report.ok and report.gc == GcReport(3, 2, 8 << 20)
    assert "gc: freed 2 chunks (8.0 MiB), kept 3" in report.summary()
    text = (tmp_path / "m.prom").read_text()
    assert 'vmsnap_job_last_gc_freed_bytes{job="j"} 8388608' in text

    def refused() -> GcReport:
        raise LeaseError("a backup of vm9 is running (lease locks/vms/vm9)")

    failed = run_job(job, specs, backup=backup, gc=refused, lock_dir=tmp_path)
    assert not failed.ok and failed.exit_status == 1 and not failed.failed  # the VMs themselves are fine
    assert failed.to_json()["gc_error"] == "a backup of vm9 is running (lease locks/vms/vm9)"
    assert "gc: FAILED: a backup of vm9" in failed.summary()
    text = (tmp_path / "m.prom").read_text()
    assert 'vmsnap_job_last_status{job="j"} 0' in text
    assert 'vmsnap_job_last_gc_freed_bytes{job="j"} 8388608' in text  # the last gc that ran
    dry = run_job(job, specs, backup=backup, gc=refused, dry_run=True)
    assert dry.gc is None and "gc: would run after the backups" in dry.summary()

    no_gc, _ = job_with(tmp_path, "", vms=1)
    assert run_job(no_gc, specs[:1], backup=backup, gc=refused, lock_dir=tmp_path).ok  # not asked for
