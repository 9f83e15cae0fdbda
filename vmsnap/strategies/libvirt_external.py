"""The ``external`` strategy for libvirt domains through libvirt's own snapshot API (not registered by
default: pick it in code where libvirt must know every overlay at every moment)."""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

from vmsnap.errors import (
    BlockJobError,
    NotFoundError,
    SnapshotError,
    UnsupportedError,
    UsageError,
)
from vmsnap.image import qemu_img
from vmsnap.strategies.base import Capabilities, StrategyBase
from vmsnap.vm.libvirt.machine import LibvirtMachine, libvirt_message
from vmsnap.vm.machine import Machine

try:
    import libvirt
except ImportError:  # pragma: no cover - LibvirtMachine() reports the missing package
    libvirt = None
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.strategies.external import ExternalOverlayStrategy
from vmsnap.vm.libvirt.snapshots import (
    _lookup_snapshot,
    _pivot_when_ready,
    create_external_snapshot,
    external_overlays,
    snapshots,
)

# -- the external strategy, the libvirt way -------------------------------------------------------


class LibvirtExternalSnapshotStrategy(StrategyBase):
    """The ``external`` strategy for libvirt domains through libvirt's own snapshot API, so libvirt knows
    every overlay at every moment (``virsh domblklist`` and ``snapshot-list`` are always true).

    Pick it instead of the QMP-passthrough ``external`` strategy when other tools (or libvirt itself:
    migration, managed save, another block job) may touch the domain while a backup runs, or when the
    guest should be quiesced by libvirt (``quiesce``). ``create`` is ``snapshot-create-as --disk-only
    --atomic``, running or shut off; ``delete`` is ``blockcommit`` (``--active --pivot`` for the top
    overlay) and needs the domain running; ``rollback`` drops the overlay of a shut-off domain.

    :param machine: a :class:`LibvirtMachine`
    :param quiesce: let libvirt freeze the guest's filesystems through its agent for the snapshot
    :param overlay_dir: where overlays go (default: next to each image)
    :param job_timeout: seconds a commit may take
    :raise UsageError: ``machine`` is not a libvirt domain
    """

    name: ClassVar[str] = "external"
    traits: ClassVar[Traits] = ExternalOverlayStrategy.traits  # the same technique, the same costs
    capabilities: ClassVar[Capabilities] = Capabilities(instant="transaction", online=True, offline=True)

    def __init__(
        self,
        machine: Machine,
        *,
        quiesce: bool = False,
        overlay_dir: Path | None = None,
        job_timeout: float = 3600.0,
    ) -> None:
        if not isinstance(machine, LibvirtMachine):
            raise UsageError(
                f"{machine!r} is not a libvirt domain", hint="use the external strategy for bare QEMU"
            )
        self.machine: LibvirtMachine = machine
        self.quiesce = quiesce
        self.overlay_dir = overlay_dir
        self.job_timeout = job_timeout

    def probe(self, disk: Disk) -> bool:
        """True for writable qcow2 or raw file disks (an overlay is always qcow2)."""
        return not disk.read_only and disk.format in ("qcow2", "raw")

    def create(self, disks: Sequence[Disk], *, name: str) -> list[SnapshotRef]:
        """One libvirt disk-only snapshot of all ``disks`` (atomic: all overlays or none).

        :raise UsageError: a bad snapshot name
        :raise NotFoundError: a disk that is not the domain's
        :raise SnapshotError: libvirt refused (e.g. the name exists)
        """
        validate_name(name, "snapshot name")
        return create_external_snapshot(
            self.machine,
            name,
            disks=[d.name for d in disks],
            quiesce=self.quiesce,
            overlay_dir=self.overlay_dir,
        )

    def list(self) -> list[SnapshotRef]:
        """vmsnap's libvirt snapshots whose overlays are still in their disk's chain, oldest first."""
        disks = {d.name: d for d in self.machine.disks()}
        refs = []
        for name in snapshots(self.machine):
            snapshot = _lookup_snapshot(self.machine, name)
            for target, overlay in external_overlays(snapshot).items():
                disk = disks.get(target)
                if disk is not None and Path(overlay) in (disk.file, *disk.backing_chain):
                    refs.append(self._ref(name, disk, Path(overlay)))
        return refs

    def _ref(self, name: str, disk: Disk, overlay: Path) -> SnapshotRef:
        return SnapshotRef(
            strategy=self.name, name=name, disk=disk, location=str(overlay), details={"libvirt": "snapshot"}
        )

    def _locate(self, snap: SnapshotRef) -> tuple[Disk, Path, Path]:
        """(current disk, overlay, the image below it) for a snapshot of one disk."""
        overlay = Path(external_overlays(_lookup_snapshot(self.machine, snap.name)).get(snap.disk.name, ""))
        disk = next((d for d in self.machine.disks() if d.name == snap.disk.name), None)
        chain = (disk.file, *disk.backing_chain) if disk is not None else ()
        if disk is None or overlay not in chain or chain.index(overlay) + 1 >= len(chain):
            raise NotFoundError(f"disk {snap.disk.name} has no overlay of snapshot {snap.name!r} any more")
        return disk, overlay, chain[chain.index(overlay) + 1]

    @contextlib.contextmanager
    def export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        """The image below the overlay (read-only while the snapshot exists), read shared."""
        disk, _overlay, below = self._locate(snap)
        info = qemu_img.chain_info(self.machine.runner, below)[0]
        yield ExportSource(
            kind="file",
            location=str(below),
            format=str(info.get("format", "qcow2")),
            disk=disk,
            virtual_size=disk.virtual_size,
            force_share=True,
        )

    def delete(self, snap: SnapshotRef) -> None:
        """Commit this disk's overlay into the image below (pivoting if it is the top) and remove it; the
        libvirt snapshot is forgotten once none of its disks has its overlay.

        :raise UnsupportedError: the domain is shut off (libvirt commits only in a running QEMU)
        :raise BlockJobError: the commit failed or timed out (aborted; nothing lost)
        """
        disk, overlay, below = self._locate(snap)
        if not self.machine.is_running:
            raise UnsupportedError(
                f"deleting snapshot {snap.name!r} needs domain {self.machine.name} running",
                hint="start it; or roll back to the snapshot, which needs it shut off",
            )
        dom = self.machine.domain
        deadline = time.monotonic() + self.job_timeout
        try:
            if overlay == disk.file:
                dom.blockCommit(disk.name, None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
                _pivot_when_ready(self.machine, disk.name, deadline, self.job_timeout)
            else:
                dom.blockCommit(disk.name, str(below), str(overlay), 0, 0)
                _wait_block_job_gone(self.machine, disk.name, deadline, self.job_timeout)
        except libvirt.libvirtError as err:
            raise BlockJobError(disk.name, f"libvirt blockcommit failed: {libvirt_message(err)}") from err
        self.machine.runner.run(["rm", "-f", "--", str(overlay)], timeout=60)
        self._forget_if_done(snap.name)

    def rollback(self, snap: SnapshotRef) -> None:
        """Drop this disk's overlay, and any newer ones above it, of a shut-off domain: the disk runs on
        the image below again; snapshots whose overlays are all gone are forgotten.

        :raise UnsupportedError: the domain is running
        """
        disk, overlay, below = self._locate(snap)
        if self.machine.is_running:
            raise UnsupportedError(
                f"rolling back to snapshot {snap.name!r} needs domain {self.machine.name} shut off",
                hint=f"virsh shutdown {self.machine.name}, then roll back",
            )
        chain = (disk.file, *disk.backing_chain)
        dropped = chain[: chain.index(overlay) + 1]
        known = {
            Path(path)
            for name in snapshots(self.machine)
            for path in external_overlays(_lookup_snapshot(self.machine, name)).values()
        }
        strangers = [str(path) for path in dropped if path not in known]
        if strangers:
            raise SnapshotError(
                f"disk {disk.name} has layers above snapshot {snap.name!r} that no libvirt snapshot made: "
                f"{', '.join(strangers)}",
                hint="nothing was changed; merge or remove those layers first",
            )
        root = self.machine.xml_tree(inactive=True)
        for node in root.iterfind("./devices/disk"):
            target, source = node.find("target"), node.find("source")
            if target is None or source is None or target.get("dev") != disk.name:
                continue
            source.set("file", str(below))
            driver = node.find("driver")
            if driver is not None:
                driver.set(
                    "type", str(qemu_img.chain_info(self.machine.runner, below)[0].get("format", "qcow2"))
                )
            for backing in node.findall("backingStore"):
                node.remove(backing)
        try:
            self.machine.connection.defineXML(ET.tostring(root, encoding="unicode"))
        except libvirt.libvirtError as err:
            raise SnapshotError(f"rolling back disk {disk.name} failed: {libvirt_message(err)}") from err
        for path in dropped:
            self.machine.runner.run(["rm", "-f", "--", str(path)], timeout=60)
        for name in reversed(snapshots(self.machine)):
            self._forget_if_done(name)

    def _forget_if_done(self, name: str) -> None:
        if any(ref.name == name for ref in self.list()):
            return
        with contextlib.suppress(NotFoundError, libvirt.libvirtError):
            _lookup_snapshot(self.machine, name).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)


def _wait_block_job_gone(machine: LibvirtMachine, target: str, deadline: float, timeout: float) -> None:
    """Wait for a non-active block commit, which ends by itself."""
    interval = 0.01
    while machine.domain.blockJobInfo(target, 0):
        if time.monotonic() > deadline:
            with contextlib.suppress(libvirt.libvirtError):
                machine.domain.blockJobAbort(target, 0)
            raise BlockJobError(target, f"commit did not finish within {timeout:g} s; it was aborted")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)
