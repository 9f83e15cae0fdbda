"""The Strategy interface — probe / create / export / delete / rollback / list — and what the orchestrator may
ask of a strategy (:class:`Capabilities`), as data.

The backup orchestrator never names a strategy: it reads :attr:`Strategy.capabilities` and builds the
strategy for a backup with :meth:`Strategy.for_backup`, handing it a :class:`BackupContext` (where it may
write files, which change-tracking name to keep, and the :class:`Checkpoint` an incremental starts from). A
strategy from another distribution, registered under the ``vmsnap.strategies`` entry point, gets every
feature its capabilities allow — incrementals included.
"""

from __future__ import annotations

import contextlib
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self, runtime_checkable

import attrs

from vmsnap.errors import UnsupportedError, UsageError, VmsnapError
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.vm.machine import Machine

Instant = Literal["transaction", "pause"]


@attrs.frozen
class Capabilities:
    """What the orchestrator may ask of a strategy.

    :param instant: how all disks of a running VM are caught at one instant: one QMP ``transaction``, or
        a short ``stop``/``cont`` pause around the snapshot (the strategy does either inside ``create``)
    :param online: works on a running VM
    :param offline: works on powered-off images
    :param incremental: a backup made with a :class:`Checkpoint` exports only what changed since it: its
        :class:`~vmsnap.model.ExportSource` has ``since`` set and names the changed extents
        (``dirty_bitmap``, an NBD metadata context); when the changes cannot be trusted it exports everything
        (``since`` None) and says why (through :attr:`BackupContext.note`; made without a context: in an
        :class:`IncrementalFallbackWarning`)
    :param writes_images: with ``BackupContext.push`` it writes ``<disk>.qcow2`` into
        ``BackupContext.workdir`` itself (for incrementals backed by the checkpoint's image), and
        ``export`` yields that file
    :param tracks_changes: keeps change-tracking state in the VM (a dirty bitmap) that a backup which dies or
        is not kept leaves behind: the next backup of the VM must then be a full one
    """

    instant: Instant
    online: bool = True
    offline: bool = False
    incremental: bool = False
    writes_images: bool = False
    tracks_changes: bool = False

    def to_json(self) -> dict[str, Any]:
        """The capabilities as a JSON object (``vmsnap strategies --json``)."""
        return attrs.asdict(self)


class IncrementalFallbackWarning(UserWarning):
    """An incremental backup was asked for but a full one was taken (the reason is in the message)."""


def _paths(images: Mapping[str, Path]) -> dict[str, Path]:
    return {str(k): Path(v) for k, v in images.items()}


@attrs.frozen
class Checkpoint:
    """Where an incremental backup starts: the backup ``backup_id`` (its change tracking ended there).

    :param images: disk name → that backup's image of the disk, for strategies that write incremental images
        on top of it (empty when the repository layout keeps no such images)
    """

    backup_id: str
    images: Mapping[str, Path] = attrs.field(factory=dict, converter=_paths)


Note = Callable[[str], None]
"""Receives one-line remarks of a strategy (a fallback to a full backup, a slow setting)."""


