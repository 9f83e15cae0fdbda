"""systemd units of a scheduled job, checked by the real systemd-analyze (no running systemd needed: verify
loads the unit files given on its command line; a broken unit is shown to fail, so a pass means something)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmsnap.errors import UsageError, VmsnapError
from vmsnap.jobs.schedule import install, systemd_quote, validate_calendar, verify


@pytest.fixture(autouse=True)
def systemd_analyze() -> None:
    """Every test here needs the real systemd-analyze: a machine without it fails them, naming the package."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (scripts/packages.d/jobs.txt)")


def awkward_program(tmp_path: Path) -> Path:
    """An executable whose path needs quoting and escaping in ExecStart= (space, %, $)."""
    directory = tmp_path / "bin dir %n $HOME"
    directory.mkdir()
    program = directory / "vmsnap"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return program


def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units_dir = tmp_path / "units"
    units_dir.mkdir()
    job = tmp_path / 'jobs %i $USER "q"' / "nightly.toml"
    job.parent.mkdir()
    job.write_text('repository = "/backups"\n')
    units = install(job, "Mon..Fri 22:00", units_dir, executable=awkward_program(tmp_path))
    assert units.service.name == "vmsnap-nightly.service" and units.timer.name == "vmsnap-nightly.timer"
    assert units.service.stat().st_mode & 0o777 == 0o644
    service = units.service.read_text()
    assert "Type=oneshot\n" in service and "IOSchedulingClass=idle\n" in service and "Nice=19\n" in service
    assert '"run"' in service and 'jobs %%i $$USER \\"q\\"' in service and "dir %%n $HOME/" in service
    timer = units.timer.read_text()
    assert "OnCalendar=Mon..Fri *-*-* 22:00:00\n" in timer  # normalized by systemd-analyze calendar
    assert (
        "Persistent=true\n" in timer
        and "RandomizedDelaySec=30min\n" in timer
        and "AccuracySec=1min\n" in timer
    )
    # verify resolves ExecStart's program: it passes only if systemd unquoted our path to the real file
    verify([units.service, units.timer])


def test_verify_fails_on_a_broken_unit_here(tmp_path: Path) -> None:
    job = tmp_path / "j.toml"
    job.write_text("")
    units = install(job, "daily", tmp_path, executable=tmp_path / "missing" / "vmsnap")
    with pytest.raises(VmsnapError, match="not executable"):
        verify([units.service])
    broken = tmp_path / "vmsnap-bad.timer"
    broken.write_text("[Timer]\nOnCalendar=daily\nPersistant=true\n")
    with pytest.raises(VmsnapError, match="Persistant"):
        verify([broken])


def test_calendar_is_checked_by_systemd() -> None:
    assert validate_calendar("daily") == "*-*-* 00:00:00"
    with pytest.raises(UsageError, match="every other tuesday"):
        validate_calendar("every other tuesday")
    with pytest.raises(UsageError):
        validate_calendar("daily\nExecStart=/bin/evil")


def test_names_and_paths_that_cannot_go_in_a_unit(tmp_path: Path) -> None:
    job = tmp_path / "j.toml"
    job.write_text("")
    with pytest.raises(UsageError, match="schedule name"):
        install(job, "daily", tmp_path, name="../etc/x", executable=Path("/bin/true"))
    with pytest.raises(UsageError, match="control character"):
        systemd_quote("a\nb")
    with pytest.raises(UsageError, match="program path"):
        systemd_quote('/opt/"x"/vmsnap', executable=True)
    with pytest.raises(UsageError, match="does not exist"):
        install(tmp_path / "missing.toml", "daily", tmp_path, executable=Path("/bin/true"))
    with pytest.raises(UsageError, match="time span"):
        install(job, "daily", tmp_path, executable=Path("/bin/true"), randomized_delay="soon")
