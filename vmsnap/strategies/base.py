"""The Strategy interface: probe / create / export / delete / rollback, plus its row of the comparison table.

Strategies that can join a QMP ``transaction`` expose their actions so all disks of a VM are snapshotted in
one atomic step; the others are wrapped in ``stop``/``cont`` by the caller (see :func:`paused`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from vmsnap.errors import UnsupportedError, VmsnapError
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits
from vmsnap.vm.machine import Machine


@runtime_checkable
class Strategy(Protocol):
    """How a snapshot is taken, copied out, removed and rolled back to.

    A strategy is bound to one machine when it is made: ``cls(machine, **options)``; export, delete and
    rollback need that machine's QMP monitor or runner, also in a later process (``vmsnap snapshot delete``,
    ``vmsnap recover``), so a :class:`SnapshotRef` plus the machine is all any step needs.
    """

    name: ClassVar[str]
    traits: ClassVar[Traits]
    machine: Machine

    def probe(self, disk: Disk) -> bool:
        """True when this strategy can snapshot ``disk`` here."""
        ...

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Snapshot all ``disks`` at one instant (one transaction, or inside stop/cont)."""
        ...

    def export(self, snap: SnapshotRef) -> AbstractContextManager[ExportSource]:
        """Make the snapshot readable for a transport for the body of the ``with``."""
        ...

    def delete(self, snap: SnapshotRef) -> None:
        """Remove the snapshot, leaving the disk on its original chain with all data."""
        ...

    def rollback(self, snap: SnapshotRef) -> None:
        """Return the disk to exactly the snapshot's content."""
        ...

    def list(self) -> Sequence[SnapshotRef]:
        """The snapshots of this strategy that exist on the machine's disks now."""
        ...


@runtime_checkable
class TransactionalStrategy(Strategy, Protocol):
    """A strategy whose create step is a list of QMP transaction actions."""

    def transaction_actions(self, disk: Disk, *, name: str) -> list[Mapping[str, Any]]:
        """The ``transaction`` actions that snapshot ``disk``."""
        ...


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
