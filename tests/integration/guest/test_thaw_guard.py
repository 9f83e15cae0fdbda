"""The thaw guard of a bare QEMU on this host, through the CLI on the real lab guest: a ``vmsnap backup``
killed while the guest is frozen leaves it thawed within seconds with no help; a dead run's guard owns its
freeze (a later run refuses to freeze under it) until ``vmsnap recover`` stands it down and thaws, once.

The same for a libvirt domain is in tests/integration/libvirt/test_guest_domain.py, for a VM on another host
in tests/integration/test_remote_host.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import cli, cli_process, cli_started, wait_stopped
from tests.integration.guest.conftest import (
    HookInstaller,
    hook_order,
    process_gone,
    wait_process_gone,
    wait_until_thawed,
)
from vmsnap.backup.config import CRASH_ENV
from vmsnap.lab.guest import DATA_MOUNT, LabGuest
from vmsnap.vm.guards import GuardRecord, GuardTarget, LocalGuardSite

pytestmark = pytest.mark.guest


@pytest.fixture
def guest(lab_guest: LabGuest) -> Iterator[LabGuest]:
    """The shared lab guest, its sockets free for the CLI, left thawed afterwards."""
    lab_guest.machine.close()
    try:
        yield lab_guest
    finally:
        with contextlib.suppress(Exception):
            if not lab_guest.is_thawed():
                lab_guest.agent.fsfreeze_thaw()
        lab_guest.machine.close()


def _selector(guest: LabGuest) -> list[str]:
    return ["--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket)]


def _live_guard(guest: LabGuest) -> GuardRecord | None:
    return LocalGuardSite().live(GuardTarget.socket(guest.agent_socket))


def _status(guest: LabGuest) -> str:
    try:
        return guest.agent.fsfreeze_status()
    finally:
        guest.machine.close()  # QEMU serves the agent socket to one client at a time


def test_a_backup_killed_while_the_guest_is_frozen_is_thawed_by_its_guard(
    guest: LabGuest, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    dead = cli_process(
        "backup", "--repo", repo, *_selector(guest), "--quiesce", "on", env={CRASH_ENV: "after-freeze"}
    )
    assert dead.code == -signal.SIGKILL, dead.err
    seconds = wait_until_thawed(guest, 10)  # no recover: the guard did it
    print(f"\nthawed {seconds:.2f} s after the kill was seen")
    deadline = time.monotonic() + 10
    while _live_guard(guest) is not None:  # it ends once the guest is thawed, and its lock with it
        assert time.monotonic() < deadline, "the guard outlived its thaw"
        time.sleep(0.1)
    guest.agent.write_file(f"{DATA_MOUNT}/after-kill.txt", b"writes go on\n")
    guest.machine.close()

    recovered = cli_process("recover", *_selector(guest), "--repo", repo, "--json")
    assert recovered.code == 0, recovered.err
    report = recovered.json()
    assert "the guest's filesystems are thawed" in report["found"]
    assert not any("thawed the guest" in a for a in report["actions"])  # the guard had done it: no thaw
    again = cli_process("recover", *_selector(guest), "--repo", repo, "--json")
    assert again.code == 0 and again.json()["clean"], again.out


def test_a_dead_runs_guard_owns_its_freeze_until_recover_stands_it_down(
    guest: LabGuest, guest_hooks: HookInstaller, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guest_hooks("10-app", "exit 0")  # records every freeze and thaw the agent runs
    guest.machine.close()
    repo = tmp_path / "repo"
    run = cli_started(
        "backup", "--repo", repo, *_selector(guest), "--quiesce", "on", env={CRASH_ENV: "stop:after-freeze"}
    )
    guard_pid = 0
    try:
        wait_stopped(run)
        record = _live_guard(guest)
        assert record is not None and record.parent_pid == run.pid
        guard_pid = record.pid
        os.kill(guard_pid, signal.SIGSTOP)  # a guard that cannot act: the freeze is left to recover
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        time.sleep(1.0)
        assert _status(guest) == "frozen"

        # a later run must not freeze (nor thaw) under the dead run's guard
        later = cli(capsys, "backup", "--repo", repo, *_selector(guest), "--quiesce", "on")
        assert later.code == 1
        assert f"a thaw guard (pid {guard_pid}) of another vmsnap run" in later.error_line
        assert _status(guest) == "frozen"

        recovered = cli(capsys, "recover", *_selector(guest), "--repo", repo, "--json")
        assert recovered.code == 0, recovered.err
        actions = recovered.json()["actions"]
        assert f"stopped the thaw guard (pid {guard_pid}) of a dead vmsnap run" in actions
        assert "thawed the guest's filesystems (1)" in actions
        assert process_gone(guard_pid)
        assert _live_guard(guest) is None
        assert _status(guest) == "thawed"
        # one freeze, one thaw: the stood-down guard did not thaw as well
        assert hook_order(guest) == ["10-app freeze", "10-app thaw"]
        guest.machine.close()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        if guard_pid and not process_gone(guard_pid):
            os.kill(guard_pid, signal.SIGCONT)
            wait_process_gone(guard_pid, 30)

    made = cli(capsys, "backup", "--repo", repo, *_selector(guest), "--quiesce", "on", "--json")
    assert made.code == 0, made.err
    assert _live_guard(guest) is None  # the run's own guard ended with it


def _wait_for_console(guest: LabGuest, text: str, timeout: float) -> None:
    assert guest.process is not None
    console = guest.process.console
    deadline = time.monotonic() + timeout
    while text not in console.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the guest never wrote {text!r} on its console"
        time.sleep(0.05)


def test_a_backup_terminated_during_a_slow_freeze_hook_is_thawed_by_its_guard(
    guest: LabGuest, guest_hooks: HookInstaller, tmp_path: Path
) -> None:
    """SIGTERM (``kill PID``, systemctl stop, a job's timeout) while a freeze hook in the guest blocks: vmsnap
    is interrupted inside ``guest-fsfreeze-freeze``, which the guest completes after vmsnap has gone. Its
    guard, handed the thaw (not told "done"), thaws the guest once the agent answers again."""
    marker = "vmsnap-test-freeze-hook-blocks"
    guest_hooks("10-app", "exit 0")
    guest_hooks("20-slow", f'[ "$1" = freeze ] && {{ echo {marker} > /dev/console; sleep 6; }}; exit 0')
    guest.machine.close()
    repo = tmp_path / "repo"
    run = cli_started("backup", "--repo", repo, *_selector(guest), "--quiesce", "on")
    try:
        _wait_for_console(guest, marker, 120)
        record = _live_guard(guest)
        assert record is not None and record.parent_pid == run.pid
        os.kill(run.pid, signal.SIGTERM)  # the process only
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == "vmsnap: interrupted", err
    wait_until_thawed(guest, 60)  # the hook ends, the freeze completes, and the guard thaws
    wait_process_gone(record.pid, 30)
    assert hook_order(guest) == ["10-app freeze", "20-slow freeze", "20-slow thaw", "10-app thaw"]
    guest.agent.write_file(f"{DATA_MOUNT}/after-term.txt", b"writes go on\n")
    guest.machine.close()


def _stopped_in_session(session: int, timeout: float = 120.0) -> int:
    """The pid of a process of ``session`` (a ``cli_started`` run and what it started) that stopped itself
    at a ``stop:`` crash point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == "T" and int(fields[3]) == session:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"nothing in session {session} reached its crash point within {timeout:g} s")


