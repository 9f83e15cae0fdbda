"""QEMU guest agent client: a typed method per guest-* command (freezing with a guaranteed thaw is
:mod:`vmsnap.vm.freeze`).

The agent is reached through an :class:`AgentChannel`: a unix socket (bare QEMU's virtio-serial chardev)
here, libvirt's ``qemuAgentCommand`` passthrough in :mod:`vmsnap.vm.libvirt.domain`. The socket protocol:
connect, send 0xFF and ``guest-sync-delimited`` with a random id, discard everything up to the 0xFF the
agent sends back, then read JSON answers until the one carrying our id; only then is the channel in step.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from vmsnap.errors import AgentCommandError, AgentError, AgentNotRespondingError, FreezeError
from vmsnap.model import validate_seconds

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
FREEZE_TIMEOUT = 60.0


class AgentChannel(Protocol):
    """Something that can carry one guest agent command and return its ``return`` value."""

    description: str

    def execute(self, command: str, arguments: Mapping[str, Any] | None, *, timeout: float) -> Any: ...

    def close(self) -> None: ...


class SocketAgentChannel:
    """The agent behind a unix socket (QEMU ``-chardev socket,path=…`` on port ``org.qemu.guest_agent.0``).

    QEMU serves one client at a time on that socket, so a channel connects per command sequence and
    re-synchronises after every reconnect.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, connect_timeout: float = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self.description = f"guest agent on {self.socket_path}"
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def _connect(self, timeout: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        path = self.socket_path
        if not path.exists():
            raise AgentNotRespondingError(f"agent socket {path} does not exist")
        if not stat.S_ISSOCK(path.stat().st_mode):
            raise AgentNotRespondingError(f"{path} is not a unix socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(path))
        except OSError as err:
            sock.close()
            raise AgentNotRespondingError(
                f"cannot connect to agent socket {path}: {err.strerror or err}"
            ) from err
        self._sock = sock
        self._buffer = b""
        try:
            self._sync(min(timeout, 10.0))
        except BaseException:
            self.close()
            raise
        return sock

    def _sync(self, timeout: float) -> None:
        sock = self._sock
        assert sock is not None
        sync_id = secrets.randbelow(2**31 - 1) + 1
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        deadline = time.monotonic() + timeout
        self._send(b"\xff" + json.dumps(request).encode() + b"\n")
        # discard up to and including the agent's 0xFF sentinel, then read until our id comes back
        while b"\xff" not in self._buffer:
            self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\xff") else b""
            self._recv_some(deadline, waiting_for="guest-sync-delimited")
        self._buffer = self._buffer[self._buffer.index(b"\xff") + 1 :]
        while True:
            message = self._read_message(deadline, waiting_for="guest-sync-delimited")
            if message.get("return") == sync_id:
                return

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as err:
            self.close()
            raise AgentNotRespondingError(f"agent socket {self.socket_path} broke: {err}") from err

    def _recv_some(self, deadline: float, *, waiting_for: str) -> None:
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise AgentNotRespondingError(
                f"the guest agent did not answer {waiting_for} in time ({self.socket_path})"
            )
        self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError as err:
            self.close()
            raise AgentNotRespondingError(
                f"the guest agent did not answer {waiting_for} in time ({self.socket_path})"
            ) from err
        except OSError as err:
            self.close()
            raise AgentNotRespondingError(f"agent socket {self.socket_path} broke: {err}") from err
        if not chunk:
            self.close()
            raise AgentNotRespondingError(
                f"agent socket {self.socket_path} closed while waiting for {waiting_for}"
            )
        self._buffer += chunk

    def _read_message(self, deadline: float, *, waiting_for: str) -> dict[str, Any]:
        decoder = json.JSONDecoder()
        while True:
            text = self._buffer.lstrip(b"\xff \t\r\n")
            if text:
                try:
                    message, end = decoder.raw_decode(text.decode("utf-8", errors="replace"))
                except json.JSONDecodeError:
                    message, end = None, 0
                if message is not None:
                    consumed = len(text.decode("utf-8", errors="replace")[:end].encode("utf-8"))
                    self._buffer = text[consumed:]
                    if isinstance(message, dict):
                        return message
                    continue
            self._recv_some(deadline, waiting_for=waiting_for)

    def execute(self, command: str, arguments: Mapping[str, Any] | None, *, timeout: float) -> Any:
        self._connect(timeout)
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        deadline = time.monotonic() + timeout
        self._send(json.dumps(request).encode() + b"\n")
        if command in NO_REPLY_COMMANDS:
            return None
        message = self._read_message(deadline, waiting_for=command)
        if "error" in message:
            error = message["error"]
            raise AgentCommandError(command, str(error.get("class", "?")), str(error.get("desc", "")))
        return message.get("return")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._buffer = b""


NO_REPLY_COMMANDS = frozenset(
    {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}
)


@attrs.frozen
class ExecResult:
    """The end of a ``guest-exec``: exit code and captured output (decoded from base64)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None


@attrs.frozen
class FreezeReport:
    """What a freeze did, filled in on thaw.

    :param frozen_count: filesystems frozen
    :param window_ms: from the freeze's answer to the thaw's answer: how long writes were blocked (at least)
    :param thawed_count: filesystems thawed
    :param freeze_ms: how long ``guest-fsfreeze-freeze`` took (hooks + sync + freeze)
    :param thaw_error: the agent's error when a thaw hook failed (the filesystems are thawed all the same)
    :param guard_pid: the thaw guard watching this freeze, if any (a pid on the host it runs on: another
        hypervisor's for a VM there)
    """

    frozen_count: int = 0
    window_ms: float = 0.0
    thawed_count: int = 0
    freeze_ms: float = 0.0
    thaw_error: str | None = None
    guard_pid: int | None = None


class GuestAgent:
    """Typed access to the QEMU guest agent.

    :param channel: how commands reach the agent (see :class:`SocketAgentChannel`)
    :param timeout: default seconds per command
    """

    def __init__(self, channel: AgentChannel, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.channel = channel
        self.timeout = timeout

    @classmethod
    def from_socket(
        cls, socket_path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> GuestAgent:
        """An agent on a unix socket."""
        return cls(SocketAgentChannel(socket_path), timeout=timeout)

    def close(self) -> None:
        """Release the channel."""
        self.channel.close()

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run any guest-* command (``vmsnap agent`` uses this); prefer the typed methods.

        :raise UsageError: ``timeout`` is not a finite number of seconds above 0
        :raise AgentNotRespondingError: nothing answered in time
        :raise AgentCommandError: the agent answered with an error
        """
        seconds = validate_seconds(self.timeout if timeout is None else timeout, "agent timeout", zero=False)
        return self.channel.execute(command, arguments, timeout=seconds)

    # -- liveness and identity ------------------------------------------------------------------

    def ping(self, *, timeout: float | None = None) -> None:
        """``guest-ping``: returns when the agent answers."""
        self.execute("guest-ping", timeout=timeout)

    def is_responding(self, *, timeout: float = 3.0) -> bool:
        """True when ``guest-ping`` answers within ``timeout``."""
        try:
            self.ping(timeout=timeout)
        except AgentError:
            self.close()
            return False
        return True

    def info(self) -> dict[str, Any]:
        """``guest-info``: agent version and supported commands."""
        return dict(self.execute("guest-info"))

    def supported_commands(self) -> set[str]:
        """Names of the commands this agent has enabled."""
        return {c["name"] for c in self.info().get("supported_commands", []) if c.get("enabled")}

    # -- freezing -------------------------------------------------------------------------------

    def get_osinfo(self) -> dict[str, Any]:
        """``guest-get-osinfo`` (a boot verification records it)."""
        return dict(self.execute("guest-get-osinfo"))

    def fsfreeze_status(self) -> str:
        """``guest-fsfreeze-status``: "thawed" or "frozen"."""
        return str(self.execute("guest-fsfreeze-status"))

    def fsfreeze_freeze(self, *, timeout: float = FREEZE_TIMEOUT) -> int:
        """``guest-fsfreeze-freeze``: freeze every filesystem; runs the guest's fsfreeze hook first.

        :return: the number of filesystems frozen
        """
        return int(self.execute("guest-fsfreeze-freeze", timeout=timeout))

    def fsfreeze_freeze_list(self, mountpoints: Sequence[str], *, timeout: float = FREEZE_TIMEOUT) -> int:
        """``guest-fsfreeze-freeze-list``: freeze only these mount points."""
        return int(
            self.execute("guest-fsfreeze-freeze-list", {"mountpoints": list(mountpoints)}, timeout=timeout)
        )

    def fsfreeze_thaw(self, *, timeout: float = FREEZE_TIMEOUT) -> int:
        """``guest-fsfreeze-thaw``: thaw; runs the hook's thaw step. Returns filesystems thawed."""
        return int(self.execute("guest-fsfreeze-thaw", timeout=timeout))

    def fstrim(self, minimum: int | None = None) -> dict[str, Any]:
        """``guest-fstrim``: discard unused blocks (makes backups smaller)."""
        return dict(self.execute("guest-fstrim", {"minimum": minimum} if minimum else None, timeout=300))

    def ensure_thawed(self, *, attempts: int = 3) -> bool:
        """Thaw the guest if it is frozen (``vmsnap recover`` uses this).

        :return: True when it was frozen and is thawed now, False when it was not frozen
        :raise FreezeError: it stays frozen after ``attempts`` thaws
        """
        if self.fsfreeze_status() != "frozen":
            return False
        self.thaw_and_check(attempts)
        return True

    def thaw_quietly(self) -> None:
        with contextlib.suppress(AgentError):
            if self.fsfreeze_status() == "frozen":
                self.fsfreeze_thaw()

    def thaw_and_check(self, attempts: int = 3, *, timeout: float = FREEZE_TIMEOUT) -> tuple[int, str | None]:
        """Thaw, and check with ``guest-fsfreeze-status`` that it worked.

        :return: (filesystems thawed, the thaw hook's failure or None). A hook that fails on thaw makes the
            agent answer with an error although the filesystems are thawed: that is reported, not retried
            (retrying would run every thaw hook again).
        :raise FreezeError: the guest is still frozen (or unreachable) after ``attempts`` tries
        """
        last: AgentError | None = None
        for attempt in range(attempts):
            if attempt:
                self.close()
                time.sleep(0.5)
            try:
                try:
                    count = self.fsfreeze_thaw(timeout=timeout)
                    hook_error = None
                except AgentCommandError as err:
                    count, hook_error = 0, err.desc
                status = self.fsfreeze_status()
            except AgentError as err:
                last = err
                continue
            if status == "thawed":
                return count, hook_error
            last = FreezeError(f"the guest still reports {status} after guest-fsfreeze-thaw")
        raise FreezeError(f"thawing the guest failed after {attempts} attempts: {last}") from last

    # -- files and processes (refused by the agent while frozen) --------------------------------

    def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        input: bytes | None = None,
        env: Sequence[str] = (),
        capture: bool = True,
    ) -> int:
        """``guest-exec``: start a program in the guest; returns its pid (see :meth:`exec_status`)."""
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": capture}
        if env:
            arguments["env"] = list(env)
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        return int(self.execute("guest-exec", arguments)["pid"])

    def exec_status(self, pid: int) -> dict[str, Any]:
        """``guest-exec-status``: ``exited`` plus, once exited, exit code and base64 output."""
        return dict(self.execute("guest-exec-status", {"pid": pid}))

    def run(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        input: bytes | None = None,
        timeout: float = 300.0,
        poll: float = 0.05,
    ) -> ExecResult:
        """Run a program in the guest to completion and return its exit code and output.

        :raise AgentNotRespondingError: the program did not finish within ``timeout``
        """
        pid = self.exec(path, args, input=input)
        deadline = time.monotonic() + timeout
        while True:
            status = self.exec_status(pid)
            if status.get("exited"):
                return ExecResult(
                    exit_code=int(status.get("exitcode", -1)),
                    stdout=base64.b64decode(status.get("out-data", "")),
                    stderr=base64.b64decode(status.get("err-data", "")),
                    signal=status.get("signal"),
                )
            if time.monotonic() > deadline:
                raise AgentNotRespondingError(
                    f"{path} (pid {pid}) did not finish in the guest within {timeout:g} s"
                )
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)

    def file_open(self, path: str, mode: str = "r") -> int:
        """``guest-file-open``: returns a handle."""
        return int(self.execute("guest-file-open", {"path": path, "mode": mode}))

    def file_read(self, handle: int, count: int = 65536) -> tuple[bytes, bool]:
        """``guest-file-read``: (data, eof)."""
        answer = self.execute("guest-file-read", {"handle": handle, "count": count})
        return base64.b64decode(answer.get("buf-b64", "")), bool(answer.get("eof"))

    def file_write(self, handle: int, data: bytes) -> int:
        """``guest-file-write``: returns bytes written."""
        answer = self.execute(
            "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()}
        )
        return int(answer.get("count", 0))

    def file_flush(self, handle: int) -> None:
        """``guest-file-flush``."""
        self.execute("guest-file-flush", {"handle": handle})

    def file_close(self, handle: int) -> None:
        """``guest-file-close``."""
        self.execute("guest-file-close", {"handle": handle})

    def read_file(self, path: str) -> bytes:
        """Read a whole guest file through guest-file-open/read/close."""
        handle = self.file_open(path, "r")
        chunks = []
        try:
            while True:
                data, eof = self.file_read(handle)
                chunks.append(data)
                if eof or not data:
                    break
        finally:
            self.file_close(handle)
        return b"".join(chunks)

    def write_file(self, path: str, data: bytes) -> None:
        """Write a whole guest file through guest-file-open/write/close."""
        handle = self.file_open(path, "w")
        try:
            for start in range(0, len(data), 48 * 1024):
                self.file_write(handle, data[start : start + 48 * 1024])
            self.file_flush(handle)
        finally:
            self.file_close(handle)

    def shutdown(self, mode: str = "powerdown") -> None:
        """``guest-shutdown`` (no answer comes back on success)."""
        self.execute("guest-shutdown", {"mode": mode})
