"""The skeleton the storage strategies (btrfs, lvm) share: snapshot the volumes under a VM's disks inside one
``stop``/``cont``, and leave nothing behind when any step fails.

:meth:`VolumeSnapshotStrategy.create` plans (each volume once, with the disks that use it), prepares, pauses
the VM, makes one snapshot per volume, records which disks use each, and builds the refs. Every step that
makes something registers its undo on one :class:`contextlib.ExitStack` before it acts; the first failure
unwinds the stack (once the VM runs again), success drops it. A strategy supplies the steps.
"""

from __future__ import annotations

import abc
import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import attrs

from vmsnap.errors import SnapshotError, UnsupportedError, VmsnapError
from vmsnap.model import Disk, SnapshotRef, validate_name
from vmsnap.runner import Runner
from vmsnap.strategies.base import StrategyBase, paused
from vmsnap.strategies.storage import StorageNoteWarning
from vmsnap.vm.machine import Machine

TargetT = TypeVar("TargetT")
PlacementT = TypeVar("PlacementT")
VolumeT = TypeVar("VolumeT")


@attrs.frozen
class VolumePlan(Generic[TargetT, PlacementT]):
    """What one ``create`` makes.

    :param name: the snapshot's name (valid)
    :param targets: one snapshot to make per volume, in the order they are made
    :param placements: each disk (in the order given) with where it lives, in the strategy's terms
    """

    name: str
    targets: tuple[TargetT, ...]
    placements: tuple[tuple[Disk, PlacementT], ...]


_PACKAGE_DIR = str(Path(__file__).parent)


def _caller_level() -> int:
    """The ``stacklevel`` that attributes a warning issued by this function's caller to the first frame
    outside this package, whoever called whom inside it (``skip_file_prefixes`` does it from Python 3.12)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    return level


def users_by_volume(uses: Iterable[tuple[str, VolumeT]]) -> dict[VolumeT, tuple[str, ...]]:
    """Group (disk name, volume) pairs by volume: each volume once, in first-use order, with the disks that
    use it (each once, in order)."""
    users: dict[VolumeT, dict[str, None]] = {}
    for disk, volume in uses:
        users.setdefault(volume, {})[disk] = None
    return {volume: tuple(disks) for volume, disks in users.items()}


@contextlib.contextmanager
def naming_disk(disk: Disk) -> Iterator[None]:
    """Prefix an :class:`UnsupportedError` raised in the body with the disk it is about.

    :raise UnsupportedError: the body's, as ``disk <name>: <message>``
    """
    try:
        yield
    except UnsupportedError as err:
        raise UnsupportedError(f"disk {disk.name}: {err.message}", hint=err.hint) from err


class VolumeSnapshotStrategy(StrategyBase, abc.ABC, Generic[TargetT, PlacementT]):
    """A strategy that snapshots the storage under the disks (a subvolume, a logical volume) while the VM
    is paused: the :meth:`create` skeleton, and what such strategies keep for their callers.

    Subclasses supply :meth:`_plan`, :meth:`_snapshot`, :meth:`_discard`, :meth:`_snapshot_failed` and
    :meth:`_refs`, and may supply :meth:`_prepare` and :meth:`_record_users`.

    :param machine: the VM (running: paused around the snapshots; offline: not)
    :param runner: where the storage commands run (default: the machine's runner)
    """

    def __init__(self, machine: Machine, runner: Runner | None = None) -> None:
        super().__init__(machine)
        self.runner: Runner = runner if runner is not None else machine.runner
        #: human-readable notes from the last calls (other files captured, a deferred merge); never raised
        self.warnings: list[str] = []
        #: how long the VM was paused by the last create, in ms (None: it was not running)
        self.last_pause_ms: float | None = None

    def _warn(self, message: str, category: type[UserWarning] = StorageNoteWarning) -> None:
        """Keep ``message`` in :attr:`warnings` and :meth:`remark` it (a warning is attributed to the caller
        of the strategy: the first frame outside this package)."""
        self.warnings.append(message)
        self.remark(message, category, stacklevel=_caller_level())

    def _refuse_while_running(self, why: str) -> None:
        """:raise SnapshotError: the VM runs (``why``: what a rollback would do to it)."""
        if self.machine.is_running:
            raise SnapshotError(
                f"{self.machine.name} is running: {why}", hint="shut the VM down, then roll back"
            )

    # -- the skeleton -------------------------------------------------------------------------------

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Snapshot every volume that holds one of ``disks`` (each once), inside ``stop``/``cont`` when the
        VM runs. A failure at any step removes whatever the call made, after the VM runs again.

        :raise UsageError: the name is not valid
        :raise UnsupportedError: a disk is not on storage this strategy can snapshot (naming what it is on)
        :raise NotFoundError: a disk does not exist
        :raise SnapshotError: no disks, a snapshot of this name exists, or a step failed (nothing is left)
        """
        if not disks:
            raise SnapshotError("no disks to snapshot", hint="pass at least one disk")
        validate_name(name, "snapshot name")
        self.warnings = []
        plan = self._plan(disks, name)
        with contextlib.ExitStack() as undo:
            self._prepare(plan, undo)
            with paused(self.machine) as pause:
                for target in plan.targets:
                    # first: a command that fails or times out may still have made it
                    undo.callback(self._discard, target)
                    try:
                        self._snapshot(target)
                    except VmsnapError as err:
                        raise self._snapshot_failed(target, err) from err
            self.last_pause_ms = pause["paused_ms"] if self.machine.is_running else None
            self._record_users(plan)
            undo.pop_all()
        return self._refs(plan, pause["paused_ms"])

    # -- the steps --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _plan(self, disks: Sequence[Disk], name: str) -> VolumePlan[TargetT, PlacementT]:
        """Where each disk lives and the snapshots to make; refuses a name that exists already.

        :raise VmsnapError: a disk cannot be snapshotted, or the name exists (nothing was made)
        """

    def _prepare(self, plan: VolumePlan[TargetT, PlacementT], undo: contextlib.ExitStack) -> None:
        """Before the pause: check room, make directories (registering their removal on ``undo`` first).

        :raise VmsnapError: the snapshots cannot be made
        """

    @abc.abstractmethod
    def _snapshot(self, target: TargetT) -> None:
        """Make one snapshot (the VM is paused).

        :raise VmsnapError: it failed or timed out
        """

    @abc.abstractmethod
    def _discard(self, target: TargetT) -> None:
        """Remove a snapshot this create made, or that a failed command may have made; quiet (it runs
        while another error is on its way)."""

    @abc.abstractmethod
    def _snapshot_failed(self, target: TargetT, err: VmsnapError) -> SnapshotError:
        """The error that says ``target``'s snapshot failed (and that nothing was left behind)."""

    def _record_users(self, plan: VolumePlan[TargetT, PlacementT]) -> None:
        """After the pause: keep which disks use each snapshot, when the snapshot itself cannot say.

        :raise SnapshotError: that could not be written
        """

    @abc.abstractmethod
    def _refs(self, plan: VolumePlan[TargetT, PlacementT], paused_ms: float) -> list[SnapshotRef]:
        """The refs, one per disk in the order given (the snapshots exist); scope warnings go here."""
