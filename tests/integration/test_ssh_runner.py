"""SshRunner against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import pytest

from vmsnap.errors import CommandError
from vmsnap.runner import SshRunner


def test_runs_a_command_with_awkward_arguments(sshd: SshRunner) -> None:
    args = ["it's", "two words", "$HOME", "a;b", "*", ""]
    result = sshd.run(["printf", "%s\\n", *args])
    assert result.stdout.split("\n")[:-1] == args
    assert result.host.startswith("ssh:")


def test_stdin_reaches_the_remote_command(sshd: SshRunner) -> None:
    assert sshd.run(["cat"], input=b"hello\x00world").stdout == "hello\x00world"


def test_remote_failure_is_a_command_error_naming_the_host(sshd: SshRunner) -> None:
    with pytest.raises(CommandError) as info:
        sshd.run(["sh", "-c", "echo oops >&2; exit 3"])
    err = info.value
    assert err.returncode == 3
    assert err.host.startswith("ssh:")
    assert "oops" in str(err)
    assert sshd.run(["sh", "-c", "exit 3"], ok_codes=(3,)).exit_code == 3


def test_which_on_the_remote_host(sshd: SshRunner) -> None:
    assert sshd.which("sh")
    assert sshd.which("no-such-program-vmsnap") is None


def test_unreachable_host_says_so(sshd: SshRunner) -> None:
    bad = SshRunner("root@127.0.0.1", port=1, options={"ConnectTimeout": "2"})
    with pytest.raises(CommandError, match="255"):
        bad.run(["true"])
