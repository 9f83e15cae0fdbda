"""The ``vmsnap`` command: parse arguments into frozen config, call the library, print the outcome.

This package is the only part of vmsnap that prints. Exit status: 0 success, 2 usage error, 1 any other
failure, with one line saying what failed and what to do (``--debug`` adds the traceback). ``--json`` prints
one JSON object.

Each command module (:mod:`~vmsnap.cli.repository`, :mod:`~vmsnap.cli.restore`, :mod:`~vmsnap.cli.upkeep`,
:mod:`~vmsnap.cli.jobs`, :mod:`~vmsnap.cli.snapshots`, :mod:`~vmsnap.cli.tools`) holds its command functions
and a ``COMMANDS`` tuple of :class:`~vmsnap.cli.common.Command`; a new module is registered by adding its
``COMMANDS`` to :data:`COMMANDS` below.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from vmsnap import __version__
from vmsnap.cli import jobs, report, repository, restore, snapshots, tools, upkeep
from vmsnap.cli.common import Command
from vmsnap.errors import VmsnapError

COMMANDS: tuple[Command, ...] = (
    *repository.COMMANDS,
    *upkeep.COMMANDS,
    *report.COMMANDS,
    *restore.COMMANDS,
    *jobs.COMMANDS,
    *snapshots.COMMANDS,
    *tools.COMMANDS,
)
"""Every command, in the order ``vmsnap --help`` lists them: one entry per command module."""

EPILOG = """examples:
  vmsnap backup --repo /backups --qmp /run/vm1.qmp --agent /run/vm1.qga
  vmsnap backup --repo /backups --domain web1 --incremental
  vmsnap restore --repo /backups --vm web1 --to /restore
  vmsnap mount --repo /backups --vm web1 --disk vda /mnt/web1
  vmsnap backup --repo /backups --host root@hv2 --qmp /run/qemu/db.qmp
  vmsnap run /etc/vmsnap/nightly.toml
  vmsnap strategies
"""


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The full argument parser (every command has an example in its --help)."""
    parser = argparse.ArgumentParser(
        prog="vmsnap",
        description="Consistent backups of QEMU/KVM virtual machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmsnap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    for command in commands:
        command.add_to(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsnap`` console script.

    :param argv: the arguments (default: the process's)
    :return: the exit status: 0 success, 1 failure, 2 usage error, 130 interrupted
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except VmsnapError as err:
        if debug:
            traceback.print_exc()
        print(f"vmsnap: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the library wraps what it expects; this is the net for the rest (disk full …)
        if debug:
            traceback.print_exc()
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"vmsnap: error: {err.strerror or err}{where} — nothing was lost; fix that and retry",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("vmsnap: interrupted", file=sys.stderr)
        return 130
