"""Test doubles (unit tests of argument building only — never the proof that a strategy works)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import attrs

from vmsnap.errors import CommandError
from vmsnap.runner import DEFAULT_TIMEOUT, CommandResult, check_argv


@attrs.define
class RecordingRunner:
    """A fake for unit tests of argument building: records argv lists and returns scripted results.

    Never use it as proof that a strategy works; it only shows which commands would run.

    :param responses: maps an argv prefix (tuple) to (exit code, stdout); the longest matching prefix wins
    """

    responses: dict[tuple[str, ...], tuple[int, str]] = attrs.Factory(dict)
    calls: list[tuple[str, ...]] = attrs.Factory(list)
    inputs: list[bytes | str | None] = attrs.Factory(list)
    programs: set[str] | None = None

    @property
    def host(self) -> str:
        return "recording"

    def run(
        self,
        argv: Sequence[str],
        *,
        ok_codes: Collection[int] = (0,),
        input: bytes | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        args = check_argv(argv)
        self.calls.append(args)
        self.inputs.append(input)
        code, out = 0, ""
        best = -1
        for prefix, response in self.responses.items():
            if args[: len(prefix)] == prefix and len(prefix) > best:
                best = len(prefix)
                code, out = response
        if code not in ok_codes:
            raise CommandError(args, code, out, "", host=self.host)
        return CommandResult(args, code, out, "", self.host)

    def which(self, name: str) -> str | None:
        if self.programs is None or name in self.programs:
            return f"/usr/bin/{name}"
        return None
