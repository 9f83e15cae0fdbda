"""Backup jobs end to end with real parts, through `run_job_file` (what `vmsnap run` calls).

- a qcow2-layout repository: three bare QEMUs (one reached as another host through the real sshd on
  127.0.0.1: the qcow2 layout writes images with commands on the VM's host, so it needs storage both hosts
  see at one path — here they share it) and a powered-off image; run twice (full, then incremental with one
  VM's QMP socket gone), retention keeping the chains, metrics parsed by prometheus_client, the hook;
- an encrypted chunks repository on S3 (the real SeaweedFS): key_file, retention through the repository's
  prune, gc freeing what prune left, the restored disk compared; a wrong key fails every VM, one line each.

The job the issue describes (libvirt domains and a VM on the far host in one file) is
tests/integration/libvirt/test_job_domains.py."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image
from tests.integration.cli_helpers import qcow2_repo
from tests.integration.s3.fixtures import BUCKET
from vmsnap.errors import VmsnapError
from vmsnap.jobs.default import run_job_file
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import JobConfig, load_job
from vmsnap.jobs.run import JobReport, job_lock
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.repository import Repository
from vmsnap.runner import SshRunner
from vmsnap.vm.hosts import HostSpec
from vmsnap.vm.remote import RemoteHost


def no_libvirt(uri: str | None) -> Sequence[str]:
    raise AssertionError("this job names no libvirt domain")


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[dict[str, QemuProcess]]:
    started: dict[str, QemuProcess] = {}
    try:
        for name in ("alpha", "beta", "gamma"):
            workdir = tmp_path / name
            workdir.mkdir()
            image = make_image(workdir / "disk0.qcow2", "16M")
            started[name] = QemuProcess(workdir, [DriveSpec(image, "disk0")], name=name).start()
        yield started
    finally:
        for process in started.values():
            if process.qmp_socket.exists():  # no socket, no clean quit: do not wait for one
                process.stop()
            process.kill()


def families(path: Path) -> dict[str, dict[str, float]]:
    """metric name → {vm label (or job label): value}."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("vm", sample.labels["job"])] = sample.value
    return out


def by_vm(report: JobReport) -> dict[str, object]:
    return {o.vm: o for o in report.outcomes}


