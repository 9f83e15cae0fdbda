"""``vmsnap report``: a static HTML page about a repository (:mod:`vmsnap.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vmsnap.cli.common import Command, add_key_option, add_repo_option, emit
from vmsnap.report.page import write_report


def cmd_report(args: argparse.Namespace) -> int:
    """Write OUT/index.html (charts and screenshots beside it) about the repository."""
    result = write_report(args.repo, args.out, key_file=args.key_file, metrics=args.metrics)
    human = (
        f"wrote {result.page} ({len(result.vms)} VM(s), {len(result.images)} images); "
        f"open it in a browser: file://{result.page.resolve()}"
    )
    emit(args, result.to_json(), human)
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where index.html goes")
    parser.add_argument(
        "--metrics", type=Path, metavar="FILE", help="a job's metrics file (.prom): its last run per VM too"
    )
    add_key_option(parser)


COMMANDS = (
    Command(
        "report",
        "write a static HTML page about a repository: backups, cost, boot verdicts, growth (no server)",
        "vmsnap report --repo /backups --metrics /var/lib/prometheus/node-exporter/vmsnap-nightly.prom "
        "--out /srv/www/vmsnap",
        cmd_report,
        _report_arguments,
    ),
)
"""The report command."""
