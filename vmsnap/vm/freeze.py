"""Freezing a guest's filesystems for a snapshot, with a thaw that always happens — also when vmsnap dies.

:func:`frozen` freezes through the guest agent for the body of a ``with`` and thaws afterwards, whatever
happened. Before freezing it starts a detached *thaw guard* (``python -m vmsnap.vm.freeze PARENT_PID
SOCKET``): the guard waits on a pipe from its parent: "done" → it exits; "thaw", end of file (the parent
died, even by SIGKILL) or the parent's pid vanishing → it connects to the agent socket, which QEMU serves
to one client at a time and which the kernel closed with the dead parent, and thaws the guest if it is
frozen.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from vmsnap import processes
from vmsnap.errors import AgentCommandError, AgentError, AgentNotRespondingError, FreezeError
from vmsnap.runner import child_environment
from vmsnap.vm.agent import DEFAULT_TIMEOUT, FREEZE_TIMEOUT, FreezeReport, GuestAgent, SocketAgentChannel
from vmsnap.vm.machine import Machine

_log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0
"""Seconds to wait for a new guard to say it runs (a Python start on a loaded host)."""

DEFAULT_GIVE_UP = 300.0
"""Seconds a guard keeps trying to reach the agent before it gives up."""


class _ReportHolder:
    """Lets ``frozen()`` hand out a report before the window is known and complete it on thaw."""

    def __init__(self, report: FreezeReport) -> None:
        self.report = report

    def finish(self, thawed: int, window_ms: float, thaw_error: str | None = None) -> None:
        # FreezeReport is frozen for callers; the context manager is the one place that completes it
        object.__setattr__(self.report, "thawed_count", thawed)
        object.__setattr__(self.report, "window_ms", window_ms)
        object.__setattr__(self.report, "thaw_error", thaw_error)


@contextlib.contextmanager
def frozen(
    machine: Machine,
    mountpoints: Sequence[str] | None = None,
    *,
    timeout: float = FREEZE_TIMEOUT,
    guard: bool = True,
    guard_log: Path | None = None,
) -> Iterator[FreezeReport]:
    """Freeze ``machine``'s guest filesystems for the body of the ``with``; thaw in every case.

    Before freezing, a detached thaw guard (:mod:`vmsnap.vm.thawguard`) is started when the agent is on a unix
    socket: if this process dies while the guest is frozen, even by SIGKILL, the guard thaws the guest
    within seconds. After thawing, ``guest-fsfreeze-status`` must say "thawed".

    :param mountpoints: freeze only these (``guest-fsfreeze-freeze-list``); default: every filesystem
    :param timeout: seconds for the freeze (hooks included) and for the thaw
    :param guard: start the thaw guard (only possible for a socket agent)
    :param guard_log: a file where the guard notes what it did
    :raise FreezeError: no agent, the agent does not answer, or it refused the freeze (the guest is thawed;
        when the agent stopped answering mid-freeze, the guard thaws it as soon as the agent answers)
    """
    agent = machine.agent()
    if agent is None:
        raise FreezeError(
            f"{machine.name} has no guest agent channel, so its filesystems cannot be frozen",
            hint="give the VM a qemu-ga channel, or back up without freezing (--quiesce off)",
        )
    thaw_guard = None
    channel = agent.channel
    if guard and isinstance(channel, SocketAgentChannel):
        thaw_guard = ThawGuard(channel.socket_path, log=guard_log)
    with _freeze(agent, mountpoints, timeout=timeout, guard=thaw_guard) as report:
        yield report


@contextlib.contextmanager
def _freeze(
    agent: GuestAgent, mountpoints: Sequence[str] | None, *, timeout: float, guard: ThawGuard | None
) -> Iterator[FreezeReport]:
    try:
        agent.ping(timeout=min(timeout, DEFAULT_TIMEOUT))
    except AgentError as err:  # nothing was sent that could freeze: a plain error
        agent.close()
        raise FreezeError(f"cannot freeze: {err.message}", hint=err.hint) from err
    if guard is not None:
        guard.start()
    try:
        started = time.monotonic()
        try:
            if mountpoints:
                count = agent.fsfreeze_freeze_list(mountpoints, timeout=timeout)
            else:
                count = agent.fsfreeze_freeze(timeout=timeout)
        except AgentCommandError as err:
            agent.thaw_quietly()
            raise FreezeError(f"freezing the guest failed: {err.desc}") from err
        except AgentNotRespondingError as err:
            # the freeze was sent and may still complete: whoever can reach the agent later must thaw
            agent.close()
            if guard is not None:
                guard.hand_over()
                raise FreezeError(
                    f"freezing the guest failed: {err.message}",
                    hint=f"the thaw guard (pid {guard.pid}) thaws the guest as soon as its agent answers",
                ) from err
            agent.thaw_quietly()
            raise FreezeError(f"freezing the guest failed: {err.message}") from err
        frozen_at = time.monotonic()
        holder = _ReportHolder(
            FreezeReport(
                frozen_count=count,
                freeze_ms=(frozen_at - started) * 1000.0,
                guard_pid=guard.pid if guard is not None else None,
            )
        )
        try:
            yield holder.report
        finally:
            try:
                thawed, hook_error = agent.thaw_and_check(timeout=timeout)
            except FreezeError:
                agent.close()
                if guard is not None:
                    guard.hand_over()
                raise
            holder.finish(thawed, (time.monotonic() - frozen_at) * 1000.0, hook_error)
            if hook_error is not None:
                _log.warning("the guest is thawed but a thaw hook failed: %s", hook_error)
    finally:
        if guard is not None:
            guard.done()  # no-op after a hand-over


@contextlib.contextmanager
def frozen_agent(
    agent: GuestAgent, mountpoints: Sequence[str] | None = None, *, timeout: float = FREEZE_TIMEOUT
) -> Iterator[FreezeReport]:
    """Freeze through ``agent`` for the body of the ``with``; always thaw afterwards.

    A freeze that fails (a hook said no, a filesystem refused) is thawed before :class:`FreezeError`
    is raised, so the guest is never left frozen by us. The report's ``window_ms`` is filled on thaw.
    Unlike :func:`frozen`, no thaw guard covers the death of this process (the agent may be reached through
    a channel a guard cannot open, such as libvirt's passthrough).
    """
    with _freeze(agent, mountpoints, timeout=timeout, guard=None) as report:
        yield report


class ThawGuard:
    """The parent's handle on a thaw guard process (a context manager: on a normal exit it says "done").

    The guard is started through ``os.posix_spawn`` with an argv list, then forks once more and starts a
    new session, so it is nobody's child to reap and no terminal signal reaches it. (A :class:`Runner` runs
    commands to completion; this one must outlive us, which is why it does not go through a Runner.)

    :param agent_socket: the QEMU chardev socket of the guest agent
    :param log: a file the guard appends its decisions to (default: none)
    :param give_up: seconds the guard keeps trying to reach the agent once it has to thaw
    """

    def __init__(
        self,
        agent_socket: str | os.PathLike[str],
        *,
        log: Path | None = None,
        give_up: float = DEFAULT_GIVE_UP,
    ) -> None:
        self.agent_socket = Path(agent_socket)
        self.log = log
        self.give_up = give_up
        self.pid: int | None = None
        self._control: int | None = None

    def argv(self, control_fd: int, ready_fd: int) -> list[str]:
        """The guard's command line."""
        argv = [
            sys.executable,
            "-m",
            "vmsnap.vm.freeze",
            str(os.getpid()),
            str(self.agent_socket),
            "--control-fd",
            str(control_fd),
            "--ready-fd",
            str(ready_fd),
            "--give-up",
            f"{self.give_up:g}",
        ]
        if self.log is not None:
            argv += ["--log", str(self.log)]
        return argv

    def start(self) -> ThawGuard:
        """Start the guard and wait until it reports that it runs.

        :raise FreezeError: it could not be started or did not report in time (nothing was frozen yet)
        """
        control_read, control_write = os.pipe()
        ready_read, ready_write = os.pipe()
        # only the guard's ends cross the spawn; ours stay close-on-exec
        os.set_inheritable(control_read, True)
        os.set_inheritable(ready_write, True)
        try:
            intermediate = os.posix_spawn(
                sys.executable,
                self.argv(control_read, ready_write),
                child_environment(),  # no AWS secrets, no key file path
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                ],
            )
        except OSError as err:
            for fd in (control_read, control_write, ready_read, ready_write):
                os.close(fd)
            raise FreezeError(
                f"cannot start the thaw guard: {err}", hint="check that Python can run"
            ) from err
        os.close(control_read)
        os.close(ready_write)
        try:
            line = _read_line(ready_read, READY_TIMEOUT)
        finally:
            os.close(ready_read)
            _reap(intermediate)  # it forked the guard and exited at once
        if not line.startswith("ready "):
            os.close(control_write)
            raise FreezeError(
                "the thaw guard did not start; refusing to freeze without it",
                hint="run `python -m vmsnap.vm.freeze --help` to see why, or pass guard=False",
            )
        self.pid = int(line.split()[1])
        self._control = control_write
        return self

    def _send(self, word: bytes) -> None:
        if self._control is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._control, word)
        os.close(self._control)
        self._control = None

    def done(self) -> None:
        """The guest is thawed: the guard exits without touching the agent."""
        self._send(b"done")

    def hand_over(self) -> None:
        """We stop talking to the agent now; the guard thaws the guest as soon as the agent answers.

        The caller must close its agent connection first and not reopen it (one client at a time).
        """
        self._send(b"thaw")

    def __enter__(self) -> ThawGuard:
        if self.pid is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# -- the guard process -------------------------------------------------------------------------------


