"""Snapshots outside a backup run (``vmsnap snapshot``): create, list, delete or roll back with one strategy.

The strategy is found by name in the registry and asked, never named: which options it takes comes from its
constructor (the request carries them by name, unread), and a rollback of several disks is the strategy's
(:meth:`~vmsnap.strategies.base.Strategy.rollback_many`: a snapshot that saved a running VM's state reverts
every disk at one instant).
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from vmsnap.errors import NotFoundError, UsageError
from vmsnap.model import SnapshotRef, validate_name
from vmsnap.strategies import strategy_class
from vmsnap.strategies.base import Strategy
from vmsnap.vm.machine import Machine, find_disk
from vmsnap.vm.select import MachineSpec, open_machine

Action = Literal["create", "list", "delete", "rollback"]
ACTIONS: tuple[Action, ...] = ("create", "list", "delete", "rollback")


@attrs.frozen
class SnapshotRequest:
    """One snapshot action of one strategy on one VM.

    :param action: create, list, delete or rollback
    :param strategy: a registered strategy name
    :param name: the snapshot's name (create: default ``snap-<UTC time>``; delete and rollback need it)
    :param disks: only these disks (default: all)
    :param options: the strategy's own options by keyword (e.g. ``{"vm_state": True}``), checked against
        its constructor; None or False means "not given"
    :raise UsageError: an unknown action, an invalid name, or delete/rollback without a name
    """

    action: Action
    strategy: str
    name: str | None = None
    disks: tuple[str, ...] = ()
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise UsageError(f"unknown snapshot action {self.action!r}", hint=f"use {', '.join(ACTIONS)}")
        if self.action in ("delete", "rollback") and not self.name:
            raise UsageError(
                f"snapshot {self.action} needs --snapshot NAME", hint="see `vmsnap snapshot list`"
            )
        if self.name is not None:
            validate_name(self.name, "snapshot name")

    def strategy_options(self, cls: type[Strategy]) -> dict[str, Any]:
        """The options set here, checked against what ``cls``'s constructor takes.

        :raise UsageError: an option the strategy does not take
        """
        accepted = inspect.signature(cls).parameters
        options: dict[str, Any] = {}
        for key, value in self.options.items():
            if value in (None, False):
                continue
            if key not in accepted:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"strategy {cls.name!r} does not take {flag}", hint="see docs/strategies.md")
            options[key] = value
        return options


@attrs.frozen
class SnapshotOutcome:
    """What a :class:`SnapshotRequest` did: the snapshots it made, found, deleted or rolled back to."""

    vm: str
    strategy: str
    action: Action
    name: str | None
    snapshots: tuple[SnapshotRef, ...]
    warnings: tuple[str, ...] = ()
    paused_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap snapshot``."""
        payload: dict[str, Any] = {"vm": self.vm, "strategy": self.strategy, "action": self.action}
        if self.action == "create":
            payload["warnings"] = list(self.warnings)
            if self.paused_ms is not None:
                payload["paused_ms"] = round(self.paused_ms, 3)
        payload["snapshots"] = [
            {
                "disk": ref.disk.name,
                "name": ref.name,
                "file": str(ref.disk.file),
                "location": ref.location,
                "details": dict(ref.details),
            }
            for ref in self.snapshots
        ]
        return payload


def run_snapshot_action(spec: MachineSpec, request: SnapshotRequest) -> SnapshotOutcome:
    """Do ``request`` on the VM ``spec`` names (opened after the strategy and its options are checked).

    :raise PluginError: no strategy of that name
    :raise UsageError: an option the strategy does not take, or an invalid VM
    :raise NotFoundError: delete or rollback of a snapshot that does not exist, or an unknown disk
    :raise SnapshotError: the strategy failed (see its docs)
    """
    cls = strategy_class(request.strategy)
    options = request.strategy_options(cls)
    name = request.name
    if name is None and request.action == "create":
        name = time.strftime("snap-%Y%m%dT%H%M%SZ", time.gmtime())
    with contextlib.closing(open_machine(spec)) as machine:
        strategy = cls(machine, **options)
        outcome = SnapshotOutcome(machine.name, cls.name, request.action, name, ())
        if request.action == "list":
            refs = [r for r in strategy.list() if not request.disks or r.disk.name in request.disks]
            return attrs.evolve(outcome, snapshots=tuple(refs))
        if request.action == "create":
            return _create(strategy, machine, request.disks, outcome)
        wanted = request.disks
        refs = [r for r in strategy.list() if r.name == name and (not wanted or r.disk.name in wanted)]
        if not refs:
            raise NotFoundError(
                f"{machine.name} has no {cls.name} snapshot {name!r}",
                hint=f"list them with `vmsnap snapshot list --strategy {cls.name}`",
            )
        if request.action == "delete":
            for ref in refs:
                strategy.delete(ref)
        else:
            roll_back(strategy, refs)
        return attrs.evolve(outcome, snapshots=tuple(refs))


def _create(
    strategy: Strategy, machine: Machine, disk_names: Sequence[str], outcome: SnapshotOutcome
) -> SnapshotOutcome:
    """Snapshot the machine's disks (or ``disk_names``) at one instant as ``outcome.name``; the warnings
    the strategy issues are kept in the outcome, not shown."""
    assert outcome.name is not None
    disks = machine.disks()
    if disk_names:
        disks = [find_disk(disks, d) for d in disk_names]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = tuple(strategy.create(disks, name=outcome.name))
    paused = strategy.last_pause_ms
    return attrs.evolve(
        outcome,
        snapshots=refs,
        warnings=tuple(str(w.message) for w in caught),
        paused_ms=None if paused is None else float(paused),
    )


def roll_back(strategy: Strategy, refs: Sequence[SnapshotRef]) -> None:
    """Return the disks of ``refs`` to their snapshot, as the strategy does it for several disks.

    :raise SnapshotError: the strategy could not roll back (see its docs)
    :raise UnsupportedError: the strategy cannot roll back a running VM's disk
    """
    strategy.rollback_many(refs)
