"""``vmsnap schedule``: a systemd service + timer that run a job file (``vmsnap run JOBFILE``) on a calendar.

:func:`schedule_job` (``vmsnap schedule install``) checks the job file, writes ``vmsnap-<name>.service`` and
``vmsnap-<name>.timer`` into ``unit_dir`` (:func:`install`), checks them with ``systemd-analyze verify``
(:func:`verify`) and, in ``/etc/systemd/system``, runs ``systemctl daemon-reload`` and
``systemctl enable --now vmsnap-<name>.timer`` (:func:`activate`); :func:`unschedule` undoes it. The units:

- service: ``Type=oneshot``; ``ExecStart=`` the absolute path of the vmsnap executable, ``run`` and the job
  file, each word quoted and escaped for systemd (:func:`systemd_quote`: no specifier or variable is ever
  expanded, and no shell is involved); ``Nice=19``, ``IOSchedulingClass=idle``,
  ``CPUSchedulingPolicy=batch``; ``UMask=0077``;
  ``KillMode=mixed`` (a stop sends SIGTERM to vmsnap alone, which thaws and cleans up, before SIGKILL to the
  rest); ``TimeoutStartSec=infinity`` (a oneshot's start timeout would otherwise kill a long backup).
- timer: ``OnCalendar=`` (checked with ``systemd-analyze calendar`` where it exists), ``Persistent=true``
  (a run missed while the host was off happens at boot), ``RandomizedDelaySec=`` (hosts sharing a repository
  do not all start at once), ``AccuracySec=``.

No overlapping runs: while the oneshot service is still starting (running the job), the timer's next start
request joins that start job instead of starting a second run (systemd runs at most one instance of a
unit); a manual ``vmsnap run`` of the same job meanwhile fails at once on the job's lock
(:func:`vmsnap.jobs.run.job_lock`).

Unit files are 0644 like every unit in ``/etc/systemd/system`` (``systemctl cat`` and ``status`` read them as
the calling user); they hold paths, never a secret.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, UsageError, VmsnapError
from vmsnap.jobs.jobfile import load_job
from vmsnap.model import validate_name
from vmsnap.runner import CommandResult, LocalRunner, Runner

UNIT_DIR = Path("/etc/systemd/system")
UNIT_MODE = 0o644
DEFAULT_RANDOMIZED_DELAY = "30min"
DEFAULT_ACCURACY = "1min"
_TIMESPAN = re.compile(r"^[0-9]+(\.[0-9]+)?\s*(us|ms|s|sec|m|min|h|hr|d|w|M|y)?(\s*[0-9]+\s*[a-zA-Z]*)*$")


@attrs.frozen
class Units:
    """The unit files of one scheduled job."""

    name: str
    service: Path
    timer: Path

    @property
    def timer_unit(self) -> str:
        return self.timer.name


def unit_name(name: str) -> str:
    """``vmsnap-<name>`` (the name is checked: it becomes a file name and a unit name).

    :raise UsageError: it cannot
    """
    return f"vmsnap-{validate_name(name, 'schedule name')}"


def systemd_quote(argument: str, *, executable: bool = False) -> str:
    """One ExecStart= word, double-quoted, escaped as systemd reads it: ``%`` doubled everywhere (specifiers),
    ``$`` doubled in arguments (variable expansion; systemd does not expand the program's own path), ``\\``
    and ``"`` escaped in arguments (systemd refuses them in the program's path).

    :raise UsageError: a control character (a newline would end the setting), or ``"``/``\\`` in the program
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in argument):
        raise UsageError(f"{argument!r} contains a control character and cannot go in a unit file")
    if executable:
        if '"' in argument or "\\" in argument:
            raise UsageError(
                f"systemd refuses the program path {argument!r} (a quote or backslash in it)",
                hint="install vmsnap under a plainer path",
            )
        return '"' + argument.replace("%", "%%") + '"'
    escaped = argument.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def find_executable() -> Path:
    """The absolute path of the ``vmsnap`` program: beside this Python (a venv), else on ``PATH``.

    :raise UsageError: not found
    """
    beside = Path(sys.executable).parent / "vmsnap"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("vmsnap")
    if found:
        return Path(found).absolute()
    raise UsageError("cannot find the vmsnap executable", hint="install vmsnap, or pass executable=PATH")


