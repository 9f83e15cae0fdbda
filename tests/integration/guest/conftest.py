"""Helpers for tests against the real lab guest: hook scripts in the guest, polling the agent politely."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from vmsnap import processes
from vmsnap.errors import AgentError
from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import HOOK_DIR, HOOK_LOG
from vmsnap.vm.agent import GuestAgent

HookInstaller = Callable[[str, str], None]


@pytest.fixture
def guest_hooks(lab_guest: LabGuest) -> Iterator[HookInstaller]:
    """Install hook scripts in the shared guest's /etc/qemu/fsfreeze-hook.d; removed (and the guest
    thawed) afterwards. Each script appends "NAME ACTION" to /tmp/hook-order, then runs ``body``."""

    def install(name: str, body: str) -> None:
        script = f'#!/bin/sh\necho "{name} $1" >> /tmp/hook-order\n{body}\n'
        lab_guest.write_file(f"{HOOK_DIR}/{name}", script.encode(), mode=0o755)

    lab_guest.sh(f"rm -f {HOOK_DIR}/* /tmp/hook-order {HOOK_LOG}")
    try:
        yield install
    finally:
        wait_until_thawed(lab_guest, 60)
        lab_guest.sh(f"rm -f {HOOK_DIR}/* /tmp/hook-order")


def hook_order(guest: LabGuest) -> list[str]:
    return guest.sh("cat /tmp/hook-order 2>/dev/null || true").stdout.splitlines()


def wait_until_thawed(guest: LabGuest, timeout: float) -> float:
    """Seconds until the agent says "thawed". Connects afresh each time and lets go at once, because
    QEMU serves the agent socket to one client at a time and a thaw guard may need it."""
    guest.agent.close()
    agent_socket = guest.agent_socket
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        agent = GuestAgent.from_socket(agent_socket, timeout=1.0)
        try:
            last = agent.fsfreeze_status()
            if last == "thawed":
                return time.monotonic() - started
        except AgentError as err:
            last = err.message
        finally:
            agent.close()
        time.sleep(0.1)
    raise AssertionError(f"the guest was not thawed within {timeout:g} s (last: {last})")


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie counts: init may be slow to reap it)."""
    assert pid > 1, f"no process to watch (pid {pid})"  # pid 0 would be "gone" at once
    return not processes.alive(pid)


def wait_process_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still runs after {timeout:g} s")
        time.sleep(0.05)
