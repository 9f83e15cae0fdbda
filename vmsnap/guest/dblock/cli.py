"""The ``vmsnap-dblock`` command line: ``freeze``, ``thaw`` and ``status``, as the fsfreeze hook runs them.

Exit status 0 on success, 1 on failure, 2 on a usage error; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vmsnap.errors import VmsnapError
from vmsnap.guest.dblock.client import freeze, status, thaw
from vmsnap.guest.dblock.config import (
    DEFAULT_LOCK_WAIT,
    DEFAULT_OPTION_FILE,
    DEFAULT_RUN_DIR,
    DEFAULT_SAFETY_TIMEOUT,
    HolderSettings,
)
from vmsnap.guest.dblock.option_file import OptionFile, read_option_file


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``vmsnap-dblock``."""
    parser = argparse.ArgumentParser(
        prog="vmsnap-dblock",
        description="Hold a MariaDB/MySQL global read lock from fsfreeze to thaw (run by the fsfreeze hook).",
        epilog="example:\n  vmsnap-dblock freeze --config /etc/vmsnap/dblock.cnf\n  vmsnap-dblock thaw",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help in (
        ("freeze", "take the lock; returns once it is held"),
        ("thaw", "release the lock; fails if it had ended early"),
        ("status", "say whether a holder holds the lock"),
    ):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--run-dir",
            type=Path,
            default=DEFAULT_RUN_DIR,
            help=f"the holder's socket directory (default {DEFAULT_RUN_DIR})",
        )
        if name == "freeze":
            p.add_argument(
                "--config",
                type=Path,
                default=DEFAULT_OPTION_FILE,
                help=f"MySQL option file with the credentials, mode 0600 (default {DEFAULT_OPTION_FILE})",
            )
            p.add_argument(
                "--safety-timeout",
                type=float,
                help="release the lock after this many seconds without thaw "
                f"(default {DEFAULT_SAFETY_TIMEOUT:g})",
            )
            p.add_argument(
                "--lock-wait",
                type=float,
                help=f"seconds the server may wait for the lock (default {DEFAULT_LOCK_WAIT:g})",
            )
    return parser


def _settings(args: argparse.Namespace) -> tuple[HolderSettings, OptionFile]:
    options = read_option_file(args.config)
    safety = args.safety_timeout if args.safety_timeout is not None else options.safety_timeout
    wait = args.lock_wait if args.lock_wait is not None else options.lock_wait
    settings = HolderSettings(
        option_file=args.config,
        run_dir=args.run_dir,
        safety_timeout=DEFAULT_SAFETY_TIMEOUT if safety is None else safety,
        lock_wait=DEFAULT_LOCK_WAIT if wait is None else wait,
    )
    return settings, options


def _run(args: argparse.Namespace) -> None:
    """Do ``args.action`` and print what happened.

    :raise VmsnapError: it failed (see :func:`freeze`, :func:`thaw`, :func:`status`)
    """
    if args.action == "freeze":
        settings, options = _settings(args)
        info = freeze(settings, options)
        print(
            f"vmsnap-dblock: global read lock held (holder pid {info.pid}, "
            f"connection {info.connection_id}); released on thaw or after {settings.safety_timeout:g} s"
        )
    elif args.action == "thaw":
        result = thaw(args.run_dir)
        if result.released:
            print(f"vmsnap-dblock: lock released after {result.held_seconds:.3f} s")
        else:
            print("vmsnap-dblock: nothing to thaw")
    else:
        current = status(args.run_dir)
        if current is None:
            print("vmsnap-dblock: not locked")
        else:
            print(
                f"vmsnap-dblock: locked for {current.held_seconds:.3f} s by pid {current.pid} "
                f"(connection {current.connection_id})"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsnap-dblock`` console script: 0 success, 1 failure, 2 usage error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        _run(args)
    except VmsnapError as err:
        print(f"vmsnap-dblock: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