class _Log:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        if self.path is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with contextlib.suppress(OSError), open(self.path, "a") as f:
            f.write(f"{stamp} thawguard[{os.getpid()}]: {message}\n")


def wait_for_parent(control_fd: int, parent_pid: int, log: _Log) -> bool:
    """Block until the parent says something or disappears; True when the guest must be thawed."""
    while True:
        ready, _, _ = select.select([control_fd], [], [], 0.5)
        if ready:
            word = os.read(control_fd, 16)
            if word.startswith(b"done"):
                log("parent thawed the guest itself; exiting")
                return False
            if word.startswith(b"thaw"):
                log("parent handed the thaw over")
                return True
            log("parent is gone (its end of the pipe closed)")
            return True
        if not processes.alive(parent_pid):
            log(f"parent {parent_pid} is gone")
            return True


def thaw_when_possible(agent_socket: Path, give_up: float, log: _Log) -> int:
    """Connect to the agent (retrying until ``give_up`` seconds pass) and thaw the guest if it is frozen.

    :return: 0 when the guest is thawed or its QEMU is gone, 1 when the agent never answered
    """
    deadline = time.monotonic() + give_up
    attempt = 0
    last_error = ""
    while time.monotonic() < deadline:
        attempt += 1
        if not agent_socket.exists():
            log(f"{agent_socket} is gone: the VM stopped, nothing to thaw")
            return 0
        agent = GuestAgent.from_socket(agent_socket, timeout=5.0)
        try:
            status = agent.fsfreeze_status()
            if status == "frozen":
                count = agent.fsfreeze_thaw(timeout=60.0)
                log(f"thawed {count} filesystem(s) (attempt {attempt})")
            else:
                log(f"guest is {status}; nothing to do")
            if agent.fsfreeze_status() == "thawed":
                return 0
        except AgentError as err:
            if err.message != last_error or attempt % 20 == 0:  # one line per new reason, not per try
                log(f"attempt {attempt}: {err.message}")
            last_error = err.message
        finally:
            agent.close()
        time.sleep(0.3)
    log(f"gave up after {give_up:g} s: the guest may still be frozen; run `vmsnap recover`")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmsnap.vm.freeze PARENT_PID SOCKET --control-fd N --ready-fd M``."""
    parser = argparse.ArgumentParser(
        prog="python -m vmsnap.vm.freeze",
        description="Thaw a guest when the vmsnap process freezing it dies.",
    )
    parser.add_argument("parent_pid", type=int)
    parser.add_argument("agent_socket", type=Path)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--give-up", type=float, default=DEFAULT_GIVE_UP)
    parser.add_argument("--log")
    parser.add_argument("--foreground", action="store_true", help="do not detach (for debugging)")
    args = parser.parse_args(argv)
    if not args.foreground:
        if os.fork() > 0:
            os._exit(0)  # the intermediate: the guard below is re-parented to init and never a zombie of ours
        os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    log = _Log(args.log)
    with contextlib.suppress(OSError):
        os.write(args.ready_fd, f"ready {os.getpid()}\n".encode())
        os.close(args.ready_fd)
    log(f"guarding {args.agent_socket} for parent {args.parent_pid}")
    if not wait_for_parent(args.control_fd, args.parent_pid, log):
        return 0
    return thaw_when_possible(args.agent_socket, args.give_up, log)


if __name__ == "__main__":
    sys.exit(main())
