"""What a boot verification asks of the booted copy: the agent's first answer, each check, each port, its
screen and its serial console. Each works on any copy (bare QEMU or libvirt): a :class:`GuestAgent`, a
:class:`QMPMonitor`, a console file, a host port.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsnap.errors import AgentError, CommandError, CommandTimeoutError, QMPError, UsageError
from vmsnap.verify_boot.result import OUTPUT_LIMIT, CheckResult, PortResult
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.agent_runner import AgentRunner
from vmsnap.vm.qmp import QMPMonitor

CHECK_TIMEOUT = 120.0
"""Seconds one check may run in the guest."""


def wait_for_agent(
    agent: Callable[[], GuestAgent | None], *, deadline: float, alive: Callable[[], bool]
) -> GuestAgent | None:
    """Ask ``guest-ping`` until the agent answers, the copy stops, or ``deadline`` (monotonic) passes;
    returns the answering agent, None when it never answered.

    :param agent: makes a new connection to the agent (None while it cannot be reached yet)
    :param alive: False once the copy has stopped (no answer can come)
    """
    while time.monotonic() < deadline and alive():
        candidate = None
        with contextlib.suppress(AgentError, OSError):
            candidate = agent()
        if candidate is not None:
            left = max(0.5, min(3.0, deadline - time.monotonic()))
            if candidate.is_responding(timeout=left):
                return candidate
            candidate.close()
        time.sleep(0.2)
    return None


def check_argv(command: str) -> list[str]:
    """The argv of a ``--check`` (split like a shell would, no shell run).

    :raise UsageError: it is empty or unbalanced
    """
    try:
        argv = shlex.split(command)
    except ValueError as err:
        raise UsageError(f"--check {command!r} cannot be split into words: {err}") from err
    if not argv:
        raise UsageError("--check needs a command", hint="e.g. --check 'cat /etc/hostname'")
    return argv


def run_check(agent: GuestAgent, command: str, *, timeout: float = CHECK_TIMEOUT) -> CheckResult:
    """Run one check in the guest (``guest-exec``): its exit status and the end of its output."""
    argv = check_argv(command)
    started = time.monotonic()
    try:
        result = AgentRunner(agent, "boot").run(argv, ok_codes=range(256), timeout=timeout)
    except CommandTimeoutError:
        return CheckResult(
            command, None, "", f"did not finish within {timeout:g} s", time.monotonic() - started
        )
    except CommandError as err:  # guest-exec refused to start it (126: frozen, 127: no such program)
        why = err.stderr.strip() or err.message
        inner = re.search(r"error was '(.*)'$", why)
        why = inner.group(1) if inner else why
        if err.returncode == 127:
            why = f"no such command in the guest ({why})"
        return CheckResult(command, None, "", why, time.monotonic() - started)
    except AgentError as err:
        return CheckResult(command, None, "", f"the agent failed: {err.message}", time.monotonic() - started)
    output = (result.stdout + result.stderr)[-OUTPUT_LIMIT:]
    return CheckResult(command, result.exit_code, output, None, time.monotonic() - started)


def probe_port(guest_port: int, host_port: int, *, deadline: float) -> PortResult:
    """Connect to ``127.0.0.1:host_port`` (forwarded to the guest's ``guest_port``) until it answers or
    ``deadline`` passes; what the service sends within half a second is kept as the detail.

    User-mode networking accepts the host's connection before the guest does, so a connection the guest
    refuses shows as one closed at once without data; it is retried until the deadline.
    """
    last = "no answer"
    while True:
        try:
            with socket.create_connection(("127.0.0.1", host_port), timeout=2.0) as conn:
                conn.settimeout(0.5)
                try:
                    first = conn.recv(64)
                    if first:
                        return PortResult(guest_port, True, first.decode(errors="replace").strip())
                    last = "the connection was closed at once (nothing listens there)"
                except TimeoutError:
                    return PortResult(guest_port, True, "accepted (the service sent nothing first)")
        except OSError as err:
            last = str(err)
        if time.monotonic() >= deadline:
            return PortResult(guest_port, False, last)
        time.sleep(0.5)


def screenshot(monitor: QMPMonitor, path: Path) -> str | None:
    """``screendump`` the copy's display into ``path`` (PNG); None on success, else why there is none."""
    try:
        monitor.execute("screendump", {"filename": str(path), "format": "png"})
    except QMPError as err:
        text = getattr(err, "desc", "") or err.message
        if "no console" in text.lower():
            return "the VM has no display"
        return f"screendump failed: {text}"
    if not path.is_file() or path.stat().st_size == 0:
        return "screendump wrote nothing"
    return None


def console_tail(
    path: Path | None, *, lines: int = 40, limit: int = 8192
) -> tuple[tuple[str, ...] | None, str | None]:
    """(the last ``lines`` lines of the serial console log, None) or (None, why there is none)."""
    if path is None:
        return None, "the VM has no serial console"
    try:
        with open(path, "rb") as log:
            log.seek(0, 2)
            size = log.tell()
            log.seek(max(0, size - limit))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return None, "the VM has no serial console"
    except OSError as err:
        return None, f"the console log cannot be read: {err}"
    cleaned = [line.rstrip("\r") for line in text.replace("\x1b", "").splitlines()]
    return tuple(line for line in cleaned if line.strip())[-lines:], None


def osinfo(agent: GuestAgent) -> dict[str, Any] | None:
    """``guest-get-osinfo``, or None when the agent does not offer it."""
    try:
        return agent.get_osinfo()
    except AgentError:
        return None
