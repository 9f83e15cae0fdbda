"""The process helper against real child processes: a process is named by pid and start time, a recorded
identity that no longer fits is never signalled, SIGTERM then SIGKILL, and what a pid file may hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import RecordingRunner
from vmsnap import processes
from vmsnap.errors import UsageError
from vmsnap.runner import LocalRunner

PROGRAM = Path(sys.executable).name
MARKER = "vmsnap-test-process-marker"
SLEEPER = "import sys, time; print('ready', flush=True); time.sleep(120)"
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(120)"
)


def spawn(code: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", code, MARKER], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"  # handlers are in place
    return child


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    child = spawn(SLEEPER)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_process_is_named_by_pid_and_start_time(sleeper: subprocess.Popen[str]) -> None:
    started = processes.start_time(sleeper.pid)
    assert started is not None and started >= (processes.start_time(os.getpid()) or 0)
    assert processes.alive(sleeper.pid) and processes.same_process(sleeper.pid, started)
    assert not processes.same_process(sleeper.pid, started + 1)  # the pid, reused by another process
    assert not processes.same_process(sleeper.pid, None)
    sleeper.kill()
    sleeper.wait()
    assert processes.start_time(sleeper.pid) is None
    assert not processes.alive(sleeper.pid) and not processes.same_process(sleeper.pid, started)


def test_a_zombie_is_not_alive(sleeper: subprocess.Popen[str]) -> None:
    started = processes.start_time(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    while Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # not reaped: a zombie
    assert not processes.alive(sleeper.pid) and not processes.same_process(sleeper.pid, started)
    assert not processes.matches(sleeper.pid, processes.Identity(PROGRAM, MARKER))


def test_identity_checks_program_marker_and_start_time(sleeper: subprocess.Popen[str]) -> None:
    started = processes.start_time(sleeper.pid)
    assert processes.cmdline(sleeper.pid) == [sys.executable, "-c", SLEEPER, MARKER]
    assert processes.matches(sleeper.pid, processes.Identity(PROGRAM, MARKER))
    assert processes.matches(sleeper.pid, processes.Identity(PROGRAM, MARKER, started))
    assert not processes.matches(sleeper.pid, processes.Identity("qemu-storage-daemon", MARKER, started))
    assert not processes.matches(sleeper.pid, processes.Identity(PROGRAM, "/some/other/dir", started))
    assert not processes.matches(sleeper.pid, processes.Identity(PROGRAM, MARKER, (started or 0) + 1))
    assert not processes.matches(1, processes.Identity(PROGRAM, MARKER))


def test_a_pid_that_is_no_longer_the_recorded_process_is_never_signalled(
    sleeper: subprocess.Popen[str],
) -> None:
    started = processes.start_time(sleeper.pid) or 0
    for stale in (
        processes.Identity(PROGRAM, MARKER, started + 1),  # the pid was reused
        processes.Identity(PROGRAM, "/another/daemon/dir", started),
        processes.Identity("nbdkit", MARKER, started),
    ):
        assert processes.terminate(sleeper.pid, timeout=1, identity=stale) is False
        assert sleeper.poll() is None
    assert processes.terminate(sleeper.pid, identity=processes.Identity(PROGRAM, MARKER, started))
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def test_sigterm_first_then_sigkill_after_the_timeout() -> None:
    stubborn = spawn(STUBBORN)
    try:
        assert processes.terminate(stubborn.pid, timeout=0.5)
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()


def test_nothing_to_stop_is_no_error(sleeper: subprocess.Popen[str]) -> None:
    assert processes.terminate(os.getpid()) is False
    assert processes.terminate(1) is False
    sleeper.kill()
    sleeper.wait()
    assert processes.terminate(sleeper.pid) is False
    assert processes.stop(LocalRunner(), str(sleeper.pid)) is False


def test_stop_takes_a_pid_file_and_an_identity_only_on_this_host(sleeper: subprocess.Popen[str]) -> None:
    assert processes.stop(LocalRunner(), "not a pid") is False
    remote = RecordingRunner()
    with pytest.raises(UsageError, match="only on this host"):
        processes.stop(remote, sleeper.pid, identity=processes.Identity(PROGRAM, MARKER))
    assert remote.calls == []
    identity = processes.Identity(PROGRAM, MARKER, processes.start_time(sleeper.pid))
    assert processes.stop(LocalRunner(), f"{sleeper.pid}\n", identity=identity)
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
