"""The ``vmsnap`` command: parse arguments into frozen config, call the library, print the outcome.

This is the only module that prints. Exit status: 0 success, 2 usage error, 1 any other failure, with one
line saying what failed and what to do (``--debug`` adds the traceback). ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap import __version__
from vmsnap.errors import UsageError, VmsnapError
from vmsnap.machine import Machine, OfflineMachine, QemuMachine

# -- the VM selector shared by every command that takes a VM ---------------------------------------


@attrs.frozen
class VmSelector:
    """Which VM a command acts on: a bare QEMU, a libvirt domain, or powered-off images."""

    qmp: Path | None = None
    agent: Path | None = None
    name: str | None = None
    domain: str | None = None
    connect: str | None = None
    images: tuple[Path, ...] = ()

    def open(self) -> Machine:
        """Build the machine this selector names.

        :raise UsageError: no selector, or two at once
        """
        chosen = sum(bool(x) for x in (self.qmp, self.domain, self.images))
        if chosen != 1:
            raise UsageError(
                "name exactly one VM",
                hint="use --qmp SOCKET [--agent SOCKET], --domain NAME, or --image FILE ...",
            )
        if self.qmp is not None:
            return QemuMachine(self.qmp, self.agent, name=self.name)
        if self.domain is not None:
            from vmsnap.libvirt_machine import LibvirtMachine  # needs the optional libvirt extra

            machine: Machine = LibvirtMachine(self.domain, uri=self.connect)  # type: ignore[assignment]
            return machine
        return OfflineMachine(list(self.images), name=self.name)


def add_vm_arguments(parser: argparse.ArgumentParser) -> None:
    """--qmp/--agent/--name | --domain/--connect | --image ..."""
    group = parser.add_argument_group("VM (one of)")
    group.add_argument("--qmp", type=Path, metavar="SOCKET", help="QMP unix socket of a running QEMU")
    group.add_argument("--agent", type=Path, metavar="SOCKET", help="guest agent socket of that QEMU")
    group.add_argument(
        "--name", help="the VM's name in the repository (default: QEMU's -name, or the image stem)"
    )
    group.add_argument("--domain", metavar="NAME", help="a libvirt domain")
    group.add_argument("--connect", metavar="URI", help="libvirt connection URI (default: qemu:///system)")
    group.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a powered-off disk image (repeat)",
    )


def vm_selector(args: argparse.Namespace) -> VmSelector:
    """The frozen selector from parsed arguments."""
    return VmSelector(
        qmp=args.qmp,
        agent=args.agent,
        name=args.name,
        domain=args.domain,
        connect=args.connect,
        images=tuple(args.image),
    )


# -- output -----------------------------------------------------------------------------------------


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    """Print ``payload`` as one JSON object with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, sort_keys=True, default=str))
    else:
        print(human)


