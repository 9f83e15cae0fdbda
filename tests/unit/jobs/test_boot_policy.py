"""A job's verify_boot: the job file's keys, the run (scripted boot functions), and the metrics series."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.jobs.test_run import job_with
from vmsnap.errors import UsageError
from vmsnap.jobs import metrics
from vmsnap.jobs.boot_policy import BootPolicy, parse_duration
from vmsnap.jobs.default import JobFunctions
from vmsnap.jobs.jobfile import VmSpec, parse_job
from vmsnap.jobs.report import BootOutcome
from vmsnap.jobs.run import VmBackup, run_job
from vmsnap.verify_boot.run import BootConfig
from vmsnap.vm.libvirt.domain import is_local_uri

VM = '[[vm]]\nqmp = "/run/vm1.qmp"\n'


def test_the_job_file_asks_for_boot_verification() -> None:
    text = 'repository = "/r"\nverify_boot = "latest"\nverify_boot_every = "7d"\n'
    text += (
        'verify_boot_checks = ["cat /root/proof"]\nverify_boot_ports = [80]\nverify_boot_timeout = 120\n' + VM
    )
    job = parse_job(text)
    assert job.verify_boot == BootPolicy("latest", 7 * 86400.0, ("cat /root/proof",), (80,), 120.0)
    assert parse_job('repository = "/r"\n' + VM).verify_boot is None
    assert parse_duration("12h") == 43200.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('verify_boot = "oldest"\n', 'line 2: verify_boot must be "latest"'),
        ('verify_boot_every = "7d"\n', 'line 2: verify_boot_every needs verify_boot = "latest"'),
        ('verify_boot = "latest"\nverify_boot_every = "soon"\n', "line 3: 'soon' is no duration"),
        (
            'verify_boot = "latest"\nverify_boot_ports = [0]\n',
            "line 3: verify_boot_ports must be a list of TCP",
        ),
        ('verify_boot = "latest"\nverify_boot_timeout = 0\n', "line 3: verify_boot_timeout must be seconds"),
    ],
)
def test_a_wrong_boot_key_is_one_line_naming_it(lines: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_job('repository = "/r"\n' + lines + VM)


def test_a_failed_boot_fails_the_vm_and_a_skipped_one_does_not(tmp_path: Path) -> None:
    job, specs = job_with(tmp_path, 'verify_boot = "latest"', vms=3)
    verdicts = {"vm0": "passed", "vm1": "failed", "vm2": "skipped"}

    def backup(spec: VmSpec) -> VmBackup:
        return VmBackup("id-0", "full", 42, 0.5, 12.0)

    def boot(spec: VmSpec, policy: BootPolicy) -> BootOutcome:
        verdict = verdicts[spec.name]
        detail = "the guest agent never answered within 300 s" if verdict == "failed" else None
        return BootOutcome(verdict, detail, "id-0", 4.5 if verdict == "passed" else None, 9.0, 1000.0)  # type: ignore[arg-type]

    report = run_job(job, specs, backup=backup, boot=boot, lock_dir=tmp_path / "locks")
    passed, failed, skipped = report.outcomes
    assert passed.ok and passed.boot is not None and passed.boot.verdict == "passed"
    assert not failed.ok and failed.backed_up
    assert failed.error == "boot verification failed: the guest agent never answered within 300 s"
    assert skipped.ok and report.exit_status == 1
    assert "boot passed (agent after 4.5 s)" in report.summary()
    text = (tmp_path / "m.prom").read_text()
    assert 'vmsnap_boot_verify_last_status{job="j",vm="vm0"} 1' in text
    assert 'vmsnap_boot_verify_last_status{job="j",vm="vm1"} 0' in text
    assert 'vmsnap_boot_verify_last_seconds_to_agent{job="j",vm="vm0"} 4.5' in text
    assert 'vm="vm2"' not in "".join(line for line in text.splitlines() if "boot_verify" in line)
    assert report.to_json()["vms"][1]["boot"]["verdict"] == "failed"


def test_a_vm_not_verified_this_run_keeps_its_last_verification() -> None:
    verified = metrics.VmSample(
        "vm0", True, 10.0, 1.0, boot_finished=9.0, boot_passed=True, boot_seconds_to_agent=3.0
    )
    first = metrics.merge({}, "j", [verified], job_finished=10.0, job_duration=1.0)
    second = metrics.merge(
        first, "j", [metrics.VmSample("vm0", True, 20.0, 1.0)], job_finished=20.0, job_duration=1.0
    )
    labels = (("job", "j"), ("vm", "vm0"))
    assert second[("vmsnap_boot_verify_last_timestamp_seconds", labels)] == 9.0
    assert second[("vmsnap_boot_verify_last_status", labels)] == 1.0
    assert metrics.parse_series(metrics.render(second)) == second


def test_a_domain_under_another_host_s_libvirt_uri_is_not_booted_here(tmp_path: Path) -> None:
    job, _ = job_with(tmp_path, 'verify_boot = "latest"', vms=1)
    remote = VmSpec("web1", "libvirt", 3, "/r", domain="web1", connect="qemu+ssh://far.example/system")
    outcome = JobFunctions(job).boot(remote, BootPolicy())
    assert outcome.verdict == "skipped" and outcome.detail is not None
    assert "qemu+ssh://far.example/system is another host's" in outcome.detail
    assert (
        is_local_uri(None)
        and is_local_uri("qemu:///system")
        and is_local_uri("qemu+unix:///system?socket=/s")
    )
    assert not is_local_uri("qemu+tcp://10.0.0.2/system") and not is_local_uri("qemu://far/system")
    with pytest.raises(UsageError, match="another host's libvirtd"):
        BootConfig(repo="/r", vm="web1", connect="qemu+ssh://far.example/system")
