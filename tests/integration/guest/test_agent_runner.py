"""AgentRunner: argv lists run inside the real lab guest through guest-exec."""

from __future__ import annotations

import pytest

from vmsnap.errors import CommandError, CommandTimeoutError, UsageError
from vmsnap.lab.guest import LabGuest
from vmsnap.runner import Runner

pytestmark = pytest.mark.guest


def test_runs_argv_lists_with_stdin_and_output(lab_guest: LabGuest) -> None:
    runner = lab_guest.runner
    assert isinstance(runner, Runner)
    assert runner.host == "guest:labvm"
    result = runner.run(["sha256sum"], input=b"vmsnap\n")
    assert result.stdout.split()[0] == "d25fe30817bb9f32248febce5a69d0a83aa5c6bd20a18484847417bee7eb7708"
    argument = "two words; $(not expanded)"
    assert runner.run(["printf", "%s", argument]).stdout == argument  # no shell in between


def test_exit_codes_and_stderr_are_reported(lab_guest: LabGuest) -> None:
    runner = lab_guest.runner
    with pytest.raises(CommandError) as info:
        runner.run(["sh", "-c", "echo broken >&2; exit 3"])
    assert info.value.returncode == 3
    assert info.value.host == "guest:labvm"
    assert "broken" in str(info.value)
    assert runner.run(["sh", "-c", "exit 3"], ok_codes=(0, 3)).exit_code == 3


def test_a_missing_program_and_a_shell_string_are_clear_errors(lab_guest: LabGuest) -> None:
    with pytest.raises(CommandError) as info:
        lab_guest.runner.run(["no-such-program"])
    assert info.value.returncode == 127
    with pytest.raises(UsageError):
        lab_guest.runner.run("ls /")  # type: ignore[arg-type]


def test_a_command_past_its_timeout_is_killed(lab_guest: LabGuest) -> None:
    with pytest.raises(CommandTimeoutError, match="guest:labvm"):
        lab_guest.runner.run(["sleep", "30"], timeout=0.5)
    assert "sleep 30" not in lab_guest.runner.run(["ps"]).stdout


def test_which_finds_the_guest_tools(lab_guest: LabGuest) -> None:
    for program in ("lvcreate", "dmsetup", "mke2fs", "fsfreeze"):
        assert lab_guest.runner.which(program) is not None
    assert lab_guest.runner.which("no-such-program") is None
