"""Thaw guards seen from vmsnap: what a guard watches (:class:`GuardTarget`), where it runs
(:class:`GuardSite`: this host, or another hypervisor over SSH), the handle of the guard of one freeze
(:class:`ThawGuard`), and finding and standing down the guards of dead runs (``vmsnap recover``).

The guard itself is the program :mod:`vmsnap.vm.thawguard` (standard library only). A machine says where its
guard runs (:meth:`vmsnap.vm.machine.Machine.guard_plan`):

- a bare QEMU on this host: here, on the agent's unix socket;
- a libvirt domain: here, through a libvirt connection of the guard's own (for a domain on another host that
  is libvirt's own ``qemu+ssh`` connection, not vmsnap's);
- a bare QEMU on another host: on that host, started over the SSH master connection as ``python3 -I
  FILE guard …`` (the file copied into its guard directory first: vmsnap need not be installed there). Its
  control channel is the SSH session's standard input: when vmsnap dies, its end of the pipe closes, ssh sends
  end-of-file and the guard thaws; when the connection itself dies, sshd closes the guard's input just the
  same. A connection that hangs without closing is caught by the lease (no ``beat`` for :data:`LEASE` s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from socket import gethostname
from typing import IO, Literal, Protocol

import attrs

from vmsnap import processes
from vmsnap.errors import FreezeError, VmsnapError
from vmsnap.runner import LocalRunner, Runner, child_environment
from vmsnap.vm import thawguard
from vmsnap.vm.agent import FREEZE_TIMEOUT
from vmsnap.vm.remote import RemoteHost

READY_TIMEOUT = 20.0
"""Seconds to wait for a new guard to say it runs (a Python start on a loaded host, an SSH round trip)."""

BEAT = 1.0
"""Seconds between the parent's ``beat`` lines."""

LEASE = 15.0
"""Seconds without a ``beat`` after which a guard thaws (the parent hangs, or its SSH connection does)."""

MAX_FROZEN = 120.0
"""Seconds a guard lets a guest stay frozen beyond the freeze's own timeout, whatever the parent says."""

CLOCK_SLACK = 60.0
"""Seconds added to a guard's possible life when another host's clock measures it."""

RUN_DIR_ENV = "VMSNAP_RUN_DIR"

PROGRAM = Path(thawguard.__file__)


def local_guard_dir() -> Path:
    """Where this host's guards keep their locks: ``$VMSNAP_RUN_DIR/guards``, else ``/run/vmsnap/guards``
    (root) or ``$XDG_RUNTIME_DIR/vmsnap/guards``."""
    value = os.environ.get(RUN_DIR_ENV)
    if value:
        return Path(value) / "guards"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime:
        return Path(runtime) / "vmsnap" / "guards"
    return Path("/run/vmsnap/guards")


@attrs.frozen
class GuardTarget:
    """The guest agent a guard thaws through, named as the host the guard runs on sees it.

    :param kind: ``socket`` (a QEMU chardev socket) or ``libvirt`` (a domain)
    :param address: (socket path,) or (libvirt URI, domain UUID)
    :param description: for messages
    :param qmp: a socket target's QMP socket (there): the guard resumes a VM left paused inside the freeze
        window through it (a libvirt domain is resumed through the guard's connection)
    """

    kind: Literal["socket", "libvirt"]
    address: tuple[str, ...]
    description: str = attrs.field(eq=False, default="")
    qmp: str | None = attrs.field(eq=False, default=None)

    @classmethod
    def socket(cls, path: Path | str, *, qmp: Path | str | None = None) -> GuardTarget:
        return cls(
            "socket", (str(path),), f"the guest agent on {path}", str(qmp) if qmp is not None else None
        )

    @classmethod
    def libvirt(cls, uri: str, uuid: str, name: str) -> GuardTarget:
        return cls("libvirt", (uri, uuid), f"the guest agent of libvirt domain {name}")

    def words(self) -> list[str]:
        """The target as the guard program takes it."""
        return [self.kind, *self.address]


