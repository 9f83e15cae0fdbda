"""Runners: argv handling and error mapping (LocalRunner runs real programs; the fake only records)."""

from __future__ import annotations

import pytest

from tests.fakes import RecordingRunner
from vmsnap.errors import CommandError, CommandTimeoutError, UsageError
from vmsnap.runner import LocalRunner, Runner, SshRunner


def test_local_runner_runs_argv_without_a_shell() -> None:
    result = LocalRunner().run(["echo", "$HOME", "a;b"])
    assert result.stdout == "$HOME a;b\n"
    assert result.exit_code == 0


def test_local_runner_feeds_stdin_and_decodes_binary() -> None:
    assert LocalRunner().run(["cat"], input=b"\xff\xfeok").stdout == "\ufffd\ufffdok"


def test_local_runner_error_carries_argv_code_and_stderr() -> None:
    with pytest.raises(CommandError) as info:
        LocalRunner().run(["sh", "-c", "echo bad thing >&2; exit 4"])
    err = info.value
    assert err.argv == ("sh", "-c", "echo bad thing >&2; exit 4")
    assert err.returncode == 4
    assert "bad thing" in err.stderr
    assert "bad thing" in str(err)
    assert err.exit_code == 1  # vmsnap's own exit status for this error


def test_local_runner_accepts_declared_codes() -> None:
    assert LocalRunner().run(["sh", "-c", "exit 2"], ok_codes=(0, 2)).exit_code == 2


def test_missing_program_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="not found"):
        LocalRunner().run(["no-such-program-vmsnap"])


def test_timeout_kills_the_command() -> None:
    with pytest.raises(CommandTimeoutError, match="ran past"):
        LocalRunner().run(["sleep", "5"], timeout=0.3)


def test_shell_strings_are_refused() -> None:
    with pytest.raises(UsageError):
        LocalRunner().run("rm -rf /")  # type: ignore[arg-type]


def test_runners_satisfy_the_protocol() -> None:
    assert isinstance(LocalRunner(), Runner)
    assert isinstance(SshRunner("h"), Runner)
    assert isinstance(RecordingRunner(), Runner)


def test_ssh_runner_quotes_once_for_the_remote_shell() -> None:
    fake = RecordingRunner()
    ssh = SshRunner("user@host", port=2222, local=fake)  # type: ignore[arg-type]
    ssh.run(["lvcreate", "-n", "snap one", "vg/lv'x"])
    argv = fake.calls[0]
    assert argv[:3] == ("ssh", "-o", "BatchMode=yes")
    assert argv[-2:] == ("--", "lvcreate -n 'snap one' 'vg/lv'\"'\"'x'")
    assert "user@host" in argv


def test_ssh_runner_refuses_option_like_destination() -> None:
    with pytest.raises(UsageError):
        SshRunner("-oProxyCommand=x").run(["true"])


def test_recording_runner_scripts_responses_by_prefix() -> None:
    fake = RecordingRunner(responses={("lvs",): (0, "x"), ("lvs", "--bad"): (5, "")})
    assert fake.run(["lvs", "vg"]).stdout == "x"
    with pytest.raises(CommandError):
        fake.run(["lvs", "--bad"])
    assert fake.calls == [("lvs", "vg"), ("lvs", "--bad")]