@attrs.frozen
class BackupContext:
    """What a strategy is told when it is made for one backup (see :meth:`Strategy.for_backup`).

    :param workdir: a private directory on the repository's filesystem for the strategy's files of this
        backup (fleecing files; with ``push`` the images themselves); it goes away with the backup's staging
    :param tracking: the name the strategy tracks changes under (a persistent dirty bitmap)
    :param since: for an incremental backup, the checkpoint it starts from
    :param push: the strategy writes the images itself (only asked of strategies that can)
    :param note: where the strategy's remarks for this backup go (they land in the backup's notes); None:
        they are issued with :func:`warnings.warn`. A callback, not ``warnings``: a job backs several VMs up
        at once in threads, and ``warnings.catch_warnings`` is process-wide, so one VM's remark could land
        in another's report (not kept in the journal)
    """

    workdir: Path
    tracking: str = "vmsnap"
    since: Checkpoint | None = None
    push: bool = False
    note: Note | None = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        validate_name(self.tracking, "bitmap name")

    def to_json(self) -> dict[str, Any]:
        """The context as JSON (the journal keeps it so that ``recover`` can rebuild the strategy)."""
        since = None
        if self.since is not None:
            images = {k: str(v) for k, v in self.since.images.items()}
            since = {"backup_id": self.since.backup_id, "images": images}
        return {"workdir": str(self.workdir), "tracking": self.tracking, "since": since, "push": self.push}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BackupContext:
        """The context :meth:`to_json` wrote.

        :raise UsageError: malformed
        """
        try:
            since_data = data.get("since")
            since = (
                Checkpoint(
                    str(since_data["backup_id"]), {k: Path(v) for k, v in since_data["images"].items()}
                )
                if since_data
                else None
            )
            return cls(Path(data["workdir"]), str(data["tracking"]), since, bool(data["push"]))
        except (KeyError, TypeError, AttributeError) as err:
            raise UsageError(f"a malformed backup context in the journal: {err}") from err


@runtime_checkable
class Strategy(Protocol):
    """How a snapshot is taken, copied out, removed and rolled back to.

    A strategy is bound to one machine when it is made: ``cls(machine, **options)`` (its own options), or
    ``cls.for_backup(machine, context)`` for a backup; export, delete and rollback need that machine's QMP
    monitor or runner, also in a later process (``vmsnap snapshot delete``, ``vmsnap recover``), so a
    :class:`SnapshotRef` plus the machine is all any step needs.
    """

    name: ClassVar[str]
    traits: ClassVar[Traits]
    capabilities: ClassVar[Capabilities]
    machine: Machine
    last_pause_ms: float | None
    """How long the last :meth:`create` kept the VM's vCPUs stopped (ms), None where it stopped none or
    cannot tell (a backup's outcome reports it)."""

    def __init__(self, machine: Machine, **options: Any) -> None:
        """Bind the strategy to ``machine`` with its own ``options`` (``UsageError`` for unknown ones)."""
        ...

    @classmethod
    def for_backup(cls, machine: Machine, context: BackupContext) -> Strategy:
        """The strategy for one backup of ``machine`` (see :class:`BackupContext`)."""
        ...

    def probe(self, disk: Disk) -> bool:
        """True when this strategy can snapshot ``disk`` here."""
        ...

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Snapshot all ``disks`` at one instant (one transaction, or inside stop/cont)."""
        ...

    def export(self, snap: SnapshotRef) -> AbstractContextManager[ExportSource]:
        """Make the snapshot readable for the body of the ``with`` (a body that ends without an error says
        the data was copied)."""
        ...

    def delete(self, snap: SnapshotRef) -> None:
        """Remove the snapshot, leaving the disk on its original chain with all data."""
        ...

    def abandon(self, snaps: Sequence[SnapshotRef]) -> None:
        """Say, before :meth:`delete`, that the backup of these snapshots will not be kept (a strategy that
        tracks changes gives the changes back to its tracking)."""
        ...

    def rollback(self, snap: SnapshotRef) -> None:
        """Return the disk to exactly the snapshot's content."""
        ...

    def rollback_many(self, snaps: Sequence[SnapshotRef]) -> None:
        """Return the disks of ``snaps`` (one snapshot name, several disks) to their snapshots; a strategy
        whose snapshot reverts several disks at one instant (a running VM's saved state) does it once."""
        ...

    def list(self) -> Sequence[SnapshotRef]:
        """The snapshots of this strategy that exist on the machine's disks now."""
        ...

    def find(self, name: str) -> Sequence[SnapshotRef]:
        """The snapshots ``create(..., name=name)`` made — also what one that died before it returned left
        behind, however the strategy names that (``recover`` deletes them)."""
        ...