@attrs.frozen
class GuardRecord:
    """A live guard, as its record says (see :mod:`vmsnap.vm.thawguard`).

    :param where: the host it runs on, as runners name hosts (``local``, ``ssh:root@hv2``)
    :param pid: its pid there; 0 while it is still starting
    :param since: when it started (``time.time()`` there)
    :param deadline: seconds after ``since`` at which it thaws whatever its parent says (0: never); None in
        the record of an older guard
    :param give_up: seconds it then keeps trying to reach the agent (None: an older guard's record)
    """

    where: str
    pid: int
    start: int | None
    since: float
    parent_host: str
    parent_boot: str
    parent_pid: int
    parent_start: int | None
    deadline: float | None = None
    give_up: float | None = None

    @classmethod
    def from_json(cls, where: str, data: dict[str, object]) -> GuardRecord:
        parent = data.get("parent")
        parent = parent if isinstance(parent, dict) else {}

        def number(value: object) -> int | None:
            return value if isinstance(value, int) else None

        def seconds(value: object) -> float | None:
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        since = data.get("since")
        return cls(
            where=where,
            pid=number(data.get("pid")) or 0,
            start=number(data.get("start")),
            since=float(since) if isinstance(since, int | float) else 0.0,
            parent_host=str(parent.get("host", "")),
            parent_boot=str(parent.get("boot", "")),
            parent_pid=number(parent.get("pid")) or 0,
            parent_start=number(parent.get("start")),
            deadline=seconds(data.get("deadline")),
            give_up=seconds(data.get("give_up")),
        )

    def may_still_act(self, now: float) -> bool:
        """True while the guard may still be watching or thawing a live run's freeze: until its deadline and
        its give-up have passed since it started (with a minute for clocks that differ between hosts). A
        guard with no deadline may act at any time; an older guard's record, without them, gets what vmsnap
        gives its guards by default."""
        if self.deadline == 0:
            return True
        deadline = self.deadline if self.deadline is not None else FREEZE_TIMEOUT + MAX_FROZEN
        give_up = self.give_up if self.give_up is not None else thawguard.DEFAULT_GIVE_UP
        return now - self.since < deadline + give_up + CLOCK_SLACK

    def parent_alive(self) -> bool | None:
        """Whether the vmsnap process that started the guard still runs; None when it ran on another host
        (or another boot of this one: then it is gone) and cannot be asked."""
        if self.parent_boot != thawguard.boot_id():
            return None if self.parent_host != gethostname() else False
        return processes.same_process(self.parent_pid, self.parent_start)


class GuardChannel(Protocol):
    """The parent's end of a started guard: lines to its control input."""

    def send(self, word: bytes) -> None: ...

    def close(self, *, wait: bool) -> None: ...


class GuardSite(Protocol):
    """Where guards run: start one, read the record of a target's live guard, stand one down."""

    host: str

    def launch(
        self, options: Sequence[str], target: GuardTarget, *, log: Path | None
    ) -> tuple[str, GuardChannel]:
        """Start a guard with ``options``; returns its first line (``ready PID``, ``busy PID``) and its
        channel.

        :raise FreezeError: it could not be started
        """
        ...

    def live(self, target: GuardTarget) -> GuardRecord | None:
        """The live guard of ``target`` there, if any."""
        ...

    def stand_down(self, target: GuardTarget, record: GuardRecord) -> bool:
        """Stop ``record``'s guard without a thaw (only while it is still that process); True if it was."""
        ...

    def thaw(self, target: GuardTarget) -> dict[str, object]:
        """Thaw ``target``'s guest once, checked, holding its guard lock there (so no run can start a guard
        and freeze in between); the program's answer (see ``thaw`` in :mod:`vmsnap.vm.thawguard`).

        :raise VmsnapError: the program could not be run there
        """
        ...


@attrs.frozen
class GuardPlan:
    """How a machine's guest is guarded: the target, and the site the guard runs on."""

    target: GuardTarget
    site: GuardSite