def test_recover_never_thaws_a_freeze_that_a_run_into_another_repository_makes_meanwhile(
    guest: LabGuest, guest_hooks: HookInstaller, tmp_path: Path
) -> None:
    """``recover --repo A`` looks (no guard, the guest thawed) and is stopped right before it would thaw; a
    backup into repository B (A's lock does not keep it out) tries to freeze then. Either that backup cannot
    start its guard (recover holds the guest's guard lock from its look to its thaw) or, if it froze, its
    freeze is intact after recover went on: recover never thaws a live run's freeze."""
    guest_hooks("10-app", "exit 0")
    guest.machine.close()
    # named, recover never opens the QMP socket (QEMU serves one client at a time: a backup would wait for
    # it); a libvirt domain's QMP is shared by all through libvirt anyway
    recovering = cli_started(
        "recover", *_selector(guest), "--name", "labvm", "--repo", tmp_path / "a", "--json",
        env={CRASH_ENV: "stop:thaw-guest"},
    )  # fmt: skip
    live = None
    stopped = 0
    try:
        stopped = _stopped_in_session(recovering.pid)
        live = cli_started(
            "backup", "--repo", tmp_path / "b", *_selector(guest), "--quiesce", "on",
            env={CRASH_ENV: "stop:after-freeze"},
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while live.poll() is None and _process_state(live.pid) != "T":
            assert time.monotonic() < deadline, "the backup neither froze nor ended"
            time.sleep(0.05)
        froze = live.poll() is None
        os.kill(stopped, signal.SIGCONT)
        out, err = recovering.communicate(timeout=120)
        assert recovering.returncode == 0, err
        report = json.loads(out)
        assert not any("thawed" in a for a in report["actions"]), report
        if froze:
            assert _status(guest) == "frozen"  # the live run's freeze, intact
            os.kill(live.pid, signal.SIGCONT)
            _, live_err = live.communicate(timeout=300)
            assert live.returncode == 0, live_err  # quiesced: its own thaw found its freeze
        else:
            _, live_err = live.communicate()
            assert "of another vmsnap run still watches" in live_err
            assert _status(guest) == "thawed"
        print(f"\nthe backup {'froze after' if froze else 'could not freeze under'} recover's look")
    finally:
        for process in (recovering, live):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if stopped and not process_gone(stopped):
            os.kill(stopped, signal.SIGCONT)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
