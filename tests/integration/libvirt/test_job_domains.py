"""Backup jobs with libvirt domains: ``domain`` globs expanded against a real (private) libvirtd, here and
through ``qemu+ssh://`` over the real sshd on 127.0.0.1; and the job the issue asks for, end to end through
``vmsnap run``: three bare QEMUs (one on the far host, reached over SSH) and two libvirt domains, run twice
(full, then incremental with one VM's QMP socket gone), retention, gc, metrics parsed by prometheus_client,
the restored disks compared with the VMs', the job's systemd units verified."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image
from tests.integration.far_host import ALIAS, FarHost, FarVm, far_vm
from tests.integration.libvirt.conftest import (
    DOMAIN_PREFIX,
    Libvirtd,
    LibvirtTestDomain,
    assert_identical,
    domain_xml,
    libvirt,
)
from vmsnap.cli import main
from vmsnap.errors import UsageError
from vmsnap.jobs.default import list_libvirt_domains
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import parse_job
from vmsnap.jobs.schedule import verify
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.repository import Repository
from vmsnap.runner import SshRunner

pytestmark = pytest.mark.libvirt


@pytest.fixture
def two_domains(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """Two defined (not started) domains ``<prefix>-a`` and ``<prefix>-b``; yields (prefix, a, b)."""
    prefix = f"{DOMAIN_PREFIX}job-{secrets.token_hex(3)}"
    names = (f"{prefix}-a", f"{prefix}-b")
    conn = libvirt.open(libvirtd.uri)
    defined = []
    try:
        for name in names:
            libvirtd.names.add(name)
            image = make_image(tmp_path / f"{name}.qcow2", "1M")
            defined.append(conn.defineXML(domain_xml(name, {"vda": image})))
        yield prefix, names[0], names[1]
    finally:
        for dom in defined:
            dom.undefine()
        conn.close()


def job_text(pattern: str, connect: str) -> str:
    return (
        f'repository = "/backups"\n[[vm]]\ndomain = "{pattern}"\nexclude = ["*-b"]\nconnect = "{connect}"\n'
    )


def test_domain_globs_against_a_real_libvirtd(libvirtd: Libvirtd, two_domains: tuple[str, str, str]) -> None:
    prefix, first, _ = two_domains
    specs, failures = expand_vms(parse_job(job_text(f"{prefix}-*", libvirtd.uri)), list_libvirt_domains)
    assert failures == ()
    assert [(s.name, s.kind, s.domain, s.connect) for s in specs] == [(first, "libvirt", first, libvirtd.uri)]
    with pytest.raises(UsageError, match=r"line 3: .* matches only domains that exclude takes out"):
        expand_vms(parse_job(job_text(f"{prefix}-b", libvirtd.uri)), list_libvirt_domains)


def test_domain_globs_through_qemu_ssh(
    libvirtd: Libvirtd, two_domains: tuple[str, str, str], sshd: SshRunner, tmp_path: Path
) -> None:
    if shutil.which("nc") is None:
        pytest.fail(
            "netcat is not installed (apt-get install netcat-openbsd): libvirt's ssh proxy needs it here"
        )
    # libvirt runs OpenSSH itself and has no known_hosts option for it: a wrapper adds the test's known_hosts
    wrapper = tmp_path / "ssh"
    wrapper.write_text(
        f'#!/bin/sh\nexec ssh -o UserKnownHostsFile={sshd.known_hosts} -o StrictHostKeyChecking=yes "$@"\n'
    )
    os.chmod(wrapper, 0o700)
    socket = libvirtd.uri.split("socket=", 1)[1]
    # the private libvirtd listens on its own socket, so the remote side connects with nc -U to it
    uri = (
        f"qemu+ssh://{sshd.destination}:{sshd.port}/system?socket={socket}&keyfile={sshd.identity}"
        f"&command={wrapper}&proxy=netcat&no_tty=1"
    )
    prefix, first, _ = two_domains
    specs, failures = expand_vms(parse_job(job_text(f"{prefix}-*", uri)), list_libvirt_domains)
    assert failures == ()
    assert [(s.name, s.connect) for s in specs] == [(first, uri)]
    unreachable = uri.replace(f":{sshd.port}/", ":1/")
    specs, failures = expand_vms(parse_job(job_text(f"{prefix}-*", unreachable)), list_libvirt_domains)
    assert specs == () and len(failures) == 1 and failures[0].line == 3
    assert "listing the libvirt domains" in failures[0].error


# -- the job, end to end -------------------------------------------------------------------------


@pytest.fixture
def running_domains(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[list[LibvirtTestDomain]]:
    """Two running domains ``<prefix>-web1``/``-web2`` (one 16 MiB disk each, no guest OS)."""
    prefix = f"{DOMAIN_PREFIX}{secrets.token_hex(3)}"
    domains: list[LibvirtTestDomain] = []
    try:
        for suffix in ("web1", "web2"):
            name = f"{prefix}-{suffix}"
            libvirtd.names.add(name)
            images = {"vda": make_image(tmp_path / f"{name}.qcow2", "16M")}
            conn = libvirt.open(libvirtd.uri)
            dom = conn.defineXML(domain_xml(name, images))
            domains.append(LibvirtTestDomain(name, libvirtd.uri, images, tmp_path, conn, dom))
            dom.create()
        yield domains
    finally:
        for domain in domains:
            libvirtd.reaper.remove(domain.conn, domain.dom)


@pytest.fixture
def local_vms(tmp_path: Path) -> Iterator[dict[str, QemuProcess]]:
    started: dict[str, QemuProcess] = {}
    try:
        for name in ("alpha", "beta"):
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


def write_local(vm: QemuProcess, pattern: int) -> None:
    with vm.monitor() as qmp:
        qemu_io(qmp, "disk0", f"write -P {pattern:#x} 0 1M")
        qemu_io(qmp, "disk0", "flush")


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, dict[str, Any]]:
    """``vmsnap ARGV --json`` in this process: (exit status, the one JSON object)."""
    capsys.readouterr()
    code = main([*map(str, argv), "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def families(path: Path) -> dict[str, dict[str, float]]:
    """metric name → {vm label (or job label): value}, as prometheus_client's parser reads the file."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("vm", sample.labels["job"])] = sample.value
    return out