class StrategyBase:
    """Defaults a strategy may inherit: made for a backup with its default options, nothing to abandon, and
    :meth:`remark` for what the backup's caller should read."""

    machine: Machine
    last_pause_ms: float | None = None
    notes: Note | None = None
    """Where :meth:`remark` sends remarks (:attr:`BackupContext.note` of the backup it was made for)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    @classmethod
    def for_backup(cls, machine: Machine, context: BackupContext) -> Self:
        """The strategy with its default options (of the context it needs only where remarks go)."""
        strategy = cls(machine)
        strategy.notes = context.note
        return strategy

    def remark(self, message: str, category: type[Warning] = UserWarning, *, stacklevel: int = 2) -> None:
        """Tell the caller ``message``: to the backup's :attr:`BackupContext.note` when made for a backup,
        else with :func:`warnings.warn` (``stacklevel`` counts from the caller of this method)."""
        if self.notes is not None:
            self.notes(message)
        else:
            warnings.warn(message, category, stacklevel=stacklevel + 1)

    def abandon(self, snaps: Sequence[SnapshotRef]) -> None:
        """Nothing to give back."""

    def list(self) -> Sequence[SnapshotRef]:
        """The snapshots of this strategy that exist now (every strategy defines it)."""
        raise NotImplementedError

    def rollback(self, snap: SnapshotRef) -> None:
        """Return the disk to the snapshot (every strategy defines it)."""
        raise NotImplementedError

    def rollback_many(self, snaps: Sequence[SnapshotRef]) -> None:
        """Roll each disk back on its own."""
        for snap in snaps:
            self.rollback(snap)

    def find(self, name: str) -> Sequence[SnapshotRef]:
        """The snapshots :meth:`list` finds under ``name`` (a strategy that names what a dead ``create``
        left otherwise says so by overriding this)."""
        return [ref for ref in self.list() if ref.name == name]


@contextlib.contextmanager
def paused(machine: Machine) -> Iterator[dict[str, float]]:
    """Pause the VM's vCPUs for the body (``stop`` … ``cont``) and report the pause in ms.

    A VM that was already paused is left paused. ``cont`` runs even if the body raised.
    """
    report = {"paused_ms": 0.0}
    if not machine.is_running:
        yield report
        return
    qmp = machine.qmp()
    was_running = qmp.status() == "running"
    started = time.monotonic()
    if was_running:
        qmp.stop()
    try:
        yield report
    finally:
        if was_running:
            qmp.cont()
        report["paused_ms"] = (time.monotonic() - started) * 1000.0


def file_source(
    image: Path, *, disk: Disk, fmt: str = "qcow2", snapshot: str | None = None, force_share: bool = True
) -> ExportSource:
    """A file :class:`ExportSource` for ``image`` (optionally its internal ``snapshot``)."""
    return ExportSource(
        kind="file",
        location=str(image),
        format=fmt,
        disk=disk,
        virtual_size=disk.virtual_size,
        image_opts={"snapshot.name": snapshot} if snapshot is not None else {},
        force_share=force_share,
    )


def require_qcow2(disk: Disk, strategy: str) -> None:
    """:raise UnsupportedError: ``disk`` is not a qcow2 image."""
    if disk.format != "qcow2":
        raise UnsupportedError(
            f"{strategy} snapshots need a qcow2 image, but disk {disk.name} ({disk.file}) is {disk.format}",
            hint="convert it with `qemu-img convert -O qcow2`, or pick another strategy (vmsnap strategies)",
        )


def distinct_names(disks: Sequence[Disk]) -> None:
    """:raise VmsnapError: two of ``disks`` are the same disk."""
    seen: set[str] = set()
    for disk in disks:
        key = str(disk.file)
        if key in seen:
            raise VmsnapError(f"disk {disk.name} ({disk.file}) is listed twice", hint="name each disk once")
        seen.add(key)


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
