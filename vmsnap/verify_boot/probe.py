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


LISTEN = 0x0A
ESTABLISHED = 0x01
CONFIRM_SECONDS = 3.0
"""How long a silent connection is held while the guest's socket table is searched for it."""


def tcp_sockets(table: str) -> list[tuple[int, int, bool]]:
    """(local port, state, local address is loopback) of each socket in a Linux ``/proc/net/tcp`` or
    ``tcp6`` table (addresses and ports in hex; state ``0A`` listens, ``01`` is established)."""
    found = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        address, _, port = fields[1].partition(":")
        try:
            number, state = int(port, 16), int(fields[3], 16)
        except ValueError:
            continue
        loopback = (
            address.endswith("7F")
            if len(address) == 8
            else address
            in (
                "00000000000000000000000001000000",
                "0000000000000000FFFF00000100007F",
            )
        )
        found.append((number, state, loopback))
    return found


def guest_sockets(agent: GuestAgent) -> list[tuple[int, int, bool]] | None:
    """The guest's TCP sockets (:func:`tcp_sockets` of ``/proc/net/tcp`` and ``tcp6``), None when the agent
    cannot read them (no such files: not Linux, or file access not allowed)."""
    found: list[tuple[int, int, bool]] = []
    read = False
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            found += tcp_sockets(agent.read_file(path).decode(errors="replace"))
            read = True
        except AgentError:
            continue
    return found if read else None


def probe_port(
    guest_port: int,
    host_port: int,
    *,
    deadline: float,
    sockets: Callable[[], list[tuple[int, int, bool]] | None] = lambda: None,
) -> PortResult:
    """Connect to ``127.0.0.1:host_port`` (forwarded to the guest's ``guest_port``) until the guest is seen
    to answer or ``deadline`` passes.

    User-mode networking accepts the host's connection at once, whatever the guest does, so an accepted
    connection proves nothing. The port is open when the service sends a first byte (kept as the detail),
    or, when it stays silent, when the guest's socket table (``sockets``, e.g. :func:`guest_sockets`) shows
    a connection established on that port from outside the guest while this one is held. A connection
    closed at once without data (the guest refused it), or silence the guest's table does not confirm, is
    no answer; it is tried again until the deadline.
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
                    confirmed, last = _confirm(guest_port, sockets)
                    if confirmed:
                        return PortResult(guest_port, True, last)
        except OSError as err:
            last = str(err)
        if time.monotonic() >= deadline:
            return PortResult(guest_port, False, last)
        time.sleep(0.5)


def _confirm(port: int, sockets: Callable[[], list[tuple[int, int, bool]] | None]) -> tuple[bool, str]:
    """(whether the guest shows a connection established on ``port`` from outside, what was seen), asked
    for :data:`CONFIRM_SECONDS` while the host's silent connection is held."""
    until = time.monotonic() + CONFIRM_SECONDS
    while True:
        table = sockets()
        if table is None:
            return False, "the connection got no answer, and the guest's sockets cannot be read to confirm it"
        if any(p == port and state == ESTABLISHED and not loop for p, state, loop in table):
            return True, "accepted in the guest (the service sent nothing first)"
        if time.monotonic() >= until:
            if any(p == port and state == LISTEN and not loop for p, state, loop in table):
                return False, f"the guest listens on port {port}, but the connection never reached it"
            return False, f"the connection got no answer: nothing listens on port {port} in the guest"
        time.sleep(0.3)


def screenshot(monitor: QMPMonitor, path: Path, *, target: str | None = None) -> str | None:
    """``screendump`` the copy's display into ``path`` (PNG); None on success, else why there is none.

    :param target: the file name QEMU writes (default ``path``; ``/dev/fdset/N`` for a descriptor passed
        with :meth:`~vmsnap.vm.qmp.QMPMonitor.add_fd`, opened on ``path``)
    """
    try:
        monitor.execute("screendump", {"filename": target or str(path), "format": "png"})
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
