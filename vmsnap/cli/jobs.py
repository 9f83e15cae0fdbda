"""The backup-job commands: ``run`` (one job file: every VM, retention, gc, report, metrics, hook) and
``schedule install|remove`` (its systemd service and timer). The job file format is
:mod:`vmsnap.jobs.jobfile`; what a run does is :mod:`vmsnap.jobs.run`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vmsnap.cli.common import Command, emit, sigterm_interrupts
from vmsnap.jobs.default import run_job_file
from vmsnap.jobs.schedule import UNIT_DIR, schedule_job, unschedule

# -- run ----------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job file; exit status 0 when every VM (and gc, and the metrics) succeeded, else 1."""
    with sigterm_interrupts():  # systemd stops a run with SIGTERM: running backups are undone, none starts
        report = run_job_file(args.jobfile, dry_run=args.dry_run)
    emit(args, report.to_json(), report.summary())
    return report.exit_status


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobfile", type=Path, metavar="JOBFILE", help="the job file (TOML; docs/jobs.md)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="touch nothing: say which VMs, full or incremental, and what retention would remove",
    )


# -- schedule -----------------------------------------------------------------------------------------------


def cmd_schedule_install(args: argparse.Namespace) -> int:
    """Write (and in /etc/systemd/system enable) the service and timer that run a job file."""
    done = schedule_job(args.jobfile, args.on_calendar, name=args.name, unit_dir=args.unit_dir)
    units = done.units
    lines = [
        f"wrote {units.service} and {units.timer} (OnCalendar={done.on_calendar})"
        + (", checked by systemd-analyze verify" if done.verified else "")
    ]
    if done.enabled:
        lines.append(f"enabled and started {units.timer_unit}: `systemctl list-timers {units.timer_unit}`")
    else:
        lines.append(
            f"systemd does not read {args.unit_dir}: copy both units to {UNIT_DIR} and run "
            f"`systemctl enable --now {units.timer_unit}` (or install without --unit-dir)"
        )
    emit(args, done.to_json(), "\n".join(lines))
    return 0


def _install_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobfile", type=Path, metavar="JOBFILE", help="the job file to run")
    parser.add_argument(
        "--on-calendar",
        default="daily",
        metavar="WHEN",
        help="systemd calendar expression: daily, Mon..Fri 22:00, *-*-* 01:30 (default: daily)",
    )
    parser.add_argument(
        "--name", help="the schedule's name: units vmsnap-NAME.* (default: the job file's stem)"
    )
    _unit_dir_argument(parser)


def _unit_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unit-dir",
        type=Path,
        default=UNIT_DIR,
        metavar="DIR",
        help=f"where the units go (default {UNIT_DIR}, where the timer is also enabled; elsewhere they "
        "are only written)",
    )


def cmd_schedule_remove(args: argparse.Namespace) -> int:
    """Stop, disable and remove a schedule's timer and service."""
    removed = unschedule(args.name, unit_dir=args.unit_dir)
    emit(
        args,
        {"name": args.name, "removed": [str(p) for p in removed]},
        "\n".join(f"removed {p}" for p in removed),
    )
    return 0


def _remove_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the schedule's name (vmsnap-NAME.timer)")
    _unit_dir_argument(parser)


COMMANDS = (
    Command(
        "run",
        "run a backup job file: every VM in it (here and on other hosts), retention, report, metrics",
        "vmsnap run /etc/vmsnap/nightly.toml",
        cmd_run,
        _run_arguments,
        description="Back up every VM a job file names (concurrency at once; one VM failing stops no "
        "other), prune each after its backup, collect garbage when the file says gc = true, run "
        "on_failure when anything failed, write the Prometheus text file. Exit status 0 when everything "
        "succeeded, 1 otherwise, 2 for a mistake in the job file (one line naming the key and its line).",
        more_examples=("vmsnap run /etc/vmsnap/nightly.toml --dry-run", "vmsnap run nightly.toml --json"),
    ),
    Command(
        "schedule",
        "run a job file from a systemd timer",
        'vmsnap schedule install /etc/vmsnap/nightly.toml --on-calendar "*-*-* 01:30"',
        None,
        json_option=False,
        subcommands=(
            Command(
                "install",
                "write vmsnap-NAME.service and .timer for a job file (checked), enable and start the timer",
                'vmsnap schedule install /etc/vmsnap/nightly.toml --on-calendar "*-*-* 01:30"',
                cmd_schedule_install,
                _install_arguments,
                description="Write a oneshot service running `vmsnap run JOBFILE` (idle IO, nice, no "
                "overlapping runs) and a timer (Persistent=true, RandomizedDelaySec=30min), both checked "
                "by systemd-analyze verify; in /etc/systemd/system the timer is enabled and started.",
                more_examples=("vmsnap schedule install web.toml --on-calendar daily --unit-dir ./units",),
            ),
            Command(
                "remove",
                "stop, disable and remove a schedule's timer and service",
                "vmsnap schedule remove nightly",
                cmd_schedule_remove,
                _remove_arguments,
            ),
        ),
    ),
)
"""The job commands, in the order ``vmsnap --help`` lists them."""