def validate_calendar(spec: str, *, runner: Runner | None = None) -> str:
    """Check an ``OnCalendar=`` expression with ``systemd-analyze calendar``; returns its normalized form.

    Without systemd-analyze on this host only the shape is checked (one line, printable) and ``spec`` is
    returned unchanged.

    :raise UsageError: systemd-analyze refuses it, or it is empty or not one printable line
    """
    if not spec or not spec.strip() or any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise UsageError(
            f"--on-calendar {spec!r}: not a calendar expression", hint="e.g. daily or *-*-* 02:30"
        )
    runner = runner or LocalRunner()
    if runner.which("systemd-analyze") is None:
        return spec
    result = runner.run(["systemd-analyze", "calendar", "--", spec], ok_codes=range(256), timeout=30)
    if result.exit_code != 0:
        reason = (result.stderr.strip().splitlines() or ["refused"])[-1]
        raise UsageError(
            f"--on-calendar {spec!r}: {reason}",
            hint="see man systemd.time (e.g. daily, Mon..Fri 22:00, *-*-* 02:30)",
        )
    for line in result.stdout.splitlines():
        if line.strip().startswith("Normalized form:"):
            return line.split(":", 1)[1].strip()
    return spec


def _check_timespan(value: str, what: str) -> str:
    if not _TIMESPAN.match(value.strip()):
        raise UsageError(f"{what} {value!r} is not a time span", hint="e.g. 30min, 1h, 90s")
    return value.strip()


def render_service(name: str, jobfile: Path, executable: Path) -> str:
    """The service unit's text.

    :raise UsageError: a path is not absolute or cannot be written into a unit file
    """
    for path in (jobfile, executable):
        if not path.is_absolute():
            raise UsageError(f"{path} must be an absolute path in a unit file")
    exec_start = " ".join(
        [systemd_quote(str(executable), executable=True), *map(systemd_quote, ("run", str(jobfile)))]
    )
    description = f"vmsnap backup job {name}"
    return (
        "[Unit]\n"
        f"Description={description}\n"
        "Documentation=man:systemd.timer(5)\n"
        "Wants=network-online.target\n"
        "After=network-online.target libvirtd.service\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={exec_start}\n"
        "Nice=19\n"
        "IOSchedulingClass=idle\n"
        "CPUSchedulingPolicy=batch\n"
        "UMask=0077\n"
        "KillMode=mixed\n"
        "TimeoutStartSec=infinity\n"
    )


def render_timer(name: str, on_calendar: str, randomized_delay: str, accuracy: str) -> str:
    """The timer unit's text."""
    return (
        "[Unit]\n"
        f"Description=vmsnap backup job {name} ({on_calendar})\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar={on_calendar}\n"
        "Persistent=true\n"
        f"RandomizedDelaySec={randomized_delay}\n"
        f"AccuracySec={accuracy}\n"
        f"Unit={unit_name(name)}.service\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, UNIT_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), UNIT_MODE)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(
    jobfile: Path,
    on_calendar: str = "daily",
    unit_dir: Path = UNIT_DIR,
    name: str | None = None,
    *,
    executable: Path | None = None,
    randomized_delay: str = DEFAULT_RANDOMIZED_DELAY,
    accuracy: str = DEFAULT_ACCURACY,
    runner: Runner | None = None,
) -> Units:
    """Write (or replace) the service and timer of a job; does not start anything (see :func:`activate`).

    :param jobfile: the job file (made absolute; it must exist)
    :param on_calendar: the timer's ``OnCalendar=`` expression
    :param unit_dir: where the units go
    :param name: the schedule's name (default: the job file's stem); units are ``vmsnap-<name>.*``
    :param executable: the vmsnap program (default: :func:`find_executable`)
    :raise UsageError: a bad name, calendar or time span, a missing job file or unit directory
    """
    jobfile = Path(jobfile).absolute()
    if not jobfile.is_file():
        raise UsageError(f"job file {jobfile} does not exist", hint="write the job file first")
    schedule = name or jobfile.stem
    base = unit_name(schedule)
    if not unit_dir.is_dir():
        raise UsageError(f"unit directory {unit_dir} does not exist", hint="is systemd installed?")
    calendar = validate_calendar(on_calendar, runner=runner)
    delay = _check_timespan(randomized_delay, "RandomizedDelaySec")
    accuracy = _check_timespan(accuracy, "AccuracySec")
    program = executable or find_executable()
    units = Units(schedule, unit_dir / f"{base}.service", unit_dir / f"{base}.timer")
    _write(units.service, render_service(schedule, jobfile, Path(program).absolute()))
    _write(units.timer, render_timer(schedule, calendar, delay, accuracy))
    return units


def activate(units: Units, *, runner: Runner | None = None) -> None:
    """``systemctl daemon-reload`` and ``systemctl enable --now`` the timer.

    :raise CommandError: systemctl failed (no running systemd, not root)
    """
    runner = runner or LocalRunner()
    runner.run(["systemctl", "daemon-reload"], timeout=120)
    runner.run(["systemctl", "enable", "--now", units.timer_unit], timeout=120)