def job_file(
    tmp_path: Path, vms: dict[str, QemuProcess], far: FarVm, far_host: FarHost, pattern: str, uri: str
) -> Path:
    hook = tmp_path / "hook.sh"
    hook.write_text('#!/bin/sh\ncat > "$1"\n')
    hook.chmod(0o700)
    path = tmp_path / "nightly.toml"
    path.write_text(
        f"""\
repository = "repo"
concurrency = 3
gc = true
ssh_config = "{far_host.config}"
metrics = "metrics/vmsnap-nightly.prom"
on_failure = ["{hook}", "{tmp_path / "report.json"}"]

[retention]
keep_last = 1

[[vm]]
qmp = "{vms["alpha"].qmp_socket}"
name = "alpha"

[[vm]]
qmp = "{vms["beta"].qmp_socket}"
name = "beta"

[[vm]]
qmp = "{far.qmp_socket}"
name = "gamma"
host = "{ALIAS}"

[[vm]]
domain = "{pattern}"
connect = "{uri}"
"""
    )
    (tmp_path / "metrics").mkdir()
    return path


def test_a_job_over_three_qemus_one_on_another_host_and_two_domains(
    libvirtd: Libvirtd,
    running_domains: list[LibvirtTestDomain],
    local_vms: dict[str, QemuProcess],
    far_host: FarHost,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    web1, web2 = running_domains
    pattern = web1.name.rsplit("-", 1)[0] + "-web*"
    with far_vm(far_host, "gamma") as gamma:
        jobfile = job_file(tmp_path, local_vms, gamma, far_host, pattern, libvirtd.uri)
        names = ["alpha", "beta", "gamma", web1.name, web2.name]
        for step, base in ((1, 0x10), (2, 0x20)):  # every VM its own bytes: no chunk shared between VMs
            for index, vm in enumerate(local_vms.values()):
                if vm.qmp_socket.exists():
                    write_local(vm, base + index)
            gamma.write(base + 2, 0)
            for index, domain in enumerate(running_domains):
                domain.write("vda", base + 3 + index, 0)
            if step == 2:
                code, preview = run(capsys, "run", jobfile, "--dry-run")
                assert code == 0 and {v["vm"]: v["kind"] for v in preview["vms"]} == dict.fromkeys(
                    names, "incremental"
                )
                local_vms["beta"].qmp_socket.unlink()  # beta's QMP socket is gone in the second run
                with local_vms["alpha"].monitor() as qmp:  # alpha's changes are lost: its backup is full
                    qmp.block_dirty_bitmap_remove(local_vms["alpha"].drives[0].node_name, "vmsnap")
            code, report = run(capsys, "run", jobfile)
            outcomes = {v["vm"]: v for v in report["vms"]}
            assert sorted(outcomes) == sorted(names)
            if step == 1:
                assert code == 0, report
                assert {v: o["kind"] for v, o in outcomes.items()} == dict.fromkeys(names, "full")
                first = {v: o["backup_id"] for v, o in outcomes.items()}
                metrics_1 = families(tmp_path / "metrics" / "vmsnap-nightly.prom")
        second = outcomes
        assert code == 1 and not report["ok"]
        beta = second["beta"]
        assert not beta["ok"] and beta["line"] == 16 and beta["error"] and "\n" not in beta["error"]
        assert str(local_vms["beta"].qmp_socket) in beta["error"]
        for name in ("alpha", "gamma", web1.name, web2.name):
            assert second[name]["ok"] and second[name]["kind"] == (
                "full" if name == "alpha" else "incremental"
            )
            # retention keep_last = 1: the run-1 backup is gone (chunks: no chains to keep)
            assert second[name]["retention"]["removed"] == [first[name]]
        # the strategy's remark lands in alpha's report and in no other VM's (backups ran at once)
        assert any("incremental backup not possible" in n for n in second["alpha"]["notes"])
        assert not any(
            "not possible" in n for name in names if name != "alpha" for n in second[name]["notes"]
        )
        assert beta["retention"] is None  # a VM whose backup failed is never pruned
        repo = Repository.open(tmp_path / "repo")
        assert [m.backup_id for m in repo.backups("beta")] == [first["beta"]]
        assert [m.backup_id for m in repo.backups("gamma")] == [second["gamma"]["backup_id"]]
        # gc after retention: the first run's chunk of each pruned VM is named by no index any more
        assert report["gc_error"] is None and report["gc"]["chunks_freed"] == 4
        # the hook got the report; the failed VM's line is in it
        sent = json.loads((tmp_path / "report.json").read_text())
        assert [v["vm"] for v in sent["vms"] if not v["ok"]] == ["beta"]

        metrics_2 = families(tmp_path / "metrics" / "vmsnap-nightly.prom")
        assert metrics_2["vmsnap_backup_last_status"] == {**dict.fromkeys(names, 1.0), "beta": 0.0}
        success = "vmsnap_backup_last_success_timestamp_seconds"
        assert metrics_2[success]["beta"] == metrics_1[success]["beta"]
        assert metrics_2[success]["gamma"] > metrics_1[success]["gamma"]
        assert metrics_2["vmsnap_backup_failures_total"]["beta"] == 1.0
        assert metrics_2["vmsnap_backup_last_incremental"]["gamma"] == 1.0
        assert metrics_2["vmsnap_job_last_status"] == {"nightly": 0.0}
        assert metrics_2["vmsnap_job_last_gc_freed_bytes"]["nightly"] > 0

        # what the second run stored is what the VMs hold now (nothing wrote since)
        for name, image in (("gamma", far_host.here(gamma.image())), (web2.name, web2.images["vda"])):
            out = tmp_path / f"restored-{name}"
            repo.restore(name, None, out)
            assert_identical(out / f"{'disk0' if name == 'gamma' else 'vda'}.qcow2", image)

    # the job's systemd units, written and checked by systemd-analyze verify
    units = tmp_path / "units"
    units.mkdir()
    code, scheduled = run(
        capsys, "schedule", "install", jobfile, "--on-calendar", "daily", "--unit-dir", units
    )
    assert code == 0 and scheduled["name"] == "nightly" and not scheduled["enabled"]
    assert scheduled["verified"] is (shutil.which("systemd-analyze") is not None)
    if scheduled["verified"]:
        verify([Path(scheduled["service"]), Path(scheduled["timer"])])
    assert f'"run" "{jobfile}"' in Path(scheduled["service"]).read_text()
    code, removed = run(capsys, "schedule", "remove", "nightly", "--unit-dir", units)
    assert code == 0 and sorted(removed["removed"]) == sorted([scheduled["service"], scheduled["timer"]])
