"""Deciding a backup before its first step: which strategy, push or a transport, which disks, and the parent
an incremental starts from — all from the strategies', transports' and repository layout's declared
capabilities, never from their names."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from vmsnap.backup.config import PUSH, BackupConfig
from vmsnap.errors import PluginError, RepositoryError, UsageError
from vmsnap.model import Disk, validate_name
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.reports import LayoutTraits
from vmsnap.strategies import strategy_class, strategy_names
from vmsnap.strategies.base import Strategy
from vmsnap.transports import transport_class
from vmsnap.vm.machine import Machine, find_disk

AUTO = "auto"


@attrs.frozen
class Resolved:
    """The choices of a run that need no repository.

    :param strategy: the strategy class
    :param transport: a transport name, "auto" (by preference, per source) or :data:`PUSH`
    :param disks: the disks to back up, in device order
    :param reads_itself: the repository's layout reads the exports itself (no transport)
    """

    strategy: type[Strategy]
    transport: str
    disks: tuple[Disk, ...]
    reads_itself: bool = False

    @property
    def push(self) -> bool:
        """True when the strategy writes the images itself."""
        return self.transport == PUSH


def _capable(predicate_name: str, wanted: bool = True) -> list[str]:
    """Registered strategies whose capability ``predicate_name`` is ``wanted`` (broken plugins skipped)."""
    found = []
    for name in strategy_names():
        try:
            cls = strategy_class(name)
        except PluginError:
            continue
        if bool(getattr(cls.capabilities, predicate_name)) == wanted:
            found.append(name)
    return found


def choose_strategy(requested: str, machine: Machine) -> type[Strategy]:
    """The strategy class for ``requested`` ("auto": the one that can take incremental backups of this
    machine in its state — running or powered off).

    :raise PluginError: unknown strategy
    :raise UsageError: "auto" finds none, or the strategy does not work on a running / powered-off machine
    """
    running = machine.is_running
    if requested == AUTO:
        state = "online" if running else "offline"
        fitting = [n for n in _capable("incremental") if getattr(strategy_class(n).capabilities, state)]
        if not fitting:
            raise UsageError(
                f"no installed strategy takes incremental backups of a {state} machine",
                hint="name one with --strategy (`vmsnap strategies` lists them)",
            )
        requested = fitting[0]
    cls = strategy_class(requested)
    if running and not cls.capabilities.online:
        raise UsageError(f"strategy {requested} works only on powered-off images", hint="shut the VM down")
    if not running and not cls.capabilities.offline:
        raise UsageError(
            f"strategy {requested} needs a running VM", hint="start it, or choose another strategy"
        )
    return cls


def choose_disks(machine: Machine, config: BackupConfig) -> tuple[Disk, ...]:
    """The disks to back up as the machine has them now (``config.disks``, else all), in device order.

    :raise UsageError: an unknown disk, a disk name that cannot be a file name, or no disks
    """
    disks = machine.disks()
    if config.disks:
        disks = [find_disk(disks, name) for name in config.disks]
    for disk in disks:
        validate_name(disk.name, "disk name")
    if not disks:
        raise UsageError(f"{machine.name} has no disks to back up")
    return tuple(disks)


def resolve(machine: Machine, config: BackupConfig, layout: LayoutTraits) -> Resolved:
    """(strategy, transport, disks) after "auto" choices and checks, for a repository of ``layout``.

    A layout that reads exports itself (chunks) takes no transport and no push: strategies that could push
    export instead (pull mode) — a running machine's through QEMU's NBD server, a powered-off machine's
    images through qemu-nbd with their persistent dirty bitmap, so offline incrementals read only what
    changed (and a machine on another host has them served there and forwarded).

    :raise UsageError: unknown disk, a disk name that cannot be a file name, no disks, a transport the
        strategy or the layout cannot use, ``--incremental`` with a strategy that cannot take incrementals
    :raise PluginError: unknown strategy or transport
    """
    disks = choose_disks(machine, config)
    cls = choose_strategy(config.strategy, machine)
    capabilities = cls.capabilities
    transport = config.transport
    if layout.reads_exports and transport != AUTO:
        raise UsageError(
            f"--transport {transport}: the {layout.name} layout reads the export itself",
            hint="leave --transport out, or back up into a qcow2 repository (`vmsnap init --layout qcow2`)",
        )
    if transport == PUSH and not capabilities.writes_images:
        writers = _capable("writes_images")
        raise UsageError(
            f"transport {PUSH!r} (the strategy writes the backup itself) exists only for strategy "
            + " or ".join(writers),
            hint="leave --transport out, or choose a transport (`vmsnap strategies`)",
        )
    if capabilities.writes_images and transport in (AUTO, PUSH) and layout.accepts_push:
        transport = PUSH
    elif transport != AUTO:
        transport_class(transport)  # an unknown name fails now, before anything is done
    if config.incremental and not capabilities.incremental:
        capable = _capable("incremental")
        raise UsageError(
            f"--incremental needs --strategy {' or '.join(capable) or '(none installed)'} "
            f"(strategy {cls.name} takes full backups only)",
            hint="`vmsnap strategies` shows what each strategy can do",
        )
    return Resolved(cls, transport, disks, layout.reads_exports)


def find_parent(
    repo: RepositoryLayout, vm: str, disks: Sequence[Disk], config: BackupConfig, strategy: str
) -> tuple[Manifest | None, str | None]:
    """The parent of an incremental backup, or (None, why the backup must be full).

    The latest backup must have been taken by the same strategy with the same change tracking, the
    repository must be able to build on it (qcow2: its chain is whole; chunks: its indexes are there), the
    VM's change tracking must not have been broken by a dead run, and every disk must exist in it with the
    same size.
    """
    try:
        latest = repo.latest(vm)
    except RepositoryError as err:
        return None, f"the latest backup cannot be used as a parent ({err.message})"
    if latest is None:
        return None, f"no earlier backup of {vm} in this repository"
    forced = repo.full_required(vm)
    if forced is not None:
        return None, f"a full backup is required ({forced})"
    if latest.strategy != strategy or latest.bitmap != config.bitmap:
        return (
            None,
            f"the latest backup {latest.backup_id} was not taken with bitmap {config.bitmap}",
        )
    unusable = repo.usable_parent(latest)
    if unusable is not None:
        return None, unusable
    recorded = {d.name: d for d in latest.disks}
    for disk in disks:
        record = recorded.get(disk.name)
        if record is None or record.virtual_size != disk.virtual_size:
            return None, f"disk {disk.name} is new or was resized since {latest.backup_id}"
    return latest, None
