"""Scheduling's argument building: what ``activate`` asks systemctl (recorded, not run) and what ``remove``
takes away; the units themselves are checked by the real systemd-analyze in
tests/integration/test_job_schedule.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import RecordingRunner
from vmsnap.errors import NotFoundError
from vmsnap.jobs.schedule import activate, install, remove


def test_remove_and_activate(tmp_path: Path) -> None:
    job = tmp_path / "web.toml"
    job.write_text("")
    units = install(job, "hourly", tmp_path, executable=Path("/bin/true"))
    recorder = RecordingRunner()
    activate(units, runner=recorder)
    assert recorder.calls == [
        ("systemctl", "daemon-reload"),
        ("systemctl", "enable", "--now", "vmsnap-web.timer"),
    ]
    with pytest.raises(NotFoundError, match="schedules there: web"):
        remove("db", unit_dir=tmp_path)
    assert remove("web", unit_dir=tmp_path) == [units.timer, units.service]
    assert not units.timer.exists() and not units.service.exists()
