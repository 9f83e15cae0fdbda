"""The commands that work on a VM's snapshots and channels: snapshot, strategies and agent."""

from __future__ import annotations

import argparse
import json
from typing import Any

import attrs

from vmsnap.backup.snapshots import ACTIONS, SnapshotRequest, run_snapshot_action
from vmsnap.cli.common import (
    Command,
    add_disk_option,
    add_vm_arguments,
    emit,
    machine_spec,
    note,
    opened_machine,
    positive_seconds,
    render_table,
)
from vmsnap.errors import UsageError, VmsnapError
from vmsnap.model import Traits
from vmsnap.strategies import strategy_class, strategy_names

# -- vmsnap snapshot ----------------------------------------------------------------------------------------


def cmd_snapshot(args: argparse.Namespace) -> int:
    """create | list | delete | rollback snapshots of one VM with one strategy."""
    request = SnapshotRequest(
        action=args.action,
        strategy=args.strategy,
        name=args.snapshot_name,
        disks=tuple(args.disk),
        options={"vm_state": args.vm_state, "drop_bitmaps": args.drop_bitmaps, "merge": args.merge},
    )
    outcome = run_snapshot_action(machine_spec(args), request)
    for warning in outcome.warnings:
        note(f"warning: {warning}")
    refs = outcome.snapshots
    if outcome.action == "list":
        rows = [[r.disk.name, r.name, r.location] for r in refs]
        human = render_table(["disk", "snapshot", "location"], rows) if rows else "no snapshots"
    elif outcome.action == "create":
        human = f"created {outcome.strategy} snapshot {outcome.name!r} of " + ", ".join(
            r.disk.name for r in refs
        )
        if outcome.paused_ms is not None:
            human += f" (VM paused {outcome.paused_ms:.0f} ms)"
    else:
        verb = "deleted" if outcome.action == "delete" else "rolled back to"
        human = f"{verb} {outcome.strategy} snapshot {outcome.name!r} on " + ", ".join(
            r.disk.name for r in refs
        )
    emit(args, outcome.to_json(), human)
    return 0


def _snapshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    add_vm_arguments(parser)
    parser.add_argument(
        "--strategy", required=True, help="internal|external|backup|lvm|btrfs (vmsnap strategies)"
    )
    parser.add_argument(
        "--snapshot",
        dest="snapshot_name",
        metavar="SNAP",
        help="the snapshot's name (create: default snap-<UTC time>)",
    )
    add_disk_option(parser)
    parser.add_argument(
        "--vm-state", action="store_true", help="internal: also save the VM's RAM (VM pauses)"
    )
    parser.add_argument(
        "--drop-bitmaps",
        action="store_true",
        help="internal rollback: remove dirty bitmaps first (the next backup is full)",
    )
    parser.add_argument(
        "--merge", choices=("auto", "commit", "stream"), help="external delete: how to merge (default auto)"
    )


# -- vmsnap strategies --------------------------------------------------------------------------------------


def cmd_strategies(args: argparse.Namespace) -> int:
    """Print the comparison table from each strategy's Traits."""
    columns = Traits.columns()
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    for name in strategy_names():
        try:
            traits = strategy_class(name).traits
        except VmsnapError as err:
            data[name] = {"error": str(err)}
            continue
        values = attrs.asdict(traits)
        data[name] = values
        rows.append([name, *[str(values[field]) for field, _ in columns]])
    emit(args, {"strategies": data}, render_table(["strategy", *[h for _, h in columns]], rows))
    return 0


# -- vmsnap agent -------------------------------------------------------------------------------------------


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
    with opened_machine(machine_spec(args)) as machine:
        agent = machine.agent()
        if agent is None:
            raise UsageError(f"{machine.name} has no guest agent channel", hint="pass --agent SOCKET")
        answer = agent.execute(args.command, arguments, timeout=args.timeout)
    payload = {"return": answer}
    emit(args, payload, json.dumps(payload, sort_keys=True, default=str))
    return 0


def _agent_arguments(parser: argparse.ArgumentParser) -> None:
    add_vm_arguments(parser)
    parser.add_argument("command", metavar="COMMAND", help="a guest-* command, e.g. guest-ping")
    parser.add_argument("arguments", nargs="?", metavar="JSON-ARGS", help="its arguments as a JSON object")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=30.0, help="seconds to wait for the answer (default 30)"
    )


COMMANDS = (
    Command(
        "snapshot",
        "create, list, delete or roll back snapshots of a VM with one strategy",
        "vmsnap snapshot create --image disk0.qcow2 --strategy internal --snapshot before-upgrade",
        cmd_snapshot,
        _snapshot_arguments,
    ),
    Command(
        "strategies",
        "print the snapshot strategies' comparison table",
        "vmsnap strategies --json",
        cmd_strategies,
    ),
    Command(
        "agent",
        "run one guest agent command (guest-*) and print its answer as JSON",
        "vmsnap agent --qmp vm.qmp --agent vm.qga guest-fsfreeze-status",
        cmd_agent,
        _agent_arguments,
    ),
)
"""The snapshot and VM-channel commands, in the order ``vmsnap --help`` lists them."""
