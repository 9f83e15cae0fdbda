"""The thaw guard program: thaws a guest when the vmsnap process that froze it dies, hangs or lets go.

It runs where it can reach the guest agent without vmsnap: beside vmsnap for a bare QEMU on this host (the
agent's unix socket) and for a libvirt domain (its own libvirt connection, ``qemuAgentCommand``), and on the
hypervisor itself for a VM on another host (the agent's socket there), started over SSH. On another host
vmsnap is usually not installed, so this file imports only the standard library (and libvirt's binding for a
libvirt target); vmsnap copies it there (:mod:`vmsnap.vm.guards`). Its grammar stays within Python 3.8.

``guard``: watch one freeze. The guard takes the target's lock (``DIR/KEY.lock``, ``flock``; KEY is a hash
of the target) and writes its record (``DIR/KEY.json``: its pid and start time, when it started, its
``--deadline`` and ``--give-up``, the parent's host, boot id, pid and start time), says ``ready PID`` on the
ready descriptor (``busy PID`` when another guard holds the lock: a guest is watched by one guard at a time,
so a guard never thaws a freeze it does not own), and reads lines on the control descriptor:

- ``beat``: the parent lives; ``done``: the parent thawed the guest, exit without touching the agent;
- ``thaw`` (the parent hands the thaw over), end of file (the parent died: the kernel closed its end, or the
  SSH channel carrying it closed), the parent's pid gone (``--watch-parent``, same host), no ``beat`` for
  ``--lease`` seconds, or ``--deadline`` seconds since the guard started: thaw — connect to the agent,
  retrying for ``--give-up`` seconds, ``guest-fsfreeze-thaw`` when it says "frozen", and check that
  ``guest-fsfreeze-status`` says "thawed". When the agent does not answer, the VM may have been left paused
  inside the freeze window (vmsnap stops the vCPUs while it snapshots; an agent does not run then): the
  guard resumes it — ``cont`` through ``--qmp SOCKET`` when its status is "paused", ``virDomainResume``
  for a libvirt domain paused for no reason libvirt knows (a ``stop`` passed through) — and goes on.

SIGINT, SIGHUP, SIGTERM and SIGPIPE are ignored (a terminal closing or a service stopping does not take the
guard with vmsnap); SIGUSR1 makes it stand down without thawing (``vmsnap recover`` sends it to a guard whose
parent is dead, then thaws itself, once). The lock and the record are removed when the guard ends.

``status`` prints the record of the live guard of a target (JSON; ``{}`` when there is none) and removes a
dead guard's record; ``stop --pid PID --start TICKS`` stands that guard down (SIGKILL after 10 s); ``thaw``
thaws the guest once, checked, holding the target's lock (``vmsnap recover``: no run can freeze between its
look and its thaw; a live guard's freeze is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import select
import signal
import socket
import stat
import sys
import time
from typing import Any

DEFAULT_GIVE_UP = 300.0
"""Seconds a guard keeps trying to reach the agent once it has to thaw."""

PROTOCOL = 2
"""Bumped when the arguments or the record change (vmsnap checks what a guard on another host runs)."""


class AgentFailure(Exception):
    """The agent could not be reached or answered with an error."""


class AgentRefused(AgentFailure):
    """The agent answered with an error (``desc``: its words)."""

    def __init__(self, command: str, error: Any) -> None:
        self.desc = str(error.get("desc", error) if isinstance(error, dict) else error)
        super().__init__(f"{command}: {self.desc}")


class StandDown(BaseException):
    """SIGUSR1: exit at once without thawing."""


# -- reaching the agent ---------------------------------------------------------------------------------


class SocketAgent:
    """The guest agent on a unix socket (QEMU serves one client at a time): connect, ``guest-sync-delimited``,
    then one JSON command per line."""

    def __init__(self, path: str, qmp: str | None = None) -> None:
        self.path = path
        self.qmp = qmp
        self.description = "agent socket " + path

    def gone(self) -> bool:
        """True when the socket no longer exists (its QEMU stopped: nothing is frozen)."""
        try:
            return not stat.S_ISSOCK(os.stat(self.path).st_mode)
        except FileNotFoundError:
            return True

    def execute(self, command: str, timeout: float) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(self.path)
            deadline = time.monotonic() + timeout
            sync_id = secrets.randbelow(2**31 - 1) + 1
            sync = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            sock.sendall(b"\xff" + json.dumps(sync).encode() + b"\n")
            buffer = b""
            while b"\xff" not in buffer:  # everything up to the agent's 0xFF is stale
                buffer = _receive(sock, buffer[-1:] if buffer.endswith(b"\xff") else b"", deadline)
            buffer = buffer[buffer.index(b"\xff") + 1 :]
            while True:
                message, buffer = _message(sock, buffer, deadline)
                if message.get("return") == sync_id:
                    break
            sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
            message, buffer = _message(sock, buffer, deadline)
        except OSError as err:
            raise AgentFailure(f"{self.path}: {err}") from err
        finally:
            sock.close()
        if "error" in message:
            raise AgentRefused(command, message["error"])
        return message.get("return")

    def resume_paused(self) -> str:
        """``cont`` through the VM's QMP socket (``--qmp``) when it reports "paused"; returns "resumed" or the
        state found ("" without a QMP socket). QEMU serves that socket to one client at a time: while the
        vmsnap run still holds it, this fails and is tried again."""
        if self.qmp is None:
            return ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(self.qmp)
            deadline = time.monotonic() + 5.0
            greeting, buffer = _message(sock, b"", deadline)
            if "QMP" not in greeting:
                raise AgentFailure(f"{self.qmp} is no QMP socket")
            buffer = _qmp(sock, buffer, "qmp_capabilities", deadline)[1]
            answer, buffer = _qmp(sock, buffer, "query-status", deadline)
            status = str(answer.get("status", "")) if isinstance(answer, dict) else ""
            if status != "paused":  # only a plain `stop`: not a save, a migration, an I/O error
                return status
            _qmp(sock, buffer, "cont", deadline)
            return "resumed"
        except OSError as err:
            raise AgentFailure(f"{self.qmp}: {err}") from err
        finally:
            sock.close()


def _qmp(sock: socket.socket, buffer: bytes, command: str, deadline: float) -> tuple[Any, bytes]:
    """Send one QMP command and read its answer (events before it are skipped)."""
    sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
    while True:
        message, buffer = _message(sock, buffer, deadline)
        if "error" in message:
            raise AgentFailure("{}: {}".format(command, message["error"].get("desc", message["error"])))
        if "return" in message:
            return message["return"], buffer


def _receive(sock: socket.socket, buffer: bytes, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise OSError(errno.ETIMEDOUT, "the agent did not answer in time")
    sock.settimeout(left)
    chunk = sock.recv(65536)
    if not chunk:
        raise OSError(errno.ECONNRESET, "the agent closed the connection")
    return buffer + chunk


def _message(sock: socket.socket, buffer: bytes, deadline: float) -> tuple[dict[str, Any], bytes]:
    while True:
        text = buffer.lstrip(b"\xff \t\r\n")
        line, newline, rest = text.partition(b"\n")
        if newline:
            try:
                message = json.loads(line.decode("utf-8", "replace"))
            except ValueError:
                message = None
            buffer = rest
            if isinstance(message, dict):
                return message, buffer
            continue
        buffer = _receive(sock, text, deadline)


class LibvirtAgent:
    """The guest agent of a libvirt domain, through a libvirt connection of the guard's own."""

    def __init__(self, uri: str, uuid: str) -> None:
        self.uri = uri
        self.uuid = uuid
        self.description = f"libvirt domain {uuid} at {uri}"
        self._domain: Any = None

    def _libvirt(self) -> tuple[Any, Any]:
        import libvirt
        import libvirt_qemu

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        return libvirt, libvirt_qemu

    def _lookup(self) -> Any:
        libvirt, _ = self._libvirt()
        if self._domain is None:
            try:
                self._domain = libvirt.open(self.uri).lookupByUUIDString(self.uuid)
            except libvirt.libvirtError as err:
                raise AgentFailure(str(err)) from err
        return self._domain

    def gone(self) -> bool:
        """True when the domain no longer exists or does not run (nothing is frozen)."""
        libvirt, _ = self._libvirt()
        try:
            return not self._lookup().isActive()
        except AgentFailure:
            self._domain = None
            return False  # libvirtd may be restarting: try again
        except libvirt.libvirtError as err:
            self._domain = None
            return bool(err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)

    def resume_paused(self) -> str:
        """Resume the domain when it is paused for no reason libvirt knows (a ``stop`` passed through to
        QEMU, as vmsnap's pause); returns "resumed" or the state found (a user's ``virsh suspend``, a
        migration or an I/O error are left alone)."""
        libvirt, _ = self._libvirt()
        domain = self._lookup()
        try:
            state, reason = domain.state()
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_UNKNOWN:
                domain.resume()
                return "resumed"
        except libvirt.libvirtError as err:
            self._domain = None
            raise AgentFailure(str(err)) from err
        return "paused" if state == libvirt.VIR_DOMAIN_PAUSED else "running"

    def execute(self, command: str, timeout: float) -> Any:
        libvirt, libvirt_qemu = self._libvirt()
        domain = self._lookup()
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                domain, json.dumps({"execute": command}), max(1, int(timeout)), 0
            )
        except libvirt.libvirtError as err:
            self._domain = None
            raise AgentFailure(str(err)) from err
        message = json.loads(reply) if reply else {}
        if "error" in message:
            raise AgentRefused(command, message["error"])
        return message.get("return")