def remove(
    name: str, *, unit_dir: Path = UNIT_DIR, runner: Runner | None = None, deactivate: bool = False
) -> list[Path]:
    """Remove a schedule's units; with ``deactivate``, ``systemctl disable --now`` the timer first and
    reload systemd afterwards. Returns the files removed.

    :raise NotFoundError: there are no such units
    """
    base = unit_name(name)
    files = [unit_dir / f"{base}.timer", unit_dir / f"{base}.service"]
    present = [f for f in files if f.exists()]
    if not present:
        existing = sorted(p.stem.removeprefix("vmsnap-") for p in unit_dir.glob("vmsnap-*.timer"))
        raise NotFoundError(
            f"no schedule {name!r} in {unit_dir}", hint=f"schedules there: {', '.join(existing) or 'none'}"
        )
    runner = runner or LocalRunner()
    if deactivate:
        runner.run(["systemctl", "disable", "--now", f"{base}.timer"], ok_codes=(0, 1, 5), timeout=120)
    for path in present:
        path.unlink()
    if deactivate:
        runner.run(["systemctl", "daemon-reload"], timeout=120)
    return present


def verify(paths: Sequence[Path], *, runner: Runner | None = None) -> CommandResult:
    """``systemd-analyze verify --man=no`` of unit files; any warning counts as a failure.

    :raise VmsnapError: systemd-analyze is missing, or it reports a problem (its last line)
    """
    runner = runner or LocalRunner()
    if runner.which("systemd-analyze") is None:
        raise VmsnapError("systemd-analyze is not installed", hint="apt-get install systemd")
    result = runner.run(
        ["systemd-analyze", "verify", "--man=no", *[str(p) for p in paths]], ok_codes=range(256), timeout=120
    )
    problems = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    if result.exit_code != 0 or problems:
        raise VmsnapError(
            f"systemd-analyze verify: {problems[-1] if problems else f'exit code {result.exit_code}'}",
            hint="see systemd-analyze verify's output",
        )
    return result


@attrs.frozen
class Scheduled:
    """What :func:`schedule_job` did.

    :param verified: ``systemd-analyze verify`` passed (False: it is not installed here)
    :param enabled: the timer was enabled and started (units in :data:`UNIT_DIR` only)
    """

    units: Units
    on_calendar: str
    verified: bool
    enabled: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.units.name,
            "service": str(self.units.service),
            "timer": str(self.units.timer),
            "on_calendar": self.on_calendar,
            "verified": self.verified,
            "enabled": self.enabled,
        }


def schedule_job(
    jobfile: Path,
    on_calendar: str = "daily",
    *,
    name: str | None = None,
    unit_dir: Path = UNIT_DIR,
    executable: Path | None = None,
    runner: Runner | None = None,
) -> Scheduled:
    """``vmsnap schedule install``: check the job file, write its units, verify them and, in
    :data:`UNIT_DIR`, enable and start the timer. Units written elsewhere (packaging, tests) are only
    written and verified.

    :raise UsageError: the job file is wrong (as ``vmsnap run`` would say), or a bad name or calendar
    :raise VmsnapError: ``systemd-analyze verify`` refused the units (they are removed again)
    :raise CommandError: systemctl failed (no running systemd, not root)
    """
    load_job(Path(jobfile))  # a job that cannot run is not scheduled (its VMs are not contacted)
    runner = runner or LocalRunner()
    units = install(jobfile, on_calendar, unit_dir, name, executable=executable, runner=runner)
    verified = runner.which("systemd-analyze") is not None
    if verified:
        try:
            verify([units.service, units.timer], runner=runner)
        except VmsnapError:
            units.service.unlink(missing_ok=True)
            units.timer.unlink(missing_ok=True)
            raise
    enabled = unit_dir.absolute() == UNIT_DIR
    if enabled:
        activate(units, runner=runner)
    calendar = units.timer.read_text().split("OnCalendar=", 1)[1].split("\n", 1)[0]
    return Scheduled(units, calendar, verified, enabled)


def unschedule(name: str, *, unit_dir: Path = UNIT_DIR, runner: Runner | None = None) -> list[Path]:
    """``vmsnap schedule remove``: the units of schedule ``name`` (in :data:`UNIT_DIR`: the timer disabled
    and stopped first, systemd reloaded after). Returns the files removed.

    :raise NotFoundError: there is no such schedule there
    """
    return remove(name, unit_dir=unit_dir, runner=runner, deactivate=unit_dir.absolute() == UNIT_DIR)
