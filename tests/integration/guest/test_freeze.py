"""freeze.frozen() on the real lab guest: freeze window, hooks under qemu-ga, the thaw guard, bad agents."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.guest.conftest import (
    HookInstaller,
    hook_order,
    process_gone,
    wait_process_gone,
    wait_until_thawed,
)
from vmsnap import processes
from vmsnap.errors import CommandError, FreezeError
from vmsnap.lab.guest import DATA_MOUNT, LabGuest
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.freeze import frozen
from vmsnap.vm.machine import QemuMachine

pytestmark = pytest.mark.guest


def test_frozen_blocks_the_guest_reports_the_window_and_thaws(lab_guest: LabGuest, tmp_path: Path) -> None:
    with frozen(lab_guest.machine, guard_log=tmp_path / "guard.log") as report:
        assert lab_guest.agent.fsfreeze_status() == "frozen"
        with pytest.raises(CommandError, match="frozen") as info:
            lab_guest.run(["touch", f"{DATA_MOUNT}/during-freeze"])  # the agent runs nothing while frozen
        assert info.value.returncode == 126
        guard_pid = report.guard_pid
        assert guard_pid is not None and not process_gone(guard_pid)  # watching while frozen
    assert lab_guest.agent.fsfreeze_status() == "thawed"
    assert report.frozen_count == 1  # /mnt/data (the initramfs root is not a freezable filesystem)
    assert report.thawed_count == 1
    assert report.window_ms > 0 and report.freeze_ms > 0
    assert report.thaw_error is None
    print(f"\nfreeze took {report.freeze_ms:.1f} ms, frozen window {report.window_ms:.1f} ms")
    wait_process_gone(guard_pid, 10)  # the guard exits by itself once told the guest is thawed
    assert "parent thawed the guest itself" in (tmp_path / "guard.log").read_text()
    lab_guest.run(["touch", f"{DATA_MOUNT}/after-freeze"])


def test_an_error_inside_the_freeze_still_thaws_and_propagates(lab_guest: LabGuest) -> None:
    with pytest.raises(RuntimeError, match="snapshot broke"), frozen(lab_guest.machine) as report:
        raise RuntimeError("snapshot broke")
    assert lab_guest.agent.fsfreeze_status() == "thawed"
    assert report.thawed_count == 1
    assert report.guard_pid is not None  # the guard was watching while the body ran
    wait_process_gone(report.guard_pid, 10)


def test_freezing_only_named_mountpoints(lab_guest: LabGuest) -> None:
    with frozen(lab_guest.machine, [DATA_MOUNT]) as report:
        assert lab_guest.agent.fsfreeze_status() == "frozen"
    assert report.frozen_count == 1
    assert lab_guest.agent.fsfreeze_status() == "thawed"


def test_hooks_run_in_name_order_on_freeze_and_reverse_on_thaw(
    lab_guest: LabGuest, guest_hooks: HookInstaller
) -> None:
    guest_hooks("20-db", "exit 0")
    guest_hooks("10-app", "exit 0")
    with frozen(lab_guest.machine):
        pass
    assert hook_order(lab_guest) == ["10-app freeze", "20-db freeze", "20-db thaw", "10-app thaw"]
    log = lab_guest.read_file("/var/log/vmsnap-fsfreeze-hook.log").decode()
    assert "freeze /etc/qemu/fsfreeze-hook.d/10-app: ok" in log


def test_a_failing_freeze_hook_fails_the_freeze_and_leaves_the_guest_thawed(
    lab_guest: LabGuest, guest_hooks: HookInstaller
) -> None:
    guest_hooks("10-app", "exit 0")
    guest_hooks("20-db", '[ "$1" = freeze ] && exit 5; exit 0')
    guest_hooks("30-cache", "exit 0")
    entered = False
    with pytest.raises(FreezeError, match="hook") as info, frozen(lab_guest.machine):
        entered = True
    assert not entered  # no snapshot is taken of an unprepared application
    assert "freezing the guest failed" in str(info.value)
    assert lab_guest.agent.fsfreeze_status() == "thawed"
    # 10-app froze and was thawed again; 30-cache was never asked
    assert hook_order(lab_guest) == ["10-app freeze", "20-db freeze", "10-app thaw"]


def test_a_failing_thaw_hook_is_reported_and_the_guest_is_thawed(
    lab_guest: LabGuest, guest_hooks: HookInstaller
) -> None:
    guest_hooks("10-app", '[ "$1" = thaw ] && exit 4; exit 0')
    guest_hooks("20-db", "exit 0")
    with frozen(lab_guest.machine) as report:
        pass
    assert report.thaw_error is not None and "hook" in report.thaw_error
    assert lab_guest.agent.fsfreeze_status() == "thawed"
    # the failure did not stop the other thaw, and the thaw hooks ran once (no blind retry)
    assert hook_order(lab_guest) == ["10-app freeze", "20-db freeze", "20-db thaw", "10-app thaw"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vmsnap.vm.freeze import frozen
    from vmsnap.vm.machine import QemuMachine
    machine = QemuMachine(sys.argv[1], sys.argv[2], name="labvm")
    with frozen(machine, guard_log=Path(sys.argv[3])) as report:
        print("frozen", report.guard_pid, flush=True)
        time.sleep(600)
    """
)


