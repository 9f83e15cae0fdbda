"""What every command module shares: the :class:`Command` a module registers, the VM options and the
frozen :class:`~vmsnap.vm.select.MachineSpec` they make, and output (``--json``, tables, notes, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.repo.stores.history import check_past, parse_time, with_as_of
from vmsnap.vm.machine import Machine
from vmsnap.vm.select import MachineSpec, open_machine

Run = Callable[[argparse.Namespace], int]
"""A command function: parse → frozen config → one library call → print; returns the exit status."""


# -- commands -----------------------------------------------------------------------------------------------


@attrs.frozen
class Command:
    """One ``vmsnap`` command as a command module registers it (see :data:`vmsnap.cli.COMMANDS`).

    :param name: the word after ``vmsnap``
    :param help: one line for ``vmsnap --help`` (also the command's description unless ``description``)
    :param example: a full command line, shown under ``example:`` in the command's ``--help``
    :param more_examples: further command lines shown there
    :param run: the command function; None for a group of ``subcommands``
    :param arguments: adds the command's own options (``--json`` and ``--debug`` are added for it)
    :param json_option: add ``--json`` after the command's options
    :param subcommands: the commands of a group (``vmsnap guest install-hooks``)
    """

    name: str
    help: str
    example: str
    run: Run | None
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    description: str | None = None
    json_option: bool = True
    subcommands: tuple[Command, ...] = ()
    more_examples: tuple[str, ...] = ()

    def add_to(self, commands: Any) -> argparse.ArgumentParser:
        """Add this command's parser to ``commands`` (what ``add_subparsers`` returned)."""
        examples = (self.example, *self.more_examples)
        heading = "example:" if len(examples) == 1 else "examples:"
        parser: argparse.ArgumentParser = commands.add_parser(
            self.name,
            help=self.help,
            description=self.description or self.help,
            epilog="\n  ".join((heading, *examples)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if self.run is not None:
            parser.set_defaults(func=self.run)
        parser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show vmsnap's log (commands run, their output) and tracebacks on errors",
        )
        self.arguments(parser)
        if self.json_option:
            add_json_option(parser)
        if self.subcommands:
            sub = parser.add_subparsers(
                dest=f"{self.name}_command", metavar=f"{self.name.upper()}-COMMAND", required=True
            )
            for command in self.subcommands:
                command.add_to(sub)
        return parser


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_repo_option(parser: argparse.ArgumentParser, *, required: bool = True, help: str = "") -> None:
    parser.add_argument(
        "--repo",
        required=required,
        metavar="REPO",
        help=help or "the backup repository: a directory or s3://BUCKET/PREFIX",
    )


def add_as_of_option(parser: argparse.ArgumentParser, *, what: str = "the repository") -> None:
    """``--as-of TIME``: read a repository as it was at TIME (ISO 8601 UTC), from its bucket's object
    versions."""
    parser.add_argument(
        "--as-of",
        metavar="TIME",
        help=f"read {what} as it was at TIME (UTC, e.g. 2026-12-07T21:30:00Z), ignoring later deletes and "
        "overwrites (an S3 bucket with versioning)",
    )


def as_of_location(repo: str | None, as_of: str | None) -> str | None:
    """``repo`` read as of the ``--as-of`` time (``REPO?as-of=TIME``), or ``repo`` without one.

    :raise UsageError: a malformed time, or one in the future
    """
    if as_of is None or repo is None:
        return repo
    return with_as_of(repo, check_past(parse_time(as_of)))


def add_key_option(parser: argparse.ArgumentParser, *, flag: str = "--key-file", what: str = "") -> None:
    """``--key-file FILE``: the key of an encrypted repository (default ``$VMSNAP_KEY_FILE``). A key is
    never given on the command line itself, only the path of its 0600 file."""
    parser.add_argument(
        flag,
        type=Path,
        metavar="FILE",
        help=what or "key file of an encrypted repository (default: $VMSNAP_KEY_FILE)",
    )


def add_disk_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk", action="append", default=[], metavar="NAME", help="only this disk (repeat)")


# -- the VM a command acts on -------------------------------------------------------------------------------


HOST_EXAMPLE = "--host root@hv2 --qmp /run/qemu/vm1.qmp"


def add_vm_arguments(parser: argparse.ArgumentParser, *, connect: bool = True) -> None:
    """--qmp/--agent/--name | --domain/--connect | --image ..., and --host for a VM on another host
    (``connect`` False: the command has a --connect of its own already)."""
    group = parser.add_argument_group(
        "VM (one of)",
        "on another host add --host; the paths are that host's, e.g. " + HOST_EXAMPLE,
    )
    group.add_argument("--qmp", type=Path, metavar="SOCKET", help="QMP unix socket of a running QEMU")
    group.add_argument("--agent", type=Path, metavar="SOCKET", help="guest agent socket of that QEMU")
    group.add_argument(
        "--name", help="the VM's name in the repository (default: QEMU's -name, or the image stem)"
    )
    group.add_argument("--domain", metavar="NAME", help="a libvirt domain")
    if connect:
        group.add_argument(
            "--connect", metavar="URI", help="libvirt connection URI (default: qemu:///system)"
        )
    group.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a powered-off disk image (repeat)",
    )
    group.add_argument(
        "--host",
        metavar="USER@HOST",
        help="the VM runs on another host, reached over OpenSSH (keys and known_hosts as ssh has them, "
        "never a password prompt; $VMSNAP_SSH_CONFIG names an ssh_config to use instead): its sockets "
        "and exports are forwarded, its commands run there. Also host, user@host:port, an ssh alias",
    )


def machine_spec(args: argparse.Namespace) -> MachineSpec:
    """The frozen VM selector from parsed arguments.

    :raise UsageError: no VM, or more than one way of naming it
    """
    return MachineSpec(
        qmp=args.qmp,
        agent=args.agent,
        name=args.name,
        domain=args.domain,
        connect=args.connect,
        images=tuple(args.image),
        host=args.host,
    )


@contextlib.contextmanager
def opened_machine(spec: MachineSpec) -> Iterator[Machine]:
    """The machine ``spec`` names, closed after the body."""
    with contextlib.closing(open_machine(spec)) as machine:
        yield machine


# -- output -------------------------------------------------------------------------------------------------


JSON_PAYLOAD = "_vmsnap_json_payload"
"""Where :func:`emit` keeps a command's ``--json`` object until :func:`vmsnap.cli.main` prints it."""


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    """The command's outcome: the human text now, or with --json the object :func:`vmsnap.cli.main` prints
    once the command ends (with an ``"error"`` member when it then fails), so stdout holds exactly one
    JSON object, errors included."""
    if getattr(args, "json", False):
        setattr(args, JSON_PAYLOAD, payload)
    else:
        print(human)


def print_json(payload: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    print(json.dumps(payload, sort_keys=True, default=str), flush=True)


def finite_seconds(text: str) -> float:
    """An argparse type for a duration in seconds: a finite number, 0 or more (not ``inf``, not ``nan``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds, 0 or more")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type for a timeout in seconds: a finite number above 0."""
    value = finite_seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not above 0 seconds")
    return value


def count(text: str) -> int:
    """An argparse type for a count: an integer, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def positive_count(text: str) -> int:
    """An argparse type for a count of at least 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more")
    return value


def render_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable on a terminal, pasteable into docs)."""
    cells = [list(headings), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def note(message: str) -> None:
    """A one-line remark on stderr (fallbacks, warnings); never part of the ``--json`` output."""
    print(f"vmsnap: {message}", file=sys.stderr)


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the body, so a terminated backup undoes what it did."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
