"""The CLI's promises in README.md ("Every command takes --json (exactly one JSON object on stdout) and
--debug; exit status 0 on success, 2 on a usage error, 1 otherwise, with one line saying what failed and what
to do"), checked for every command: through :func:`vmsnap.cli.main` in this process with file descriptors 1
and 2 captured where a test goes through every command (one interpreter start-up each cost ~13 CPU seconds
per test), and as a user runs it, a separate ``vmsnap`` process, for a command of each kind and everywhere
else; real repositories, a real QEMU and the lab guest's real qemu-ga."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningVm
from tests.integration.cli_helpers import CliResult, cli_process, vm_args, write
from vmsnap.cli import COMMANDS, build_parser, main
from vmsnap.cli.common import Command
from vmsnap.errors import UsageError
from vmsnap.lab.guest import LabGuest
from vmsnap.repo.repository import Repository
from vmsnap.vm.agent import GuestAgent

ROOT = Path(__file__).resolve().parents[2]


def leaf_commands(commands: tuple[Command, ...] = COMMANDS, prefix: tuple[str, ...] = ()) -> list[str]:
    """``"backup"``, ``"schedule install"``, …: every command line a user can run."""
    found: list[str] = []
    for command in commands:
        words = (*prefix, command.name)
        if command.subcommands:
            found += leaf_commands(command.subcommands, words)
        else:
            found.append(" ".join(words))
    return found


def failing_argv(tmp_path: Path) -> dict[str, list[str]]:
    """Per command, an invocation that fails on bad input (exit 1) or bad usage (exit 2), touching nothing."""
    missing = str(tmp_path / "missing")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    return {
        "backup": ["--repo", str(tmp_path / "r"), "--qmp", f"{missing}.qmp"],
        "restore": ["--repo", missing, "--vm", "vm1", "--to", str(tmp_path / "to")],
        "recover": ["--qmp", f"{missing}.qmp"],
        "init": ["--repo", str(a_file)],
        "list": ["--repo", missing],
        "verify": ["--repo", missing],
        "prune": ["--repo", missing, "--keep-last", "1"],
        "gc": ["--repo", missing],
        "copy": ["--from", missing, "--to", str(tmp_path / "r2")],
        "report": ["--repo", missing, "--out", str(tmp_path / "report")],
        "mount": ["--repo", missing, "--vm", "vm1", str(tmp_path)],
        "umount": [str(tmp_path)],
        "instant-restore": ["--repo", missing, "--vm", "vm1", "--to", str(tmp_path / "to")],
        "run": [f"{missing}.toml"],
        "schedule install": [f"{missing}.toml", "--unit-dir", str(tmp_path)],
        "schedule remove": ["never-installed", "--unit-dir", str(tmp_path)],
        "snapshot": ["list", "--image", f"{missing}.qcow2", "--strategy", "internal"],
        "strategies": ["--no-such-option"],
        "agent": ["--qmp", f"{missing}.qmp", "guest-ping"],
        "guest install-hooks": ["--root", str(a_file)],
        "bench": ["--runs", "0"],
        "demo": ["--no-such-option"],
    }


USAGE_FAILURES = {"bench", "run", "schedule install", "guest install-hooks"}
"""The commands whose case in :func:`failing_argv` is a usage error (exit 2): a bad option value, a job file
that cannot be read, an install root that is no directory."""


def assert_one_error(result: CliResult, code: int) -> dict[str, object]:
    """Exit status ``code``; stdout exactly one JSON object with its error; stderr ends in one line."""
    assert result.code == code, (result.code, result.err)
    lines = result.out.splitlines()
    assert len(lines) == 1, result.out
    error = json.loads(lines[0])["error"]
    assert error["exit_status"] == code and error["message"], error
    last = result.err.strip().splitlines()[-1]
    assert last.startswith(("vmsnap: error:", "vmsnap ")) and "error" in last, result.err
    assert "Traceback" not in result.err
    return dict(error)


def in_process(capfd: pytest.CaptureFixture[str], *argv: str) -> CliResult:
    """``vmsnap ARGV`` through :func:`vmsnap.cli.main` in this process, its file descriptors 1 and 2 captured
    (so what a child process or a stray ``os.write`` would print is seen too): the same parser, commands and
    error path as the console script, without one interpreter start-up per command. The tests below check
    one command of each kind as a real process as well, for what only the script adds."""
    capfd.readouterr()
    code = main(list(argv))
    captured = capfd.readouterr()
    return CliResult(code, captured.out, captured.err)


REAL_PROCESS = {"backup", "run", "schedule install"}
"""The commands also run as a separate ``vmsnap`` process below: a failure (exit 1), a usage error found by
a command (exit 2), and a command under a group."""


def test_every_command_takes_json_and_prints_one_object_also_when_it_fails(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cases = failing_argv(tmp_path)
    assert sorted(cases) == sorted(leaf_commands()), "a command without a case here"
    for command, argv in cases.items():
        result = in_process(capfd, *command.split(), *argv, "--json")
        if command in REAL_PROCESS:
            assert cli_process(*command.split(), *argv, "--json") == result, command
        code = 2 if "--no-such-option" in argv or command in USAGE_FAILURES else 1
        error = assert_one_error(result, code)
        assert "--json" not in str(error["message"]), command  # --json is known to every command
        assert list(tmp_path.iterdir()) == [tmp_path / "a-file"], command  # nothing was made


def test_usage_errors_in_json_mode(tmp_path: Path) -> None:
    # an unknown command, a missing required option, a bad value: exit 2, one JSON object
    for argv in (["no-such-command"], ["backup"], ["gc", "--repo", str(tmp_path), "--wait", "soon"]):
        error = assert_one_error(cli_process(*argv, "--json"), 2)
        assert "vmsnap" in str(error["message"])
    # without --json nothing is printed on stdout
    plain = cli_process("backup")
    assert (plain.code, plain.out) == (2, "")


def test_every_command_of_the_readme_has_an_example_in_its_help(capfd: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("`vmsnap COMMAND --help` shows an")[1].split("```")[1]
    listed: set[str] = set()
    for line in block.splitlines():  # "vmsnap list | verify | prune", "vmsnap run JOBFILE | schedule …"
        tokens = line.split("  ")[0].split()[1:]
        listed |= {t for i, t in enumerate(tokens) if i == 0 or tokens[i - 1] == "|"}
    assert listed == {c.name for c in COMMANDS}
    for command in leaf_commands():
        result = in_process(capfd, *command.split(), "--help")
        if command in REAL_PROCESS:
            assert cli_process(*command.split(), "--help") == result, command
        assert result.code == 0 and "example" in result.out and f"vmsnap {command}" in result.out, command


def test_init_takes_its_key_file_from_vmsnap_key_file(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    """README/docs: the key is ``--key-file`` or ``VMSNAP_KEY_FILE``, for every command, init included."""
    repo, key, out = tmp_path / "repo", tmp_path / "repo.key", tmp_path / "out"
    env = {"VMSNAP_KEY_FILE": str(key)}
    made = cli_process("init", "--repo", repo, "--encrypt", "--json", env=env)
    assert made.code == 0, made.err
    assert made.json() == {"repo": str(repo), "layout": "chunks", "encrypted": True, "key_file": str(key)}
    assert key.stat().st_mode & 0o777 == 0o600
    write(two_disk_vm, "disk0", "write -P 0x5a 1M 3M")
    backup = cli_process("backup", "--repo", repo, *vm_args(two_disk_vm), "--json", env=env)
    assert backup.code == 0, backup.err
    keyless = cli_process("list", "--repo", repo, "--json", env={"VMSNAP_KEY_FILE": ""})
    assert keyless.code != 0 and "key" in json.loads(keyless.out)["error"]["message"] + keyless.err
    restored = cli_process("restore", "--repo", repo, "--vm", "testvm", "--to", out, "--json", env=env)
    assert restored.code == 0, restored.err
    data = subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 1M 3M",
            "-c",
            "read -P 0 0 1M",
            str(out / "disk0.qcow2"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Pattern verification failed" not in data.stdout, data.stdout


def test_gc_refuses_a_wait_that_is_no_duration(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    """``gc --wait nan`` (nan compares false with every deadline: gc would wait for ever while a backup ran)
    and ``--wait inf``: exit 2, one line, nothing deleted; the library refuses them too."""
    repo = tmp_path / "repo"
    write(two_disk_vm, "disk0", "write -P 0x11 0 8M")
    assert cli_process("backup", "--repo", repo, *vm_args(two_disk_vm)).code == 0
    assert cli_process("prune", "--repo", repo, "--keep-last", "1").code == 0
    chunks = sorted(p for p in (repo / "chunks").rglob("*") if p.is_file())
    for wait in ("nan", "inf", "-1"):
        result = cli_process("gc", "--repo", repo, "--wait", wait, "--json")
        error = assert_one_error(result, 2)
        assert "--wait" in str(error["message"])
    assert sorted(p for p in (repo / "chunks").rglob("*") if p.is_file()) == chunks
    with pytest.raises(UsageError, match="gc wait nan"):
        Repository.open(repo).gc(wait=float("nan"))


@pytest.mark.guest
def test_agent_as_the_readme_shows_it(lab_guest: LabGuest) -> None:
    """``vmsnap agent VM guest-fsfreeze-status``; a timeout that is no duration is one line, exit 2."""
    vm = ["--qmp", str(lab_guest.qmp_socket), "--agent", str(lab_guest.agent_socket)]
    lab_guest.machine.close()  # QEMU serves its QMP socket to one client at a time
    status = cli_process("agent", *vm, "guest-fsfreeze-status")
    assert status.code == 0, status.err
    assert json.loads(status.out) == {"return": "thawed"}
    same = cli_process("agent", *vm, "guest-fsfreeze-status", "--json")
    assert (same.code, same.out) == (0, status.out)
    info = cli_process("agent", *vm, "guest-get-fsinfo", "--timeout", "20")
    assert info.code == 0 and any(fs["mountpoint"] == "/mnt/data" for fs in json.loads(info.out)["return"])
    for timeout in ("inf", "nan", "0"):
        refused = cli_process("agent", *vm, "guest-ping", "--timeout", timeout)
        assert (refused.code, refused.out) == (2, ""), refused.err
        (line,) = refused.err.strip().splitlines()[-1:]
        assert "--timeout" in line and "Traceback" not in refused.err
        assert_one_error(cli_process("agent", *vm, "guest-ping", "--timeout", timeout, "--json"), 2)
    agent = GuestAgent.from_socket(lab_guest.agent_socket)
    try:
        with pytest.raises(UsageError, match="agent timeout inf"):
            agent.execute("guest-ping", timeout=float("inf"))
        agent.ping()  # the channel still works
    finally:
        agent.close()


def test_debug_shows_the_library_log_before_or_after_the_command(tmp_path: Path) -> None:
    """--debug: every command vmsnap runs, the whole output of one that failed, and the traceback."""
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    for argv in (
        ["--debug", "snapshot", "list", "--image", str(image), "--strategy", "internal"],
        ["snapshot", "list", "--image", str(image), "--strategy", "internal", "--debug"],
    ):
        result = cli_process(*argv)
        assert result.code == 0, result.err
        assert re.search(
            r"^vmsnap: debug: vmsnap\.runner: run: qemu-img .*" + re.escape(str(image)), result.err, re.M
        )
    quiet = cli_process("snapshot", "list", "--image", str(image), "--strategy", "internal")
    assert quiet.code == 0 and "debug" not in quiet.err
    broken = tmp_path / "broken.qcow2"  # a qcow2 header cut short: qemu-img cannot open it
    header = bytearray(512)
    header[0:8] = b"QFI\xfb\x00\x00\x00\x03"
    header[20:24], header[24:32] = (16).to_bytes(4, "big"), (1 << 20).to_bytes(8, "big")
    broken.write_bytes(header)
    failed = cli_process("--debug", "snapshot", "list", "--image", str(broken), "--strategy", "internal")
    assert failed.code == 1
    assert "--- stderr ---" in failed.err and "Traceback" in failed.err
    assert failed.err.strip().splitlines()[-1].startswith("vmsnap: error:")
    plain = cli_process("snapshot", "list", "--image", str(broken), "--strategy", "internal")
    assert plain.code == 1 and len(plain.err.strip().splitlines()) == 1, plain.err


def test_every_command_accepts_debug_after_its_name() -> None:
    parser = build_parser()
    for command in leaf_commands():
        words = command.split()
        sub = parser
        for word in words:
            action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = action.choices[word]
        assert any("--debug" in a.option_strings for a in sub._actions), command
        assert any("--json" in a.option_strings for a in sub._actions), command