def agent_for(target: list[str], qmp: str | None = None) -> SocketAgent | LibvirtAgent:
    """The agent a target names: ``socket PATH`` (with its VM's QMP socket, if known) or ``libvirt URI
    UUID``."""
    if len(target) == 2 and target[0] == "socket":
        return SocketAgent(target[1], qmp)
    if len(target) == 3 and target[0] == "libvirt":
        return LibvirtAgent(target[1], target[2])
    raise SystemExit(f"thawguard: a target is `socket PATH` or `libvirt URI UUID`, not {target}")


def target_key(target: list[str]) -> str:
    """The lock name of a target: a hash of its words (one guard per target and host)."""
    return hashlib.sha256("\0".join(target).encode()).hexdigest()[:32]


# -- the lock and the record --------------------------------------------------------------------------


def guard_dir(path: str) -> str:
    """``path``, made private (0700) if missing; refused when another user owns it or others may write
    in it."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise SystemExit(f"thawguard: {path} must be a directory of this user that no one else can write")
    return path


def take_lock(directory: str, key: str) -> int | None:
    """The lock of ``key`` (an open descriptor holding ``flock``), or None when a live guard holds it."""
    path = os.path.join(directory, key + ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the file we locked must still be the one at the path (its last holder unlinks it)
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


def drop_lock(directory: str, key: str, fd: int) -> None:
    """Remove the record and the lock file (still holding the lock), then release it."""
    for name in (key + ".json", key + ".lock"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
    os.close(fd)


def start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); None when it is gone
    or a zombie (a zombie holds nothing any more: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _same_process(pid: int, start: int | None) -> bool:
    ticks = start_ticks(pid)
    return ticks is not None and (start is None or ticks == start)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def read_record(directory: str, key: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, key + ".json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(directory: str, key: str, record: dict[str, Any]) -> None:
    path = os.path.join(directory, key + ".json")
    temp = f"{path}.tmp-{os.getpid()}"
    with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(record, f)
    os.replace(temp, path)


def live_record(directory: str, key: str) -> dict[str, Any]:
    """The record of the guard holding ``key``'s lock ({} when none does; a dead guard's record is removed).

    Taking the lock to look holds it for microseconds; a guard starting at that instant retries.
    """
    if not os.path.exists(os.path.join(directory, key + ".lock")):
        return {}
    fd = take_lock(directory, key)
    if fd is None:
        return read_record(directory, key) or {"pid": 0}
    drop_lock(directory, key, fd)  # nobody held it: a guard that was SIGKILLed left it
    return {}


# -- the guard -----------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        if self.path is None:
            return
        line = "{} thawguard[{}]: {}\n".format(time.strftime("%Y-%m-%dT%H:%M:%S"), os.getpid(), message)
        with contextlib.suppress(OSError):
            if self.path == "-":
                os.write(2, line.encode())
            else:
                with open(self.path, "a") as f:
                    f.write(line)


def wait_for_parent(args: argparse.Namespace, log: Log) -> bool:
    """Block until the parent says something, disappears, stops beating or the deadline passes; True when the
    guest must be thawed."""
    started = last_beat = time.monotonic()
    pending = b""
    while True:
        ready, _, _ = select.select([args.control_fd], [], [], 0.25)
        now = time.monotonic()
        if ready:
            try:
                data = os.read(args.control_fd, 256)
            except OSError:
                data = b""
            if not data:
                log("the parent is gone (its end of the control channel closed)")
                return True
            pending += data
            while b"\n" in pending:
                word, _, pending = pending.partition(b"\n")
                if word == b"done":
                    log("the parent thawed the guest itself; exiting")
                    return False
                if word == b"thaw":
                    log("the parent handed the thaw over")
                    return True
                last_beat = now  # "beat" (and anything else the parent says) shows it lives
        if args.watch_parent and not _same_process(args.parent_pid, args.parent_start):
            log(f"the parent {args.parent_pid} is gone")
            return True
        if args.lease and now - last_beat > args.lease:
            log(f"no word from the parent for {args.lease:g} s")
            return True
        if args.deadline and now - started > args.deadline:
            log(f"the guest has been frozen for more than {args.deadline:g} s")
            return True


def thaw_when_possible(agent: SocketAgent | LibvirtAgent, give_up: float, log: Log) -> int:
    """Thaw the guest if it is frozen, retrying until ``give_up`` seconds pass; 0 when it is thawed (or its VM
    is gone), 1 when the agent never answered."""
    deadline = time.monotonic() + give_up
    attempt = 0
    last = ""
    resumed = False
    while time.monotonic() < deadline:
        attempt += 1
        if agent.gone():
            log(f"{agent.description} is gone: the VM stopped, nothing to thaw")
            return 0
        try:
            status = agent.execute("guest-fsfreeze-status", 5.0)
            if status == "frozen":
                try:
                    count = agent.execute("guest-fsfreeze-thaw", 60.0)
                    log(f"thawed {count} filesystem(s) (attempt {attempt})")
                except AgentFailure as err:  # a thaw hook failed: the filesystems are thawed all the same
                    log(f"the thaw answered: {err}")
                status = agent.execute("guest-fsfreeze-status", 5.0)
            else:
                log(f"the guest is {status}; nothing to do")
            if status == "thawed":
                return 0
            last = "the guest still reports " + str(status)
        except AgentFailure as err:
            if str(err) != last or attempt % 20 == 0:  # one line per new reason, not per try
                log(f"attempt {attempt}: {err}")
            last = str(err)
            if not resumed:
                resumed = _resume(agent, log)
        time.sleep(0.3)
        time.sleep(0.3)
    log(f"gave up after {give_up:g} s: the guest may still be frozen; run `vmsnap recover`")
    return 1


def _resume(agent: SocketAgent | LibvirtAgent, log: Log) -> bool:
    """The agent does not answer: the VM may be paused (vmsnap pauses the vCPUs inside the freeze window to
    snapshot, and a guest whose vCPUs are stopped runs no agent). Resume it if so; True once its run state
    was read (or cannot be: no QMP socket), False when it could not be reached (tried again)."""
    try:
        state = agent.resume_paused()
    except AgentFailure as err:
        log(f"the VM's run state cannot be asked yet: {err}")
        return False
    if state == "resumed":
        log("resumed the VM's vCPUs (paused inside the freeze window)")
    elif state not in ("", "running"):
        log(f"the VM is {state}: left so (not a pause of vmsnap's)")
    return True


def thaw_once(agent: SocketAgent | LibvirtAgent, timeout: float) -> dict[str, Any]:
    """One checked thaw, for ``thaw``: what it found or did, as the JSON object ``thaw`` prints."""
    if agent.gone():
        return {"gone": agent.description}
    try:
        status = agent.execute("guest-fsfreeze-status", timeout)
    except AgentFailure as err:
        return {"unreachable": str(err)}
    if status != "frozen":
        return {"status": status}
    last = ""
    for attempt in range(3):
        if attempt:
            time.sleep(0.5)
        count, hook_error = 0, None
        try:
            try:
                count = int(agent.execute("guest-fsfreeze-thaw", 60.0))
            except AgentRefused as err:  # a thaw hook failed: the filesystems are thawed all the same
                hook_error = err.desc
            status = agent.execute("guest-fsfreeze-status", timeout)
        except AgentFailure as err:
            last = str(err)
            continue
        if status == "thawed":
            return {"thawed": count, "hook_error": hook_error}
        last = f"the guest still reports {status} after guest-fsfreeze-thaw"
    return {"frozen": last}


def _test_stop(name: str) -> None:
    """TEST ONLY: stop this process here (SIGSTOP) when ``$VMSNAP_TEST_CRASH_AT`` is ``stop:NAME`` (as
    :func:`vmsnap.processes.crash_point` does in vmsnap)."""
    if os.environ.get("VMSNAP_TEST_CRASH_AT") == f"stop:{name}":
        os.kill(os.getpid(), signal.SIGSTOP)


def _stand_down(_signum: int, _frame: Any) -> None:
    raise StandDown


def guard(args: argparse.Namespace) -> int:
    agent = agent_for(args.target, args.qmp)
    key = target_key(args.target)
    directory = guard_dir(args.dir)
    if args.detach:
        if os.fork() > 0:
            os._exit(0)  # the intermediate: the guard is re-parented to init and never a zombie of vmsnap's
        os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, _stand_down)
    log = Log(args.log)
    lock = None
    for _ in range(20):  # `status` holds a free lock for microseconds
        lock = take_lock(directory, key)
        if lock is not None:
            break
        time.sleep(0.05)
    if lock is None:
        holder = read_record(directory, key).get("pid", 0)
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, f"busy {holder}\n".encode())
        return 3
    try:
        record = {
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "start": start_ticks(os.getpid()),
            "target": args.target,
            "since": time.time(),
            # how long it may still act (vmsnap recover on another host must not take it for a dead run's)
            "deadline": args.deadline,
            "give_up": args.give_up,
            "parent": {
                "host": args.parent_host,
                "boot": args.parent_boot,
                "pid": args.parent_pid,
                "start": args.parent_start,
            },
        }
        write_record(directory, key, record)
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, f"ready {os.getpid()}\n".encode())
            if args.ready_fd != 1:  # fd 1 on another host is the SSH channel: kept open while we run
                os.close(args.ready_fd)
        log(f"guarding {agent.description} for parent {args.parent_pid} on {args.parent_host}")
        if not wait_for_parent(args, log):
            return 0
        return thaw_when_possible(agent, args.give_up, log)
    except StandDown:
        log("told to stand down (vmsnap recover thaws the guest itself)")
        return 0
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        drop_lock(directory, key, lock)


def thaw(args: argparse.Namespace) -> int:
    """Thaw the target's guest holding its guard lock, so that no run can start a guard and freeze between
    the look and the thaw (``vmsnap recover``); prints one JSON object: ``{"busy": PID}`` (a live guard
    holds the lock: its run's freeze is left alone), ``{"status": S}`` (nothing to do), ``{"thawed": N,
    "hook_error": …}``, ``{"frozen": WHY}`` (it stays frozen), ``{"unreachable": WHY}`` or ``{"gone": …}``."""
    directory = guard_dir(args.dir)
    key = target_key(args.target)
    lock = None
    for _ in range(20):  # `status` holds a free lock for microseconds
        lock = take_lock(directory, key)
        if lock is not None:
            break
        time.sleep(0.05)
    if lock is None:
        print(json.dumps({"busy": read_record(directory, key).get("pid", 0)}))
        return 0
    try:
        record = {"protocol": PROTOCOL, "pid": os.getpid(), "start": start_ticks(os.getpid())}
        write_record(directory, key, {**record, "target": args.target, "since": time.time(), "thaw": True})
        _test_stop("thaw-guest")
        print(json.dumps(thaw_once(agent_for(args.target), args.timeout)))
    finally:
        drop_lock(directory, key, lock)
    return 0


def status(args: argparse.Namespace) -> int:
    print(json.dumps(live_record(guard_dir(args.dir), target_key(args.target))))
    return 0


def stop(args: argparse.Namespace) -> int:
    """Stand the guard of the target down, if it is still the process named; prints "stopped" or "gone"."""
    directory = guard_dir(args.dir)
    key = target_key(args.target)
    record = live_record(directory, key)
    if record.get("pid") != args.pid or start_ticks(args.pid) != args.start:
        print("gone")
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(args.pid, signal.SIGUSR1)
        os.kill(args.pid, signal.SIGCONT)  # a stopped guard takes the SIGUSR1 first when it goes on
    deadline = time.monotonic() + 10.0
    while start_ticks(args.pid) == args.start:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(args.pid, signal.SIGKILL)
            deadline += 10.0
        time.sleep(0.02)
    live_record(directory, key)  # removes what a SIGKILLed guard left
    print("stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="thawguard", description="Thaw a guest when the vmsnap process that froze it goes away."
    )
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("guard", help="watch one freeze")
    run.add_argument("--control-fd", type=int, required=True)
    run.add_argument("--ready-fd", type=int, required=True)
    run.add_argument("--parent-host", default="")
    run.add_argument("--parent-boot", default="")
    run.add_argument("--parent-pid", type=int, required=True)
    run.add_argument("--parent-start", type=int, default=None)
    run.add_argument(
        "--watch-parent", action="store_true", help="the parent runs on this host: watch its pid"
    )
    run.add_argument(
        "--lease", type=float, default=0.0, help="thaw after this long without a beat (0: never)"
    )
    run.add_argument(
        "--deadline", type=float, default=0.0, help="thaw after this long in any case (0: never)"
    )
    run.add_argument("--give-up", type=float, default=DEFAULT_GIVE_UP)
    run.add_argument(
        "--qmp", help="a socket target's QMP socket: resume a VM paused inside the freeze window first"
    )
    run.add_argument("--log", help="a file to note decisions in ('-': standard error)")
    run.add_argument("--detach", action="store_true", help="fork into a new session first")
    run.set_defaults(run=guard)
    look = commands.add_parser("status", help="print the record of the target's live guard")
    look.set_defaults(run=status)
    halt = commands.add_parser("stop", help="stand the target's guard down")
    halt.add_argument("--pid", type=int, required=True)
    halt.add_argument("--start", type=int, required=True)
    halt.set_defaults(run=stop)
    melt = commands.add_parser("thaw", help="thaw the target's guest under its guard lock, once")
    melt.add_argument("--timeout", type=float, default=10.0, help="seconds for each status question")
    melt.set_defaults(run=thaw)
    for sub in (run, look, halt, melt):
        sub.add_argument("--dir", required=True, help="where locks and records live (made 0700)")
        sub.add_argument("target", nargs="+", help="socket PATH | libvirt URI UUID")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
