"""A backup that dies while the VM's vCPUs are paused: a machine with a writable firmware flash (UEFI
variables) is paused inside the freeze while its snapshot is made and the flash read. Killed there, the run
leaves the VM paused *and* frozen, and a guest whose vCPUs are stopped runs no agent: its thaw guard must
resume it (``cont`` on the QMP socket) before it can thaw, and ``vmsnap recover`` must resume a VM the dead
run paused (its journal says the VM ran before), but not one that was paused before the run.

The lab guest under TCG with a real qemu-ga, booted by SeaBIOS from a read-only flash (``-drive
if=pflash,unit=0``) with a second, writable flash (unit 1) for variables: what makes vmsnap capture, and so
pause, the machine (:mod:`vmsnap.vm.machine_state`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import cli_process, cli_started, wait_stopped
from tests.integration.guest.conftest import process_gone, wait_process_gone, wait_until_thawed
from vmsnap.backup.config import CRASH_ENV
from vmsnap.lab.guest import DATA_MOUNT, LabGuest
from vmsnap.lab.image import LabImage
from vmsnap.vm.guards import GuardRecord, GuardTarget, LocalGuardSite

pytestmark = pytest.mark.guest

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")


@pytest.fixture(scope="module")
def flash_guest(lab_image: LabImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    """A lab guest with firmware flash: SeaBIOS read-only in unit 0, 256 KiB of variables in unit 1."""
    assert SEABIOS.exists(), "install seabios (scripts/packages.d/lab.txt)"
    workdir = tmp_path_factory.mktemp("flash-guest")
    code = workdir / "code.fd"
    shutil.copyfile(SEABIOS, code)
    variables = workdir / "vars.fd"
    variables.write_bytes(os.urandom(256 * 1024))
    flash = [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
    ]  # fmt: skip
    with LabGuest(workdir / "guest", image=lab_image, name="flashvm", extra_args=flash) as guest:
        assert guest.machine.machine_state() is not None
        yield guest


@pytest.fixture
def guest(flash_guest: LabGuest) -> Iterator[LabGuest]:
    """The flash guest with its sockets free for the CLI; left running and thawed."""
    flash_guest.machine.close()
    try:
        yield flash_guest
    finally:
        with contextlib.suppress(Exception):
            if _run_state(flash_guest) != "running":
                flash_guest.machine.qmp().cont()
            flash_guest.machine.close()
            wait_until_thawed(flash_guest, 30)
        with contextlib.suppress(Exception):
            if not flash_guest.is_thawed():
                flash_guest.agent.fsfreeze_thaw()
        flash_guest.machine.close()


def _selector(guest: LabGuest) -> list[str]:
    return ["--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket)]


def _run_state(guest: LabGuest) -> str:
    try:
        return guest.machine.qmp().status()
    finally:
        guest.machine.close()  # QEMU serves its QMP socket to one client at a time


def _live_guard(guest: LabGuest) -> GuardRecord | None:
    return LocalGuardSite().live(GuardTarget.socket(guest.agent_socket))


def _status(guest: LabGuest) -> str:
    try:
        return guest.agent.fsfreeze_status()
    finally:
        guest.machine.close()


def test_a_backup_killed_while_the_vm_is_paused_is_resumed_and_thawed_by_its_guard(
    guest: LabGuest, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    dead = cli_process(
        "backup", "--repo", repo, *_selector(guest), "--quiesce", "on", env={CRASH_ENV: "while-paused"}
    )
    assert dead.code == -signal.SIGKILL, dead.err
    wait_until_thawed(guest, 60)  # no recover: the guard resumed the vCPUs, then thawed
    assert _run_state(guest) == "running"
    guest.agent.write_file(f"{DATA_MOUNT}/after-kill.txt", b"writes go on\n")
    guest.machine.close()

    recovered = cli_process("recover", *_selector(guest), "--repo", repo, "--json")
    assert recovered.code == 0, recovered.err
    report = recovered.json()
    assert "the guest's filesystems are thawed" in report["found"]
    assert not any("resumed" in a or "thawed the guest" in a for a in report["actions"])  # the guard did


def test_recover_resumes_and_thaws_a_vm_its_dead_run_left_paused(guest: LabGuest, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    run = cli_started(
        "backup", "--repo", repo, *_selector(guest), "--quiesce", "on", env={CRASH_ENV: "stop:while-paused"}
    )
    guard_pid = 0
    try:
        wait_stopped(run)
        record = _live_guard(guest)
        assert record is not None and record.parent_pid == run.pid
        guard_pid = record.pid
        os.kill(guard_pid, signal.SIGSTOP)  # a guard that cannot act: the VM is left to recover
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        assert _run_state(guest) == "paused"

        recovered = cli_process("recover", *_selector(guest), "--repo", repo, "--json")
        assert recovered.code == 0, recovered.err
        actions = recovered.json()["actions"]
        assert actions[0] == "resumed the VM's vCPUs (the dead run had paused them to snapshot)"
        assert f"stopped the thaw guard (pid {guard_pid}) of a dead vmsnap run" in actions
        assert "thawed the guest's filesystems (1)" in actions
        assert process_gone(guard_pid)
        assert _run_state(guest) == "running"
        assert _status(guest) == "thawed"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        if guard_pid and not process_gone(guard_pid):
            os.kill(guard_pid, signal.SIGCONT)
            wait_process_gone(guard_pid, 60)
    again = cli_process("recover", *_selector(guest), "--repo", repo, "--json")
    assert again.code == 0 and again.json()["clean"], again.out


def test_recover_leaves_a_vm_that_was_paused_before_the_run_paused(guest: LabGuest, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    guest.machine.qmp().stop()  # someone paused it before the backup
    guest.machine.close()
    try:
        dead = cli_process(
            "backup", "--repo", repo, *_selector(guest), "--quiesce", "off", env={CRASH_ENV: "while-paused"}
        )
        assert dead.code == -signal.SIGKILL, dead.err
        recovered = cli_process("recover", *_selector(guest), "--repo", repo, "--json")
        assert recovered.code == 0, recovered.err
        assert not any("resumed" in a for a in recovered.json()["actions"])
        assert _run_state(guest) == "paused"  # still as its owner left it
    finally:
        guest.machine.qmp().cont()
        guest.machine.close()
