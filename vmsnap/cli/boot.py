"""``vmsnap verify --boot``: boot a backup on throwaway overlays and judge it (:mod:`vmsnap.verify_boot`).

:mod:`vmsnap.cli.upkeep`'s ``verify`` hands its arguments here when ``--boot`` is given; the options are
added there by :func:`add_boot_arguments`.
"""

from __future__ import annotations

import argparse

from vmsnap.cli.common import emit, note, positive_seconds, sigterm_interrupts
from vmsnap.cli.restore import run_root
from vmsnap.errors import RepositoryError, UsageError, VmsnapError
from vmsnap.verify_boot.result import BootResult
from vmsnap.verify_boot.run import DEFAULT_TIMEOUT, BootConfig, verify_boot

BOOT_OPTIONS = ("check", "port", "timeout")


class BootFailedError(VmsnapError):
    """The backup was booted and did not pass (its result is kept beside it)."""


def add_boot_arguments(parser: argparse.ArgumentParser) -> None:
    """``--boot`` and the options that go with it."""
    group = parser.add_argument_group("boot verification (--boot)")
    group.add_argument(
        "--boot",
        action="store_true",
        help="boot the backup (--vm, --backup, default the latest) on throwaway overlays, with no network, "
        "and keep the verdict beside it",
    )
    group.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="CMD",
        help="a command run in the guest through its agent; it must exit 0 (repeat)",
    )
    group.add_argument(
        "--port",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="a guest TCP port that must answer, probed from the host (repeat)",
    )
    group.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="S",
        help=f"seconds the guest agent has to answer (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument("--connect", metavar="URI", help="libvirt URI the copy of a domain runs under")


def check_boot_options(args: argparse.Namespace) -> None:
    """:raise UsageError: a boot option without ``--boot``"""
    given = [f"--{o}" for o in BOOT_OPTIONS if getattr(args, o) not in (None, [])]
    if args.connect is not None:
        given.append("--connect")
    if given and not args.boot:
        verb = "goes" if len(given) == 1 else "go"
        raise UsageError(f"{', '.join(given)} {verb} with --boot", hint="add --boot to boot the backup")


def cmd_verify_boot(args: argparse.Namespace) -> int:
    """Boot one backup and judge it; exit 1 naming why when it did not pass."""
    if args.vm is None:
        raise UsageError("--boot needs --vm (and --backup ID for one but the latest)")
    config = BootConfig(
        repo=args.repo,
        vm=args.vm,
        backup_id=args.backup,
        key_file=args.key_file,
        checks=tuple(args.check),
        ports=tuple(args.port),
        timeout=DEFAULT_TIMEOUT if args.timeout is None else args.timeout,
        connect=args.connect,
        run_root=run_root(),
    )
    with sigterm_interrupts():
        result = verify_boot(config, note=note)
    emit(args, {"ok": result.passed, "boot": result.to_json()}, human(result))
    if not result.passed:
        raise BootFailedError(
            f"backup {result.backup_id} of {result.vm} did not boot: {result.reason}",
            hint="its console tail and screenshot are kept beside it (vmsnap list --json, vmsnap report)",
        )
    return 0


def human(result: BootResult) -> str:
    """The verdict as lines for a terminal."""
    agent = f"{result.seconds_to_agent:.1f} s" if result.seconds_to_agent is not None else "never"
    how = f"{result.kind}, {result.accelerator or 'accelerator unknown'}"
    lines = [
        f"booted {result.vm}/{result.backup_id} ({how}): {result.verdict.upper()} in {result.seconds:.1f} s; "
        f"guest agent answered after {agent}"
    ]
    lines += [f"  {c.describe()}" for c in result.checks]
    lines += [f"  port {p.port}: {'open' if p.open else 'closed'} ({p.detail})" for p in result.ports]
    lines.append(f"  screenshot: {result.screenshot or 'none (' + str(result.screenshot_skipped) + ')'}")
    if result.console_tail:
        lines.append("  console: " + " | ".join(result.console_tail[-3:]))
    elif result.console_skipped:
        lines.append(f"  console: none ({result.console_skipped})")
    if result.reason:
        lines.append(f"  why: {result.reason}")
    return "\n".join(lines)


def boot_cell(result: BootResult | RepositoryError | None) -> str:
    """A backup's latest boot verification in one table cell (``list``)."""
    if result is None:
        return "-"
    if isinstance(result, RepositoryError):
        return "record DAMAGED"
    if result.passed:
        return f"passed, agent {result.seconds_to_agent:.0f} s"
    return "FAILED"