def test_a_sigkilled_freezer_is_thawed_by_the_guard_within_10_s(lab_guest: LabGuest, tmp_path: Path) -> None:
    lab_guest.agent.close()  # the holder needs the agent socket (one client at a time)
    log = tmp_path / "guard.log"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lab_guest.qmp_socket), str(lab_guest.agent_socket), str(log)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        assert line[0] == "frozen", line
        guard_pid = int(line[1])
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        seconds = wait_until_thawed(lab_guest, 10)
    finally:
        processes.stop_child(holder, timeout=0)
    print(f"\nthawed {seconds:.2f} s after SIGKILL")
    wait_process_gone(guard_pid, 10)
    assert "thawed 1 filesystem" in log.read_text()


def test_an_agent_that_stops_answering_gives_a_bounded_clear_error(lab_guest: LabGuest) -> None:
    # stop qemu-ga itself for a while, from a process of its own (it runs on while the agent sleeps)
    pause = "sleep 0.3; kill -STOP $(pidof qemu-ga); sleep 8; kill -CONT $(pidof qemu-ga)"
    lab_guest.agent.exec("/bin/sh", ["-c", pause], capture=False)
    lab_guest.agent.close()
    probe = GuestAgent.from_socket(lab_guest.agent_socket, timeout=0.5)
    deadline = time.monotonic() + 8
    while probe.is_responding(timeout=0.5):  # wait until the pause has begun
        probe.close()
        assert time.monotonic() < deadline, "qemu-ga was never paused"
        time.sleep(0.1)
    probe.close()
    with pytest.raises(FreezeError, match="did not answer") as info, frozen(lab_guest.machine, timeout=2):
        pass
    assert "cannot freeze" in str(info.value)  # nothing was sent that could freeze the guest later
    assert "qemu-ga" in str(info.value)  # the hint says what to check
    wait_until_thawed(lab_guest, 30)  # and once the agent is back, it reports the guest thawed


def test_a_freeze_slower_than_the_timeout_is_handed_to_the_guard(
    lab_guest: LabGuest, guest_hooks: HookInstaller, tmp_path: Path
) -> None:
    guest_hooks("10-slow", '[ "$1" = freeze ] && sleep 5; exit 0')
    log = tmp_path / "guard.log"
    with (
        pytest.raises(FreezeError, match="did not answer") as info,
        frozen(lab_guest.machine, timeout=2, guard_log=log),
    ):
        pass
    match = re.search(r"thaw guard \(pid (\d+)\)", str(info.value))
    assert match, str(info.value)
    # the agent completes the freeze after we gave up on it; the guard then thaws
    wait_process_gone(int(match.group(1)), 60)
    wait_until_thawed(lab_guest, 10)
    text = log.read_text()
    assert "parent handed the thaw over" in text
    assert "thawed 1 filesystem" in text


def test_a_freeze_held_past_the_guards_deadline_is_thawed_and_not_called_quiesced(
    lab_guest: LabGuest, tmp_path: Path
) -> None:
    log = tmp_path / "guard.log"
    with (
        pytest.raises(FreezeError, match="thawed before the snapshot was complete") as info,
        frozen(lab_guest.machine, timeout=2, max_frozen=1, guard_log=log),
    ):
        wait_until_thawed(lab_guest, 30)  # a body that hangs: the guard thaws at its deadline (3 s)
    assert "not quiesced" in str(info.value)
    assert "frozen for more than 3 s" in log.read_text()
    assert lab_guest.agent.fsfreeze_status() == "thawed"


def test_a_machine_without_an_agent_cannot_be_frozen(lab_guest: LabGuest, tmp_path: Path) -> None:
    no_channel = QemuMachine(lab_guest.qmp_socket, None, name="noagent")
    with pytest.raises(FreezeError, match="no guest agent channel"), frozen(no_channel):
        pass
    missing = QemuMachine(lab_guest.qmp_socket, tmp_path / "missing.qga", name="noagent")
    with pytest.raises(FreezeError, match="does not exist"), frozen(missing):
        pass
