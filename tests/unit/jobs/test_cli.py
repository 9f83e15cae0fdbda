"""The job commands' arguments and what a bad job file does to `vmsnap run` (the runs themselves:
tests/integration/test_jobs.py and tests/integration/libvirt/test_job_domains.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsnap.cli import build_parser, main
from vmsnap.vm.hosts import HostSpec


def test_run_and_schedule_arguments() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "/etc/vmsnap/nightly.toml", "--dry-run", "--json"])
    assert (args.jobfile, args.dry_run, args.json) == (Path("/etc/vmsnap/nightly.toml"), True, True)
    args = parser.parse_args(["schedule", "install", "n.toml", "--on-calendar", "Mon..Fri 22:00"])
    assert (args.on_calendar, args.name, args.unit_dir) == (
        "Mon..Fri 22:00",
        None,
        Path("/etc/systemd/system"),
    )
    args = parser.parse_args(["schedule", "remove", "nightly", "--unit-dir", "units"])
    assert (args.name, args.unit_dir) == ("nightly", Path("units"))


@pytest.mark.parametrize("command", ["backup --repo /r", "recover", "snapshot list --strategy internal"])
def test_every_vm_selector_takes_a_host(command: str) -> None:
    from vmsnap.cli.common import machine_spec

    args = build_parser().parse_args([*command.split(), "--host", "root@hv2", "--qmp", "/run/db.qmp"])
    assert machine_spec(args).host == HostSpec("hv2", "root")


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["run"], ["schedule", "install"], ["schedule", "remove"], ["backup"]):
        assert main([*command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "example" in out and f"vmsnap {command[0]}" in out
    assert main(["backup", "--help"]) == 0
    assert "--host root@hv2 --qmp /run/qemu/" in capsys.readouterr().out


def test_a_bad_job_file_is_one_line_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "nightly.toml"
    job.write_text('repository = "/backups"\ngc = "weekly"\n[[vm]]\nqmp = "/run/a.qmp"\n')
    for argv in (["run", str(job)], ["run", str(job), "--dry-run", "--json"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"vmsnap: error: job file {job}, line 2: gc must be true or false")
        if "--json" in argv:  # the same error as the one JSON object on stdout
            error = json.loads(captured.out)["error"]
            assert error["exit_status"] == 2 and error["message"].startswith(f"job file {job}, line 2")
        else:
            assert captured.out == ""
    assert main(["schedule", "install", str(job), "--unit-dir", str(tmp_path)]) == 2  # not scheduled
    assert "line 2" in capsys.readouterr().err and list(tmp_path.glob("*.timer")) == []


def test_a_dry_run_of_vms_that_are_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "j.toml"
    job.write_text(f'repository = "{tmp_path / "repo"}"\nmetrics = false\n[[vm]]\nqmp = "{tmp_path}/a.qmp"\n')
    assert main(["run", str(job), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "would back up 0 of 1 VMs" in out and f"{tmp_path}/a.qmp does not exist" in out
    assert not (tmp_path / "repo").exists()