def _read_line(stream: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([stream], [], [], left)
        if not ready:
            break
        chunk = os.read(stream, 256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


class _Commands:
    """The program's ``status`` and ``stop`` through a runner (shared by both sites)."""

    host: str

    def _runner(self) -> Runner:
        raise NotImplementedError

    def _program(self) -> tuple[list[str], str]:
        """(the command that runs the program, its guard directory) there."""
        raise NotImplementedError

    def live(self, target: GuardTarget) -> GuardRecord | None:
        program, directory = self._program()
        out = self._runner().run([*program, "status", "--dir", directory, *target.words()], timeout=60).stdout
        try:
            data = json.loads(out or "{}")
        except ValueError as err:
            raise VmsnapError(f"the thaw guard program on {self.host} answered {out!r}") from err
        return GuardRecord.from_json(self.host, data) if isinstance(data, dict) and data else None

    def thaw(self, target: GuardTarget) -> dict[str, object]:
        program, directory = self._program()
        argv = [*program, "thaw", "--dir", directory, *target.words()]
        out = self._runner().run(argv, timeout=300).stdout
        try:
            data = json.loads(out or "{}")
        except ValueError as err:
            raise VmsnapError(f"the thaw guard program on {self.host} answered {out!r}") from err
        if not isinstance(data, dict) or not data:
            raise VmsnapError(f"the thaw guard program on {self.host} answered {out!r}")
        return data

    def stand_down(self, target: GuardTarget, record: GuardRecord) -> bool:
        if record.pid <= 1 or record.start is None:
            return False
        program, directory = self._program()
        argv = [*program, "stop", "--dir", directory, "--pid", str(record.pid), "--start", str(record.start)]
        out = self._runner().run([*argv, *target.words()], timeout=60).stdout
        return out.strip() == "stopped"


class _PipeChannel:
    """A local guard's control pipe."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, word: bytes) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, word)

    def close(self, *, wait: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class LocalGuardSite(_Commands):
    """Guards on this host: ``python -I thawguard.py guard --detach …``, started through ``os.posix_spawn``
    (it forks once more into a session of its own, so it is nobody's child to reap). A :class:`Runner` runs
    commands to completion; this one must outlive us, which is why it does not go through one."""

    host = "local"

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory

    def _runner(self) -> Runner:
        return LocalRunner()

    def _program(self) -> tuple[list[str], str]:
        return [sys.executable, "-I", str(PROGRAM)], str(self.directory or local_guard_dir())

    def launch(
        self, options: Sequence[str], target: GuardTarget, *, log: Path | None
    ) -> tuple[str, GuardChannel]:
        program, directory = self._program()
        control_read, control_write = os.pipe()
        ready_read, ready_write = os.pipe()
        # only the guard's ends cross the spawn; ours stay close-on-exec
        os.set_inheritable(control_read, True)
        os.set_inheritable(ready_write, True)
        argv = [*program, "guard", "--dir", directory, "--detach", "--watch-parent", *options]
        argv += ["--control-fd", str(control_read), "--ready-fd", str(ready_write)]
        if log is not None:
            argv += ["--log", str(log)]
        try:
            intermediate = os.posix_spawn(
                sys.executable,
                [*argv, *target.words()],
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
            with contextlib.suppress(ChildProcessError):
                os.waitpid(intermediate, 0)  # it forked the guard and exited at once
        return line, _PipeChannel(control_write)


class _SshChannel:
    """A guard on another host: its control input is our ssh client's standard input."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def send(self, word: bytes) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(OSError, ValueError):
                stdin.write(word)
                stdin.flush()

    def close(self, *, wait: bool) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if wait:  # the guard exits on "done", and ssh with it
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                processes.stop_child(self.process, timeout=5)


_INSTALL = """umask 077
if [ "$(id -u)" = 0 ]; then d=/run/vmsnap/guards
elif [ -n "${XDG_RUNTIME_DIR:-}" ]; then d="$XDG_RUNTIME_DIR/vmsnap/guards"
else echo "no-runtime-dir"; exit 3; fi
command -v python3 >/dev/null 2>&1 || { echo "no-python3"; exit 3; }
f="$d/thawguard-$1.py"
mkdir -p "$d" && cat > "$f.tmp.$$" && mv -f "$f.tmp.$$" "$f" && printf '%s\\n' "$d" "$f"
"""
"""Copies the guard program into the guard directory of the other host (as the SSH user: /run/vmsnap/guards
for root, else under $XDG_RUNTIME_DIR) and prints that directory and the file; or says what is missing."""


class SshGuardSite(_Commands):
    """Guards on the host behind ``remote`` (its SSH master connection), run with that host's ``python3``.

    :param remote: the open connection to the VM's hypervisor
    """

    def __init__(self, remote: RemoteHost) -> None:
        self.remote = remote
        self.host = remote.host
        self._installed: tuple[str, str] | None = None

    def _runner(self) -> Runner:
        return self.remote.runner

    def available(self) -> bool:
        """True when a guard can run there (``python3`` and a guard directory: the program is copied there
        now if it is not).

        :raise CommandError: the host cannot be reached
        """
        try:
            self._program()
        except FreezeError:
            return False
        return True

    def _program(self) -> tuple[list[str], str]:
        if self._installed is None:
            source = PROGRAM.read_bytes()
            digest = hashlib.sha256(source).hexdigest()[:16]
            result = self.remote.runner.run(
                ["sh", "-c", _INSTALL, "sh", digest], input=source, ok_codes=(0, 3), timeout=60
            )
            lines = result.stdout.split()
            if result.exit_code != 0 or len(lines) != 2:
                missing = {
                    "no-python3": "python3 is not installed there",
                    "no-runtime-dir": "it has no directory for it (log in as root, or set XDG_RUNTIME_DIR)",
                }.get(result.stdout.strip(), result.stdout.strip() or result.stderr.strip())
                raise FreezeError(
                    f"cannot run a thaw guard on {self.remote.destination}: {missing}",
                    hint=f"install python3 on {self.remote.destination} (the guard needs nothing else), "
                    "or back up without freezing (--quiesce off)",
                )
            self._installed = (lines[0], lines[1])
        directory, program = self._installed
        return ["python3", "-I", program], directory

    def launch(
        self, options: Sequence[str], target: GuardTarget, *, log: Path | None
    ) -> tuple[str, GuardChannel]:
        program, directory = self._program()
        argv = [*program, "guard", "--dir", directory, *options, "--control-fd", "0", "--ready-fd", "1"]
        if log is not None:
            argv += ["--log", "-"]  # its standard error: our ssh client writes it into ``log``
        full = self.remote.runner.remote_argv([*argv, *target.words()])
        with contextlib.ExitStack() as stack:
            err: IO[bytes] | int = subprocess.DEVNULL
            if log is not None:
                err = stack.enter_context(open(log, "ab"))
            try:
                process = subprocess.Popen(
                    full,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=child_environment(),
                )
            except OSError as error:
                raise FreezeError(f"cannot start ssh for the thaw guard: {error}") from error
        assert process.stdout is not None
        line = _read_line(process.stdout.fileno(), READY_TIMEOUT)
        channel = _SshChannel(process)
        if not line.startswith("ready "):
            channel.close(wait=False)
            processes.stop_child(process, timeout=5)
        return line, channel


class ThawGuard:
    """The parent's handle on the guard of one freeze (a context manager: on a normal exit it says "done",
    on an exception it hands the thaw over).

    :param plan: what the guard watches and where it runs
    :param log: a file (on this host) the guard appends its decisions to
    :param give_up: seconds the guard keeps trying to reach the agent once it has to thaw
    :param deadline: seconds after its start at which the guard thaws whatever the parent says
    :param lease: seconds without a beat after which it thaws
    """

    def __init__(
        self,
        plan: GuardPlan,
        *,
        log: Path | None = None,
        give_up: float = thawguard.DEFAULT_GIVE_UP,
        deadline: float = MAX_FROZEN,
        lease: float = LEASE,
    ) -> None:
        self.plan = plan
        self.log = log
        self.give_up = give_up
        self.deadline = deadline
        self.lease = lease
        self.pid: int | None = None
        self._channel: GuardChannel | None = None
        self._lock = threading.Lock()
        self._stop_beats = threading.Event()
        self._beats: threading.Thread | None = None

    def options(self) -> list[str]:
        """The guard's options (the site adds its directory, descriptors and target)."""
        me = os.getpid()
        start = processes.start_time(me)
        return [
            *("--parent-host", gethostname(), "--parent-boot", thawguard.boot_id()),
            *("--parent-pid", str(me), *(("--parent-start", str(start)) if start is not None else ())),
            *(
                "--lease",
                f"{self.lease:g}",
                "--deadline",
                f"{self.deadline:g}",
                "--give-up",
                f"{self.give_up:g}",
            ),
            *(("--qmp", self.plan.target.qmp) if self.plan.target.qmp else ()),
        ]

    def start(self) -> ThawGuard:
        """Start the guard and wait until it reports that it runs.

        :raise FreezeError: it could not be started, or another run's guard watches this guest (nothing was
            frozen yet)
        """
        target = self.plan.target
        line, channel = self.plan.site.launch(self.options(), target, log=self.log)
        word, _, pid = line.partition(" ")
        where = "" if self.plan.site.host == "local" else f" on {self.plan.site.host}"
        if word != "ready" or not pid.isdigit():
            channel.send(b"done\n")  # a guard that answers late must not thaw what we never froze
            channel.close(wait=False)
        if word == "busy":
            raise FreezeError(
                f"a thaw guard (pid {pid}{where}) of another vmsnap run still watches {target.description}; "
                "refusing to freeze under it",
                hint="wait for that run to end; if it died, `vmsnap recover` thaws the guest and stops "
                "its guard",
            )
        if word != "ready" or not pid.isdigit():
            raise FreezeError(
                f"the thaw guard did not start{where} ({line or 'no answer'}); refusing to freeze without it",
                hint="pass --quiesce off to back up without freezing",
            )
        self.pid = int(pid)
        self._channel = channel
        self._beats = threading.Thread(target=self._beat, name="thaw-guard-beat", daemon=True)
        self._beats.start()
        return self

    def _beat(self) -> None:
        while not self._stop_beats.wait(BEAT):
            with self._lock:
                if self._channel is not None:
                    self._channel.send(b"beat\n")

    def _finish(self, word: bytes, *, wait: bool) -> None:
        self._stop_beats.set()
        with self._lock:
            channel, self._channel = self._channel, None
            if channel is None:
                return
            channel.send(word)
        channel.close(wait=wait)

    def done(self) -> None:
        """The guest is thawed: the guard exits without touching the agent."""
        self._finish(b"done\n", wait=True)

    def hand_over(self) -> None:
        """We stop talking to the agent now; the guard thaws the guest as soon as the agent answers.

        The caller must close its agent connection first and not reopen it (a socket agent serves one client
        at a time).
        """
        self._finish(b"thaw\n", wait=False)

    def __enter__(self) -> ThawGuard:
        if self.pid is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.done()
        else:  # the body failed (or was interrupted) with the guest perhaps frozen: the guard thaws
            self.hand_over()


def stand_down_leftovers(plan: GuardPlan) -> tuple[list[str], GuardRecord | None]:
    """Stop the guard of ``plan``'s target whose vmsnap run is gone (``vmsnap recover`` thaws itself, once).

    :return: (one line per guard stopped, the live guard of a run that still runs, or None)
    :raise VmsnapError: its site could not be asked (another host unreachable)
    """
    record = plan.site.live(plan.target)
    if record is None or record.pid == 0:
        return [], record
    where = "" if record.where == "local" else f" on {record.where}"
    alive = record.parent_alive()
    if alive:
        return [], record
    if alive is None and record.may_still_act(time.time()):
        return [], record  # started from another host, and maybe still working: leave it be
    if plan.site.stand_down(plan.target, record):
        return [f"stopped the thaw guard (pid {record.pid}{where}) of a dead vmsnap run"], None
    return [], None


__all__ = [
    "BEAT",
    "LEASE",
    "MAX_FROZEN",
    "GuardPlan",
    "GuardRecord",
    "GuardSite",
    "GuardTarget",
    "LocalGuardSite",
    "SshGuardSite",
    "ThawGuard",
    "local_guard_dir",
    "stand_down_leftovers",
]