def test_a_job_twice_with_one_vm_gone(
    tmp_path: Path, vms: dict[str, QemuProcess], sshd: SshRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    delta = make_image(tmp_path / "delta.qcow2", "8M")
    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\ncat > "$1"\nenv > "$2"\nexit 3\n')
    hook.chmod(0o700)
    user, host = sshd.destination.split("@")
    job_file = tmp_path / "nightly.toml"
    job_file.write_text(
        f"""\
repository = "repo"
concurrency = 2
metrics = "metrics/vmsnap-nightly.prom"
on_failure = ["{hook}", "{tmp_path / "report.json"}", "{tmp_path / "hook.env"}"]

[retention]
keep_last = 1

[[vm]]
qmp = "{vms["alpha"].qmp_socket}"
name = "alpha"

[[vm]]
qmp = "{vms["beta"].qmp_socket}"
name = "beta"

[[vm]]
qmp = "{vms["gamma"].qmp_socket}"
name = "gamma"
host = "{user}@{host}:{sshd.port}"

[[vm]]
image = "{delta}"
quiesce = "off"
strategy = "external"
"""
    )
    (tmp_path / "metrics").mkdir()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-hooks")

    def connect(spec: HostSpec) -> RemoteHost:
        assert spec == HostSpec(host, user, sshd.port)
        return RemoteHost(
            spec.destination, port=spec.port, identity=sshd.identity, known_hosts=sshd.known_hosts
        )

    job = load_job(job_file)
    specs, failures = expand_vms(job, no_libvirt)
    assert [s.name for s in specs] == ["alpha", "beta", "gamma", "delta"] and failures == ()
    beta_line = specs[1].line
    repo = qcow2_repo(tmp_path / "repo")  # this test looks at the qcow2 layout's directories

    def run(job: JobConfig, *, dry_run: bool = False) -> JobReport:
        # the one call `vmsnap run JOBFILE [--dry-run]` makes
        return run_job_file(
            job_file,
            dry_run=dry_run,
            list_domains=no_libvirt,
            connect_host=connect,
            lock_dir=tmp_path / "locks",
        )

    # -- run 1: every VM, full ---------------------------------------------------------------------
    first = run(job)
    assert first.ok, first.summary()
    assert first.exit_status == 0 and first.hook is None
    assert {o.vm: o.kind for o in first.outcomes} == dict.fromkeys(
        ["alpha", "beta", "gamma", "delta"], "full"
    )
    assert all(o.bytes_written > 0 and o.backup_id for o in first.outcomes)
    metrics_1 = families(job.metrics)  # type: ignore[arg-type]
    assert metrics_1["vmsnap_backup_last_status"] == dict.fromkeys(["alpha", "beta", "gamma", "delta"], 1.0)
    assert metrics_1["vmsnap_job_last_status"] == {"nightly": 1.0}
    first_ids = {o.vm: o.backup_id for o in first.outcomes}

    # -- a dry run touches nothing and says what would happen ---------------------------------------
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    metrics_text = job.metrics.read_text()  # type: ignore[union-attr]
    preview = run(job, dry_run=True)
    assert preview.ok, preview.summary()
    kinds = {o.vm: o.kind for o in preview.outcomes}
    assert kinds == {"alpha": "incremental", "beta": "incremental", "gamma": "incremental", "delta": "full"}
    planned = {o.vm: o.retention for o in preview.outcomes}
    assert planned["delta"] is not None and planned["delta"].removed == (first_ids["delta"],)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert job.metrics.read_text() == metrics_text  # type: ignore[union-attr]
    assert "would back up 4 of 4 VMs" in preview.summary()

    # -- run 2: beta's QMP socket is gone ------------------------------------------------------------
    vms["beta"].qmp_socket.unlink()
    second = run(job)
    assert second.exit_status == 1
    outcomes = {o.vm: o for o in second.outcomes}
    beta = outcomes["beta"]
    assert not beta.ok and not beta.backed_up and beta.line == beta_line
    assert beta.error is not None and str(vms["beta"].qmp_socket) in beta.error and "\n" not in beta.error
    assert re.search(rf"^  beta +FAILED \(job file line {beta_line}\): ", second.summary(), re.MULTILINE)
    assert [o.vm for o in second.failed] == ["beta"]
    assert outcomes["alpha"].kind == "incremental" and outcomes["gamma"].kind == "incremental"
    assert outcomes["delta"].kind == "full"
    assert "full backup: strategy external takes no incrementals" in outcomes["delta"].notes
    # retention keep_last = 1: delta's first full is gone; alpha keeps its full as the incremental's parent
    delta_retention = outcomes["delta"].retention
    assert delta_retention is not None and delta_retention.removed == (first_ids["delta"],)
    assert not (repo / "delta" / str(first_ids["delta"])).exists()
    alpha_retention = outcomes["alpha"].retention
    assert alpha_retention is not None and alpha_retention.removed == ()
    assert alpha_retention.needed == (first_ids["alpha"],)  # the qcow2 layout keeps the chain
    assert alpha_retention.reasons[str(first_ids["alpha"])] == f"parent of {outcomes['alpha'].backup_id}"
    assert (repo / "beta" / str(first_ids["beta"])).is_dir()  # a failed VM is never pruned

    metrics_2 = families(job.metrics)  # type: ignore[arg-type]
    assert metrics_2["vmsnap_backup_last_status"] == {"alpha": 1.0, "beta": 0.0, "gamma": 1.0, "delta": 1.0}
    assert (
        metrics_2["vmsnap_backup_last_success_timestamp_seconds"]["beta"]
        == metrics_1["vmsnap_backup_last_success_timestamp_seconds"]["beta"]
    )
    assert metrics_2["vmsnap_backup_failures_total"]["beta"] == 1.0
    assert metrics_2["vmsnap_backup_last_incremental"]["alpha"] == 1.0
    assert metrics_2["vmsnap_job_last_status"] == {"nightly": 0.0}

    # the hook got the report on stdin and a summary (no credentials) in its environment
    assert second.hook is not None and second.hook.exit_code == 3
    sent = json.loads((tmp_path / "report.json").read_text())
    assert [v["vm"] for v in sent["vms"] if not v["ok"]] == ["beta"]
    env = dict(line.split("=", 1) for line in (tmp_path / "hook.env").read_text().splitlines() if "=" in line)
    assert env["VMSNAP_FAILED_VMS"] == "beta" and env["VMSNAP_JOB"] == "nightly"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "not-for-hooks" not in (tmp_path / "hook.env").read_text()
    assert stat.S_IMODE(os.stat(repo).st_mode) == 0o700

    # the job's lock: a second run while one holds it fails at once, naming the holder
    with job_lock(job, tmp_path / "locks"), pytest.raises(VmsnapError, match=f"pid {os.getpid()}"):
        run(job)


def test_a_job_into_an_encrypted_chunks_repository_on_s3(
    s3_env: object, s3_prefix: str, tmp_path: Path, vms: dict[str, QemuProcess]
) -> None:
    key = tmp_path / "repo.key"
    url = f"s3://{BUCKET}/{s3_prefix}"
    Repository.init(url, encrypt=True, key_file=key)
    job_file = tmp_path / "offsite.toml"
    entries = "".join(f'[[vm]]\nqmp = "{vms[n].qmp_socket}"\nname = "{n}"\n' for n in ("alpha", "beta"))
    job_file.write_text(
        f'repository = "{url}"\nkey_file = "{key.name}"\nconcurrency = 2\ngc = true\nmetrics = false\n'
        f"[retention]\nkeep_last = 1\n{entries}"
    )

    def run() -> JobReport:
        return run_job_file(job_file, list_domains=no_libvirt, lock_dir=tmp_path / "locks")

    ids = []
    for index, pattern in enumerate((0x31, 0x32)):
        for offset, name in enumerate(("alpha", "beta")):
            with vms[name].monitor() as qmp:
                qemu_io(qmp, "disk0", f"write -P {pattern + 16 * offset:#x} 0 1M")
                qemu_io(qmp, "disk0", "flush")
        report = run()
        assert report.ok, report.summary()
        assert {o.kind for o in report.outcomes} == {"full" if index == 0 else "incremental"}
        ids.append({o.vm: o.backup_id for o in report.outcomes})
    # the first backups are pruned, and gc freed their chunks (each VM's first data chunk)
    assert {o.vm: o.retention.removed for o in report.outcomes if o.retention} == {
        name: (ids[0][name],) for name in ("alpha", "beta")
    }
    assert report.gc is not None and report.gc.chunks_freed == 2
    repo = Repository.open(url, key_file=key)
    assert [m.backup_id for m in repo.backups("alpha")] == [ids[1]["alpha"]]
    repo.restore("alpha", None, tmp_path / "restored")
    compared = subprocess.run(
        [
            "qemu-img",
            "compare",
            "-U",
            str(tmp_path / "restored" / "disk0.qcow2"),
            str(vms["alpha"].drives[0].path),
        ],
        capture_output=True,
    )
    assert compared.returncode == 0, compared.stdout

    # another key: every VM fails with one line saying so, nothing is written
    (tmp_path / "repo.key").rename(tmp_path / "right.key")
    Repository.init(tmp_path / "other", encrypt=True, key_file=key)  # makes a key of its own there
    wrong = run()
    assert wrong.exit_status == 1 and len(wrong.failed) == 2
    assert all("key" in str(o.error) and "\n" not in str(o.error) for o in wrong.failed)
    assert [m.backup_id for m in repo.backups("alpha")] == [ids[1]["alpha"]]
