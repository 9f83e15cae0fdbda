"""Fault injection for the storage strategies' tests: a runner that runs every command for real, except one.

Not a fake: every other command runs where the wrapped runner runs (this host, the lab guest), so what the
strategy made before the fault is real and must be undone for real.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import attrs

from vmsnap.errors import CommandError, VmsnapError
from vmsnap.runner import DEFAULT_TIMEOUT, CommandResult, LocalRunner, Runner


def no_space(argv: tuple[str, ...], host: str) -> VmsnapError:
    """The error of a command that found its filesystem full."""
    return CommandError(argv, 1, "", "ERROR: cannot snapshot: No space left on device", host=host)


@attrs.define
class FaultyRunner:
    """Runs everything through ``runner``, except that the ``nth`` command starting with ``prefix`` raises
    ``error(argv, host)``: instead of running, or — ``ran_first`` — after it ran (a timeout that struck a
    command which had done its work).
    """

    prefix: tuple[str, ...]
    nth: int = 1
    error: Callable[[tuple[str, ...], str], VmsnapError] = no_space
    ran_first: bool = False
    runner: Runner = attrs.Factory(LocalRunner)
    seen: int = 0

    @property
    def host(self) -> str:
        return self.runner.host

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        if tuple(argv[: len(self.prefix)]) == self.prefix:
            self.seen += 1
            if self.seen == self.nth:
                if self.ran_first:
                    self.runner.run(argv, ok_codes=ok_codes, input=input, timeout=timeout)
                raise self.error(tuple(argv), self.host)
        return self.runner.run(argv, ok_codes=ok_codes, input=input, timeout=timeout)

    def which(self, name: str) -> str | None:
        return self.runner.which(name)
