"""Running commands inside a guest through the QEMU guest agent: a :class:`~vmsnap.runner.Runner` whose
host is the VM (LVM strategies and the lab use it to act inside the guest)."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Collection, Sequence

import attrs

from vmsnap.errors import AgentCommandError, CommandError, CommandTimeoutError
from vmsnap.runner import DEFAULT_TIMEOUT, CommandResult, check_argv, decode_output
from vmsnap.vm.agent import GuestAgent


@attrs.define
class AgentRunner:
    """Runs commands inside a guest through the QEMU guest agent (``guest-exec`` / ``guest-exec-status``).

    The guest needs nothing but qemu-ga: argv goes to ``guest-exec`` as path + args (the agent searches
    ``PATH``), stdin as ``input-data``, and the captured output comes back base64-encoded. The agent refuses
    ``guest-exec`` while the guest is frozen; that surfaces as a :class:`CommandError` saying so.

    :param agent: a :class:`vmsnap.vm.agent.GuestAgent` connected to the guest
    :param name: the guest's name, for messages (``host`` is ``guest:<name>``)
    :param poll: first delay between ``guest-exec-status`` polls (grows to 0.2 s)
    """

    agent: GuestAgent
    name: str = "guest"
    poll: float = 0.01

    @property
    def host(self) -> str:
        return f"guest:{self.name}"

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        args = check_argv(argv)
        data = input.encode() if isinstance(input, str) else input
        try:
            pid = self.agent.exec(args[0], args[1:], input=data)
        except AgentCommandError as err:
            frozen = "frozen" in err.desc.lower()
            raise CommandError(
                args,
                126 if frozen else 127,
                "",
                err.desc,
                host=self.host,
                hint=(
                    "the guest's filesystems are frozen: the agent runs nothing until they are thawed"
                    if frozen
                    else f"check that {args[0]} exists in the guest"
                ),
            ) from err
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.poll
        while True:
            status = self.agent.exec_status(pid)
            if status.get("exited"):
                break
            if deadline is not None and time.monotonic() > deadline:
                self._kill(pid)
                raise CommandTimeoutError(args, float(timeout or 0), host=self.host)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        stdout = decode_output(base64.b64decode(status.get("out-data", "")))
        stderr = decode_output(base64.b64decode(status.get("err-data", "")))
        if status.get("out-truncated") or status.get("err-truncated"):
            stderr += "\n(vmsnap: the agent truncated this command's output at its 16 MiB limit)"
        # killed by a signal: no exit code; report it as a shell would
        code = int(status["exitcode"]) if "exitcode" in status else 128 + int(status.get("signal", 0))
        if code not in ok_codes:
            raise CommandError(args, code, stdout, stderr, host=self.host)
        return CommandResult(args, code, stdout, stderr, self.host)

    def _kill(self, pid: int) -> None:
        # guest-exec has no kill; a second guest-exec does it (best effort: it may have just exited)
        with contextlib.suppress(Exception):
            self.agent.exec("kill", ["-9", str(pid)], capture=False)

    def which(self, name: str) -> str | None:
        result = self.run(["sh", "-c", 'command -v -- "$1"', "sh", name], ok_codes=(0, 1, 127))
        path = result.stdout.strip()
        return path if result.exit_code == 0 and path else None
