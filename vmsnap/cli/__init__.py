"""The ``vmsnap`` command: parse arguments into frozen config, call the library, print the outcome.

This package is the only part of vmsnap that prints. Exit status: 0 success, 2 usage error, 1 any other
failure (any exception, not only vmsnap's own), with one line saying what failed and what to do;
``--debug`` adds vmsnap's log (every command run, a failed one's output) and the traceback. ``--json``
prints exactly one JSON object on stdout, also on failure (with an ``"error"`` member) and for usage errors.

Each command module (:mod:`~vmsnap.cli.repository`, :mod:`~vmsnap.cli.restore`, :mod:`~vmsnap.cli.upkeep`,
:mod:`~vmsnap.cli.jobs`, :mod:`~vmsnap.cli.snapshots`, :mod:`~vmsnap.cli.tools`) holds its command functions
and a ``COMMANDS`` tuple of :class:`~vmsnap.cli.common.Command`; a new module is registered by adding its
``COMMANDS`` to :data:`COMMANDS` below.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import typing
from collections.abc import Sequence
from typing import NoReturn

from vmsnap import __version__
from vmsnap.cli import jobs, report, repository, restore, snapshots, tools, upkeep
from vmsnap.cli.common import JSON_PAYLOAD, Command, print_json
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


class _Parser(argparse.ArgumentParser):
    """argparse's parser, remembering its usage error so that ``--json`` can report it as JSON too."""

    usage_error: str | None = None

    def error(self, message: str) -> NoReturn:
        _Parser.usage_error = f"{self.prog}: {message}"
        super().error(message)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The full argument parser (every command has an example in its --help)."""
    parser = _Parser(
        prog="vmsnap",
        description="Consistent backups of QEMU/KVM virtual machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmsnap {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show vmsnap's log (commands run, their output) and tracebacks"
    )
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    for command in commands:
        command.add_to(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _failure(err: BaseException) -> tuple[str, str, int]:
    """(message, hint, exit status) of an exception that ended a command."""
    if isinstance(err, VmsnapError):
        return err.message, err.hint, err.exit_code
    if isinstance(err, OSError):  # the library wraps what it expects; this is the net for the rest
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}", "fix that and retry", 1
    return (
        f"unexpected {type(err).__name__}: {err}",
        "this is a bug in vmsnap: run the command again with --debug and report what it prints",
        1,
    )


def _start_debug_log() -> None:
    """--debug: vmsnap's own log (every command it runs, how it ended) on stderr. Other libraries stay at
    warnings: botocore's debug log prints request headers (access key id, session token)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmsnap: debug: %(name)s: %(message)s"))
    logger = logging.getLogger("vmsnap")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsnap`` console script.

    With ``--json`` stdout gets exactly one JSON object, also when the command fails: then it has an
    ``"error"`` member (``message``, ``hint``, ``exit_status``) beside whatever the command had to report.

    :param argv: the arguments (default: the process's)
    :return: the exit status: 0 success, 1 failure, 2 usage error, 130 interrupted
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _Parser.usage_error = None
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit:
        code = int(exit.code or 0)
        if code != 0 and "--json" in arguments:
            message = _Parser.usage_error or "invalid arguments"
            print_json({"error": {"message": message, "hint": "see --help", "exit_status": code}})
        return code
    debug = bool(getattr(args, "debug", False))
    if debug:
        _start_debug_log()
    try:
        status = int(args.func(args))
        error: dict[str, object] | None = None
    except KeyboardInterrupt:
        print("vmsnap: interrupted", file=sys.stderr)
        status = 130
        error = {"message": "interrupted", "hint": "", "exit_status": status}
    except Exception as err:  # every failure ends in one line (the traceback only with --debug)
        if debug:
            traceback.print_exc()
        message, hint, status = _failure(err)
        line = _one_line(f"{message} — {hint}" if hint else message)
        print(f"vmsnap: error: {line}", file=sys.stderr)
        error = {"message": _one_line(message), "hint": _one_line(hint), "exit_status": status}
    if getattr(args, "json", False):
        payload = dict(getattr(args, JSON_PAYLOAD, None) or {})
        if error is not None:
            payload["error"] = error
        print_json(payload)
    return status


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
