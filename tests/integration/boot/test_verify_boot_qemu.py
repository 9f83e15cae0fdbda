"""``vmsnap verify --boot`` of the lab guest under bare QEMU, end to end through the CLI: the guest boots from
its root disk; a file written before the backup is read back inside the booted copy and a port it serves is
probed from the host; a backup whose root filesystem was wiped fails with the agent never answering, its
console tail and screenshot kept; the live VM is untouched (its disk's digest, taken while it is paused,
is the same after); nothing is left behind, also when vmsnap is killed mid-boot and ``recover`` runs."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.boot.chromium import blank, check_images, open_page
from tests.integration.boot.conftest import RootGuestFactory, image_digest, leftovers
from tests.integration.cli_helpers import VMSNAP, cli_process
from vmsnap.lab.guest import LabGuest
from vmsnap.lab.qemu import qemu_io
from vmsnap.repo.repository import Repository
from vmsnap.verify_boot.result import latest_boot

pytestmark = pytest.mark.guest

RC_LOCAL = """#!/bin/sh
mkdir -p /srv/www
echo vmsnap-boot-ok > /srv/www/index.html
httpd -p 8080 -h /srv/www
"""
PNG = b"\x89PNG\r\n\x1a\n"


def _prepare(guest: LabGuest) -> str:
    """A proof file in the root filesystem and a web server started at boot; returns the proof."""
    proof = secrets.token_hex(16)
    guest.write_file("/root/proof", proof.encode())
    guest.write_file("/etc/rc.local", RC_LOCAL.encode(), mode=0o755)
    guest.sync()
    return proof


def _backup(guest: LabGuest, repo: Path, *extra: str) -> str:
    guest.machine.close()  # QEMU serves its QMP socket to one client at a time
    result = cli_process(
        "backup", "--repo", repo, "--qmp", guest.qmp_socket, "--agent", guest.agent_socket, *extra, "--json",
        timeout=600,
    )  # fmt: skip
    assert result.code == 0, result.err
    return str(result.json()["backup_id"])


@pytest.mark.timeout(900)  # one boot under TCG whose ports are probed until its timeout
def test_ports_that_never_answer_fail_the_verdict(
    root_guest: RootGuestFactory, run_root: Path, tmp_path: Path
) -> None:
    """User-mode networking accepts the host's connection at once; a guest that never answers (its NIC
    drops every packet, as a firewall's DROP would) must not pass: not on 8080, where its web server
    listens, nor on 8081, where nothing listens."""
    guest = root_guest()
    _prepare(guest)
    silent = RC_LOCAL + "ip link set eth0 down\n"
    guest.write_file("/etc/rc.local", silent.encode(), mode=0o755)
    guest.sync()
    backup = _backup(guest, tmp_path / "repo")
    # the ports are probed until the timeout, which must only cover the boot up to the agent: 36 s on a
    # 2-core machine with 8-12 runnable processes (another test booting a TCG guest beside it)
    result = cli_process(
        "verify", "--boot", "--repo", tmp_path / "repo", "--vm", "bootvm", "--backup", backup,
        "--port", "8080", "--port", "8081", "--timeout", "100", "--json", timeout=900,
    )  # fmt: skip
    assert result.code == 1, result.err
    boot = result.json()["boot"]
    assert boot["verdict"] == "failed" and boot["seconds_to_agent"] is not None
    assert [(p["port"], p["open"]) for p in boot["ports"]] == [(8080, False), (8081, False)]
    assert "the guest listens on port 8080, but the connection never reached it" in boot["ports"][0]["detail"]
    assert "nothing listens on port 8081 in the guest" in boot["ports"][1]["detail"]
    assert boot["reason"].startswith("port 8080 did not answer"), boot["reason"]
    assert leftovers(run_root) == []


def _pause(guest: LabGuest) -> None:
    with guest.process.monitor() as qmp:  # type: ignore[union-attr]
        qmp.stop()


def test_a_backup_of_the_lab_guest_boots_and_a_wiped_one_does_not(
    root_guest: RootGuestFactory, run_root: Path, tmp_path: Path
) -> None:
    guest = root_guest()
    repo = tmp_path / "repo"
    proof = _prepare(guest)
    good = _backup(guest, repo)

    # the root filesystem wiped (the guest paused, so it writes nothing back), then backed up as it is
    _pause(guest)
    with guest.process.monitor() as qmp:  # type: ignore[union-attr]
        qemu_io(qmp, "root", "write -z 0 16M")
        qemu_io(qmp, "root", "flush")
    wiped = _backup(guest, repo, "--quiesce", "off")
    root_image = guest.drives[0].path
    before = image_digest(root_image)

    passed = cli_process(
        "verify", "--boot", "--repo", repo, "--vm", "bootvm", "--backup", good, "--check", "cat /root/proof",
        "--port", "8080", "--timeout", "240", "--json", timeout=900,
    )  # fmt: skip
    assert passed.code == 0, passed.err
    boot = passed.json()["boot"]
    assert boot["verdict"] == "passed" and boot["kind"] == "qemu" and boot["accelerator"] == "tcg"
    assert [(c["command"], c["exit_code"], c["output"]) for c in boot["checks"]] == [
        ("cat /root/proof", 0, proof)
    ]
    assert [(p["port"], p["open"]) for p in boot["ports"]] == [(8080, True)]
    assert boot["seconds_to_agent"] > 0 and boot["osinfo"] is not None
    assert boot["screenshot"] is not None

    failed = cli_process(
        "verify", "--boot", "--repo", repo, "--vm", "bootvm", "--backup", wiped, "--timeout", "60", "--json",
        timeout=600,
    )  # fmt: skip
    assert failed.code == 1
    assert failed.error_line.startswith(
        f"vmsnap: error: backup {wiped} of bootvm did not boot: the guest agent never answered within 60 s"
    )
    result = failed.json()["boot"]
    assert result["verdict"] == "failed" and result["seconds_to_agent"] is None
    assert any("no root filesystem on virtio-root" in line for line in result["console_tail"])

    assert image_digest(root_image) == before  # the live VM's disk: untouched by both boots
    assert guest.process is not None and guest.process.alive()
    assert leftovers(run_root) == []

    listed = cli_process("list", "--repo", repo, "--json")
    boots = {b["backup_id"]: b["boot"] for b in listed.json()["backups"]}
    assert boots[good]["verdict"] == "passed" and boots[wiped]["verdict"] == "failed"
    assert "no root filesystem" in " ".join(boots[wiped]["console_tail"])
    repository = Repository.open(repo)
    for backup_id in (good, wiped):
        manifest = repository.get("bootvm", backup_id)
        kept = latest_boot(repository, manifest)
        assert kept is not None and kept.screenshot is not None
        screen = repository.attachment(manifest, kept.screenshot)
        assert screen.startswith(PNG) and not blank(screen)
    human = cli_process("list", "--repo", repo)
    assert "FAILED" in human.out and "passed, agent" in human.out

    # the report, opened in headless Chromium: names and verdicts on the page, every image in place
    report = cli_process("report", "--repo", repo, "--out", tmp_path / "report", "--json")
    assert report.code == 0, report.err
    page = tmp_path / "report" / "index.html"
    sources = check_images(page)
    assert any(s.startswith("charts/") for s in sources) and len([s for s in sources if "screens/" in s]) == 2
    dom = open_page(page, tmp_path / "page.png")
    assert "bootvm" in dom and "PASSED" in dom and "FAILED" in dom and "no root filesystem" in dom
    assert not blank((tmp_path / "page.png").read_bytes())
    with guest.process.monitor() as qmp:  # type: ignore[union-attr]
        qmp.cont()


def test_bad_input_is_one_line_each(root_guest: RootGuestFactory, run_root: Path, tmp_path: Path) -> None:
    guest = root_guest(name="plainvm", display=False)
    repo = tmp_path / "repo"
    _prepare(guest)
    backup_id = _backup(guest, repo)

    missing = cli_process(
        "verify", "--boot", "--repo", repo, "--vm", "plainvm", "--check", "no-such-command --now",
        "--timeout", "240", "--json", timeout=900,
    )  # fmt: skip
    assert missing.code == 1
    assert missing.error_line.startswith(
        f"vmsnap: error: backup {backup_id} of plainvm did not boot: check 'no-such-command --now': no such "
        "command in the guest"
    )
    result = missing.json()["boot"]
    assert result["screenshot"] is None and result["screenshot_skipped"] == "the VM has no display"
    assert result["console_tail"] and any("vmsnap-lab" in line for line in result["console_tail"])

    zero = cli_process("verify", "--boot", "--repo", repo, "--vm", "plainvm", "--timeout", "0")
    assert zero.code == 2
    assert "error: argument --timeout: '0' is not above 0 seconds" in zero.err
    endless = cli_process("verify", "--boot", "--repo", repo, "--vm", "plainvm", "--timeout", "inf")
    assert endless.code == 2 and "'inf' is not a finite number of seconds" in endless.err

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    assert cli_process("backup", "--repo", repo, "--image", image, "--name", "imagevm").code == 0
    bare = cli_process("verify", "--boot", "--repo", repo, "--vm", "imagevm")
    assert bare.code == 1
    assert (
        bare.error_line.startswith("vmsnap: error: backup ")
        and "has no bootable definition" in bare.error_line
    )
    assert "--qmp SOCKET" in bare.error_line and "--domain NAME" in bare.error_line
    assert leftovers(run_root) == []


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_killed_mid_boot_leaves_nothing_after_recover(
    root_guest: RootGuestFactory, run_root: Path, tmp_path: Path
) -> None:
    guest = root_guest(name="killvm")
    repo = tmp_path / "repo"
    _prepare(guest)
    _backup(guest, repo)
    argv = [VMSNAP, "verify", "--boot", "--repo", str(repo), "--vm", "killvm", "--timeout", "600"]
    process = subprocess.Popen(argv, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def copy_running() -> bool:
            sessions = [p for p in (run_root / "boot").glob("*/state.json")]
            return any("qemu" in json.loads(p.read_text()) for p in sessions)

        _wait_for(copy_running, 120)
        assert leftovers(run_root) != []  # the copy and its servers run
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    recovered = cli_process("recover", "--json")
    assert recovered.code == 0, recovered.err
    assert any("undid the boot verification of killvm/" in a for a in recovered.json()["actions"])
    assert leftovers(run_root) == []
    again = cli_process("recover", "--json")
    assert not any("boot verification" in a for a in again.json()["actions"])
    assert guest.process is not None and guest.process.alive() and guest.is_thawed()


def test_a_job_boot_verifies_each_new_backup_and_reports_it_in_its_metrics(
    root_guest: RootGuestFactory, run_root: Path, tmp_path: Path
) -> None:
    guest = root_guest(name="jobvm", display=False)
    proof = _prepare(guest)
    guest.machine.close()
    metrics = tmp_path / "nightly.prom"
    job = tmp_path / "nightly.toml"
    job.write_text(
        f'repository = "{tmp_path / "repo"}"\nmetrics = "{metrics}"\nverify_boot = "latest"\n'
        f'verify_boot_every = "7d"\nverify_boot_checks = ["cat /root/proof"]\nverify_boot_timeout = 240\n'
        f'[[vm]]\nqmp = "{guest.qmp_socket}"\nagent = "{guest.agent_socket}"\nname = "jobvm"\n'
    )
    first = cli_process("run", job, "--json", timeout=900)
    assert first.code == 0, first.err
    [vm] = first.json()["vms"]
    assert vm["boot"]["verdict"] == "passed" and vm["boot"]["seconds_to_agent"] > 0
    text = metrics.read_text()
    assert 'vmsnap_boot_verify_last_status{job="nightly",vm="jobvm"} 1' in text
    assert "vmsnap_boot_verify_last_seconds_to_agent" in text
    listed = cli_process("list", "--repo", tmp_path / "repo", "--json").json()["backups"]
    assert listed[-1]["boot"]["checks"] == [{"command": "cat /root/proof", "exit_code": 0, "error": None}]
    again = cli_process("run", job, "--json", timeout=900)  # within verify_boot_every: not booted again
    assert again.code == 0, again.err
    assert again.json()["vms"][0]["boot"]["verdict"] == "skipped"
    assert 'vmsnap_boot_verify_last_status{job="nightly",vm="jobvm"} 1' in metrics.read_text()
    assert proof and leftovers(run_root) == []