def render_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable on a terminal, pasteable into docs)."""
    cells = [list(headings), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------------


def cmd_strategies(args: argparse.Namespace) -> int:
    """Print the comparison table from each strategy's Traits."""
    from vmsnap.model import Traits
    from vmsnap.registry import STRATEGY_GROUP, load, names

    columns = Traits.columns()
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    for name in names(STRATEGY_GROUP):
        try:
            traits = load(STRATEGY_GROUP, name).traits
        except (VmsnapError, AttributeError) as err:
            data[name] = {"error": str(err)}
            continue
        values = attrs.asdict(traits)
        data[name] = values
        rows.append([name, *[str(values[field]) for field, _ in columns]])
    emit(args, {"strategies": data}, render_table(["strategy", *[h for _, h in columns]], rows))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """Run one guest-* command through the VM's agent and print its answer."""
    try:
        arguments = json.loads(args.arguments) if args.arguments else None
    except json.JSONDecodeError as err:
        raise UsageError(
            f"JSON-ARGS is not valid JSON: {err}", hint='e.g. \'{"mountpoints": ["/"]}\''
        ) from err
    if not args.command.startswith("guest-"):
        raise UsageError(
            f"{args.command!r} is not a guest agent command", hint="agent commands start with guest-"
        )
    machine = vm_selector(args).open()
    try:
        agent = machine.agent()
        if agent is None:
            raise UsageError(f"{machine.name} has no guest agent channel", hint="pass --agent SOCKET")
        answer = agent.execute(args.command, arguments, timeout=args.timeout)
    finally:
        machine.close()
    print(json.dumps({"return": answer}, sort_keys=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure each strategy's costs; write JSON, Markdown and PNG into --out."""
    from vmsnap.benchmark import run_cost_bench

    quiet = bool(args.json)
    result, paths = run_cost_bench(
        args.out,
        quick=args.quick,
        runs=args.runs,
        progress=(lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
    )
    human = paths["markdown"].read_text() + "\n" + "\n".join(f"wrote {p}" for p in paths.values())
    emit(args, {"results": {k: str(v) for k, v in paths.items()}, "table": result.to_json()["table"]}, human)
    return 0


def cmd_guest_install_hooks(args: argparse.Namespace) -> int:
    """Write the fsfreeze-hook dispatcher and vmsnap's hook scripts under --root."""
    from vmsnap.guest.install import install_hooks

    installed = install_hooks(args.root)
    emit(
        args,
        {"installed": [{"path": str(f.path), "mode": f"{f.mode:04o}"} for f in installed]},
        "\n".join(f"installed {f.path} (mode {f.mode:04o})" for f in installed),
    )
    return 0


def _not_built_yet(what: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise VmsnapError(f"'vmsnap {what}' is not available in this version")

    return run


# -- parser -----------------------------------------------------------------------------------------

EPILOG = """examples:
  vmsnap backup --repo /backups --qmp /run/vm1.qmp --agent /run/vm1.qga
  vmsnap backup --repo /backups --domain web1 --incremental
  vmsnap restore --repo /backups --vm web1 --to /restore
  vmsnap strategies
"""


def build_parser() -> argparse.ArgumentParser:
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

    def command(
        name: str, help: str, example: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
        )
        return p

    p = command(
        "strategies",
        "print the snapshot strategies' comparison table",
        "vmsnap strategies --json",
        cmd_strategies,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "agent",
        "run one guest agent command (guest-*) and print its answer as JSON",
        "vmsnap agent --qmp vm.qmp --agent vm.qga guest-fsfreeze-status",
        cmd_agent,
    )
    add_vm_arguments(p)
    p.add_argument("command", metavar="COMMAND", help="a guest-* command, e.g. guest-ping")
    p.add_argument("arguments", nargs="?", metavar="JSON-ARGS", help="its arguments as a JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")

    p = command(
        "bench",
        "measure each strategy's write, delete and rollback costs on this machine",
        "vmsnap bench --quick --out benchmarks/results",
        cmd_bench,
    )
    p.add_argument("--quick", action="store_true", help="smaller images, fewer sizes (about 1-2 minutes)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where results go")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "guest",
        "guest-side set-up (run inside the guest, or on its mounted root)",
        "vmsnap guest install-hooks --root /",
        _not_built_yet("guest"),
    )
    guest_sub = p.add_subparsers(dest="guest_command", metavar="GUEST-COMMAND", required=True)
    p = guest_sub.add_parser(
        "install-hooks",
        help="install the fsfreeze-hook dispatcher and the database lock hook",
        description="Write /etc/qemu/fsfreeze-hook and /etc/qemu/fsfreeze-hook.d/50-vmsnap-dblock under "
        "--root (mode 0755). The database hook does nothing until /etc/vmsnap/dblock.cnf exists.",
        epilog="example:\n  vmsnap guest install-hooks --root /",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_guest_install_hooks)
    p.add_argument("--root", type=Path, required=True, help="the guest's root directory (/ inside it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    for name, help in (
        ("backup", "back up a VM into a repository"),
        ("restore", "restore a backup into standalone images"),
        ("list", "list the backups in a repository"),
        ("verify", "re-read backups and check every checksum and chain link"),
        ("prune", "delete old backups, never breaking a chain a kept backup needs"),
        ("snapshot", "create, list, delete or roll back snapshots"),
        ("recover", "undo what a dead run left behind"),
        ("demo", "back up and restore the built-in tiny VM"),
    ):
        command(name, help, f"vmsnap {name} --help", _not_built_yet(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsnap`` console script."""
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
    except KeyboardInterrupt:
        print("vmsnap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
