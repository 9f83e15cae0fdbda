"""The ``internal`` strategy: qcow2 internal snapshots, entries inside the image file itself.

Online through QMP (``blockdev-snapshot-internal-sync`` in one transaction, or a ``snapshot-save`` job with
the VM's RAM); offline through ``qemu-img snapshot``. Exported by ``qemu-nbd --load-snapshot``.
"""

from __future__ import annotations

import builtins
import contextlib
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

from vmsnap.errors import (
    BlockJobError,
    CommandError,
    NotFoundError,
    QMPCommandError,
    SnapshotError,
    TransferError,
    UnsupportedError,
    UsageError,
)
from vmsnap.image import qemu_img
from vmsnap.image.nbd import QemuNbdServer
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.strategies.base import Capabilities, StrategyBase, distinct_names, file_source, require_qcow2
from vmsnap.strategies.undo import undo_later
from vmsnap.vm.machine import Machine
from vmsnap.vm.qmp_actions import blockdev_snapshot_internal_action


class LazyRefcountsWarning(UserWarning):
    """A qcow2 image without ``lazy_refcounts``: first writes after an internal snapshot are very slow."""


class InternalSnapshotStrategy(StrategyBase):
    """Snapshots stored inside each qcow2 image (``savevm``-style), no extra files.

    Pick it for qcow2 disks when you want snapshots that travel with the image, cost nothing to delete
    (no data is merged back) and can include the VM's RAM (``vm_state=True``, the VM pauses while it is
    written) so a running VM can be rolled back to the exact moment. Avoid it for write-heavy VMs: the
    first write to each cluster after a snapshot copies it and updates refcounts (about 95x slower than a
    plain overwrite on the author's machine without ``lazy_refcounts``, 14x with it), and raw images,
    LVM volumes or other formats are not supported. Disk-only snapshots are rolled back with the VM off.

    :param machine: the VM (running: QMP; offline: qemu-img)
    :param vm_state: online only: save the VM's RAM and device state too (``snapshot-save`` job)
    :param export_via: "nbd" (qemu-nbd on a private unix socket) or "file" (a file source for qemu-img -l)
    :param drop_bitmaps: let rollback remove the disk's dirty bitmaps (QEMU refuses to revert with them);
        this ends any incremental backup chain, so the next backup is full
    :param job_timeout: seconds a snapshot-save / snapshot-load job may take
    """

    name: ClassVar[str] = "internal"
    traits: ClassVar[Traits] = Traits(
        qemu_command="blockdev-snapshot-internal-sync (one transaction); snapshot-save/snapshot-load",
        libvirt_command="virsh snapshot-create-as DOMAIN NAME; snapshot-revert; snapshot-delete",
        os_command="qemu-img snapshot -c / -l / -a / -d",
        snapshot_is="entries in the qcow2 image",
        scope="one VM",
        technology="qcow2 cluster refcounts (copy on write)",
        copy_out="qemu-nbd --load-snapshot (nbd) or qemu-img convert -l (copy)",
        write_cost="first write to each cluster copies it and updates refcounts (lazy_refcounts helps)",
        delete_cost="refcount updates only; no data moves",
        rollback_cost="metadata only (VM off; or loadvm of a snapshot with VM state)",
    )
    capabilities: ClassVar[Capabilities] = Capabilities(instant="transaction", online=True, offline=True)

    def __init__(
        self,
        machine: Machine,
        *,
        vm_state: bool = False,
        export_via: Literal["nbd", "file"] = "nbd",
        drop_bitmaps: bool = False,
        job_timeout: float = 600.0,
    ) -> None:
        if export_via not in ("nbd", "file"):
            raise UsageError(f"unknown export_via {export_via!r}", hint="use 'nbd' or 'file'")
        self.machine = machine
        self.runner = machine.runner
        self.vm_state = vm_state
        self.export_via = export_via
        self.drop_bitmaps = drop_bitmaps
        self.job_timeout = job_timeout
        self.warnings: builtins.list[str] = []
        """Warnings of the last :meth:`create` (also issued with :func:`warnings.warn`)."""
        self.last_pause_ms: float | None = None
        """How long the VM was paused by the last VM-state snapshot or rollback, in ms."""

    # -- queries ----------------------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True for writable qcow2 disks."""
        return disk.format == "qcow2" and not disk.read_only

    def _node_info(self, node_name: str) -> Mapping[str, Any] | None:
        for node in self.machine.qmp().query_named_block_nodes():
            if node.get("node-name") == node_name:
                return dict(node)
        return None

    def _image_info(self, disk: Disk) -> Mapping[str, Any] | None:
        """qemu-img-info-like data of the disk's active image (QEMU's view when it runs), None if absent."""
        if self.machine.is_running:
            node = self._node_info(disk.node_name)
            return None if node is None else dict(node.get("image", {}))
        if not disk.file.exists():
            return None
        return qemu_img.info(self.runner, disk.file, force_share=False)

    def _snapshots(self, disk: Disk) -> builtins.list[Mapping[str, Any]]:
        info = self._image_info(disk)
        return list(info.get("snapshots", [])) if info else []

    def _current(self, snap: SnapshotRef) -> Disk:
        """The machine's disk of ``snap`` as it is now (node names change when QEMU restarts)."""
        for disk in self.machine.disks():
            if disk.file == snap.disk.file or (disk.name == snap.disk.name and self.machine.is_running):
                return disk
        raise NotFoundError(
            f"disk {snap.disk.name} ({snap.disk.file}) is not a disk of {self.machine.name}",
            hint="name the VM the snapshot was taken of",
        )

    def _require(self, snap: SnapshotRef) -> tuple[Disk, Mapping[str, Any]]:
        disk = self._current(snap)
        for entry in self._snapshots(disk):
            if entry.get("name") == snap.name:
                return disk, entry
        raise NotFoundError(
            f"disk {disk.name} has no internal snapshot {snap.name!r}",
            hint=f"list them with `vmsnap snapshot list --strategy internal` ({disk.file})",
        )

    def list(self) -> builtins.list[SnapshotRef]:
        """Every internal snapshot of every qcow2 disk of the machine, oldest first per disk."""
        refs: builtins.list[SnapshotRef] = []
        for disk in self.machine.disks():
            if disk.format != "qcow2":
                continue
            refs.extend(self._ref(disk, entry) for entry in self._snapshots(disk))
        return refs

    def _ref(self, disk: Disk, entry: Mapping[str, Any]) -> SnapshotRef:
        return SnapshotRef(
            strategy=self.name,
            name=str(entry["name"]),
            disk=disk,
            location=str(disk.file),
            details={
                "id": str(entry.get("id", "")),
                "vm_state_size": str(entry.get("vm-state-size", 0)),
                "date_sec": str(entry.get("date-sec", "")),
            },
        )

    # -- create -----------------------------------------------------------------------------------

    def transaction_actions(self, disk: Disk, *, name: str) -> builtins.list[Mapping[str, Any]]:
        """One ``blockdev-snapshot-internal-sync`` action (``device`` takes the format node's name)."""
        return [blockdev_snapshot_internal_action(disk.node_name, name)]

    def create(self, disks: Sequence[Disk], *, name: str) -> builtins.list[SnapshotRef]:
        """Snapshot all ``disks`` at one instant: one QMP transaction (or one snapshot-save job) online,
        ``qemu-img snapshot -c`` per image offline, undoing the ones made when a later one fails.

        :raise UsageError: bad name, no disks
        :raise UnsupportedError: a disk is not qcow2
        :raise SnapshotError: a disk already has a snapshot of that name, or QEMU / qemu-img failed
        """
        validate_name(name, "snapshot name")
        if not disks:
            raise UsageError("no disks to snapshot", hint="name at least one disk")
        distinct_names(disks)
        self.warnings = []
        for disk in disks:
            require_qcow2(disk, self.name)
            try:
                info = self._image_info(disk)
            except CommandError as err:
                raise SnapshotError(
                    f"cannot open {disk.file} of disk {disk.name}: {_cause(err)}; no snapshot was kept",
                    hint="if a running QEMU uses it, snapshot it through its QMP socket (--qmp) instead",
                ) from err
            if info is None:
                continue  # a missing disk fails in the transaction / qemu-img below, undoing the others
            if any(s.get("name") == name for s in info.get("snapshots", [])):
                raise SnapshotError(
                    f"disk {disk.name} already has an internal snapshot named {name!r}",
                    hint="choose another name, or delete it first (vmsnap snapshot delete)",
                )
            lazy = info.get("format-specific", {}).get("data", {}).get("lazy-refcounts")
            if lazy is False:
                self._warn(
                    f"disk {disk.name} ({disk.file}) has lazy_refcounts off: the first write to each "
                    "cluster after an internal snapshot is much slower; consider "
                    "`qemu-img amend -o lazy_refcounts=on` with the VM off"
                )
        if not self.machine.is_running:
            if self.vm_state:
                raise UnsupportedError(
                    f"{self.machine.name} is not running: there is no VM state to save",
                    hint="drop --vm-state for a disk-only snapshot, or start the VM",
                )
            return self._create_offline(disks, name)
        if self.vm_state:
            return self._create_with_vm_state(disks, name)
        actions = [a for disk in disks for a in self.transaction_actions(disk, name=name)]
        try:
            self.machine.qmp().transaction(actions)
        except QMPCommandError as err:
            raise SnapshotError(
                f"internal snapshot {name!r} of {', '.join(d.name for d in disks)} failed: {err.desc}",
                hint="no disk was changed (the transaction is atomic); fix the cause and retry",
            ) from err
        return [self._ref(disk, {"name": name}) for disk in disks]

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.remark(message, LazyRefcountsWarning, stacklevel=3)

    def _create_offline(self, disks: Sequence[Disk], name: str) -> builtins.list[SnapshotRef]:
        with contextlib.ExitStack() as undo:
            for disk in disks:
                self._qemu_img_snapshot(
                    "create",
                    name,
                    disk,
                    hint="no snapshot was kept on any disk; check that the image exists and no QEMU uses it",
                )
                undo_later(undo, qemu_img.snapshot, self.runner, disk.file, name, action="delete")
            undo.pop_all()
        return [self._ref(disk, {"name": name}) for disk in disks]

    def _qemu_img_snapshot(self, action: str, name: str, disk: Disk, *, hint: str) -> None:
        """:raise SnapshotError: qemu-img snapshot ``action`` of ``name`` on ``disk`` failed"""
        try:
            qemu_img.snapshot(self.runner, disk.file, name, action=action)
        except CommandError as err:
            flag = qemu_img.SNAPSHOT_FLAGS[action]
            raise SnapshotError(
                f"qemu-img snapshot {flag} {name} {disk.file} failed: {_cause(err)}", hint=hint
            ) from err

    def _create_with_vm_state(self, disks: Sequence[Disk], name: str) -> builtins.list[SnapshotRef]:
        qmp = self.machine.qmp()
        job_id = f"vmsnap-save-{uuid.uuid4().hex[:8]}"
        was_running = qmp.status() == "running"
        nodes = [d.node_name for d in disks]
        started = time.monotonic()
        try:
            qmp.snapshot_save(job_id, tag=name, vmstate=nodes[0], devices=nodes, timeout=self.job_timeout)
        except (QMPCommandError, BlockJobError) as err:
            self._resume_if_paused(was_running)
            raise SnapshotError(
                f"snapshot-save {name!r} of {', '.join(d.name for d in disks)} failed: {err}",
                hint="QEMU saves all disks or none; check the VM has no migration blocker",
            ) from err
        self.last_pause_ms = (time.monotonic() - started) * 1000.0
        info = {s["name"]: s for s in self._snapshots(disks[0])}
        size = info.get(name, {}).get("vm-state-size", 0)
        return [
            self._ref(disk, {"name": name, "vm-state-size": size if i == 0 else 0})
            for i, disk in enumerate(disks)
        ]

    def _resume_if_paused(self, was_running: bool) -> None:
        """A failed snapshot job leaves the VM paused (``restore-vm``); resume it if it ran before."""
        qmp = self.machine.qmp()
        with contextlib.suppress(QMPCommandError):
            if was_running and qmp.status() != "running":
                qmp.cont()

    # -- export / delete / rollback ---------------------------------------------------------------

    @contextlib.contextmanager
    def export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        """Serve the snapshot read-only: ``qemu-nbd --load-snapshot`` on a private socket (default), or a
        file source read with ``qemu-img convert -U -l snapshot.name=``.

        :raise NotFoundError: the disk has no such snapshot
        :raise SnapshotError: qemu-nbd failed to start
        """
        disk, _ = self._require(snap)
        running = self.machine.is_running
        if self.export_via == "file":
            yield file_source(disk.file, disk=disk, snapshot=snap.name, force_share=running)
            return
        server = QemuNbdServer(
            disk.file,
            "qcow2",
            image_opts={"snapshot.name": snap.name},
            force_share=running,
            persistent=True,
            export_name=disk.name,
            runner=self.runner,
        )
        try:
            server.start()
        except TransferError as err:
            raise SnapshotError(
                f"qemu-nbd could not export snapshot {snap.name!r} of {disk.file}: {err.message}",
                hint="check that the image and snapshot exist and that qemu-nbd is installed",
            ) from err
        try:
            yield ExportSource(
                kind="nbd", location=server.uri, format="raw", disk=disk, virtual_size=disk.virtual_size
            )
        finally:
            server.stop()

    def delete(self, snap: SnapshotRef) -> None:
        """Remove the snapshot from the image (``blockdev-snapshot-delete-internal-sync`` / ``qemu-img
        snapshot -d``); the image keeps all current data and its backing chain.

        :raise NotFoundError: no such snapshot
        :raise SnapshotError: QEMU or qemu-img refused
        """
        disk, _ = self._require(snap)
        if self.machine.is_running:
            try:
                self.machine.qmp().blockdev_snapshot_delete_internal_sync(disk.node_name, snap.name)
            except QMPCommandError as err:
                raise SnapshotError(f"deleting {snap.name!r} on {disk.name} failed: {err.desc}") from err
            return
        self._qemu_img_snapshot("delete", snap.name, disk, hint="check that no QEMU uses the image")

    def rollback(self, snap: SnapshotRef) -> None:
        """Return the disk to the snapshot's content.

        Offline: ``qemu-img snapshot -a``. Online: only snapshots with VM state (``snapshot-load``, which
        restores every disk of that snapshot and the RAM; a failed load leaves the VM paused, so it is
        resumed before raising). A disk-only snapshot is not reverted under a running guest: the guest's
        page cache would no longer match its disk.

        :raise NotFoundError: no such snapshot
        :raise SnapshotError: the disk has dirty bitmaps (and ``drop_bitmaps`` is off), or QEMU refused
        :raise UnsupportedError: a disk-only snapshot of a running VM
        """
        disk, entry = self._require(snap)
        running = self.machine.is_running
        if running and int(entry.get("vm-state-size", 0)) == 0:
            raise UnsupportedError(
                f"cannot roll {disk.name} back to disk-only snapshot {snap.name!r} while {self.machine.name} "
                "runs",
                hint="shut the VM down and run `vmsnap snapshot rollback --image FILE --strategy internal`, "
                "or take snapshots with VM state to roll back a running VM",
            )
        self._handle_bitmaps(disk)
        if running:
            self._load_vm_state(disk, snap.name)
            return
        self._qemu_img_snapshot("apply", snap.name, disk, hint="check that no QEMU uses the image")

    def rollback_many(self, snaps: Sequence[SnapshotRef]) -> None:
        """Roll back a running VM by loading the first of ``snaps`` that holds the VM's state (it reverts
        every disk and the RAM at one instant); otherwise each disk on its own (see :meth:`rollback`)."""
        with_state = [snap for snap in snaps if holds_vm_state(snap)]
        if self.machine.is_running and with_state:
            self.rollback(with_state[0])
            return
        for snap in snaps:
            self.rollback(snap)

    def _bitmap_names(self, disk: Disk) -> builtins.list[str]:
        if self.machine.is_running:
            return [str(b["name"]) for b in self.machine.qmp().dirty_bitmaps(disk.node_name)]
        return [str(b["name"]) for b in qemu_img.bitmaps(self.runner, disk.file)]

    def _handle_bitmaps(self, disk: Disk) -> None:
        names = self._bitmap_names(disk)
        if not names:
            return
        if not self.drop_bitmaps:
            raise SnapshotError(
                f"refusing to roll back {disk.name}: it has dirty bitmaps {', '.join(names)} and QEMU cannot "
                "revert a disk with bitmaps",
                hint="allow dropping them (drop_bitmaps=True, CLI --drop-bitmaps); this ends the incremental "
                "backup chain and the next backup is full",
            )
        for bitmap in names:
            if self.machine.is_running:
                self.machine.qmp().block_dirty_bitmap_remove(disk.node_name, bitmap)
            else:
                qemu_img.bitmap(self.runner, disk.file, bitmap, remove=True)

    def _load_vm_state(self, disk: Disk, name: str) -> None:
        qmp = self.machine.qmp()
        # every writable qcow2 disk: RAM from the snapshot with a disk left at today's data would corrupt
        # the guest, so QEMU must refuse when a disk lacks the snapshot
        nodes: builtins.list[str] = []
        vmstate = disk.node_name
        for candidate in self.machine.disks():
            if candidate.format != "qcow2" or candidate.read_only:
                continue
            nodes.append(candidate.node_name)
            for entry in self._snapshots(candidate):
                if entry.get("name") == name and int(entry.get("vm-state-size", 0)) > 0:
                    vmstate = candidate.node_name
        job_id = f"vmsnap-load-{uuid.uuid4().hex[:8]}"
        was_running = qmp.status() == "running"
        started = time.monotonic()
        try:
            qmp.snapshot_load(job_id, tag=name, vmstate=vmstate, devices=nodes, timeout=self.job_timeout)
        except (QMPCommandError, BlockJobError) as err:
            self._resume_if_paused(was_running)
            raise SnapshotError(
                f"snapshot-load {name!r} failed: {err}",
                hint="the VM was resumed; its disks may be partly reverted: check them before going on",
            ) from err
        finally:
            self.last_pause_ms = (time.monotonic() - started) * 1000.0


def _cause(err: CommandError) -> str:
    lines = [line.strip() for line in (err.stderr or err.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {err.returncode}"


def holds_vm_state(ref: SnapshotRef) -> bool:
    """True when ``ref`` saved the VM's RAM too (loading it reverts every disk of the VM at once)."""
    return ref.details.get("vm_state_size", "0") not in ("", "0")
