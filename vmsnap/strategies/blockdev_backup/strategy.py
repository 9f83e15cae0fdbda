"""The ``backup`` strategy: QEMU's ``blockdev-backup`` job copies every disk as of one instant into a qcow2
target (push), or a copy-before-write filter serves that instant over NBD (pull); full or incremental.

This module ties the parts together; each concern has its module in this package: :mod:`.plan` (what a
backup is, its names and records), :mod:`.bitmaps` (how the dirty bits are kept safe — read its docstring),
:mod:`.push`, :mod:`.fleecing` (pull), :mod:`.export` (QEMU's NBD server) and :mod:`.offline`.

What exists is recorded next to each target in a small 0600 file ``.<disk>.vmsnap-backup.json`` (name and
details), so :meth:`BlockdevBackupStrategy.list`, ``delete`` and ``rollback`` work from another process;
delete removes it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import attrs

from vmsnap.errors import CommandError, NotFoundError, QMPCommandError, SnapshotError, UsageError, VmsnapError
from vmsnap.image import qemu_img
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.strategies.base import (
    BackupContext,
    Capabilities,
    IncrementalFallbackWarning,
    StrategyBase,
    file_source,
)
from vmsnap.strategies.blockdev_backup import export, fleecing, offline, push
from vmsnap.strategies.blockdev_backup.bitmaps import (
    BitmapHome,
    NodeBitmaps,
    Outcomes,
    overlay_bitmap_actions,
    pending_name,
    recover_pending,
)
from vmsnap.strategies.blockdev_backup.fleecing import Fleecing
from vmsnap.strategies.blockdev_backup.plan import (
    BackupSet,
    Mode,
    Planner,
    Records,
    device_node,
    fleece_nodes,
    since_of,
    target_node,
)
from vmsnap.vm.machine import Machine
from vmsnap.vm.qmp import QMPMonitor

__all__ = [
    "BlockdevBackupStrategy",
    "Fleecing",
    "IncrementalFallbackWarning",
    "Mode",
    "overlay_bitmap_actions",
]


class BlockdevBackupStrategy(StrategyBase):
    """Back up with QEMU's own backup job: pick it for real backups of a running VM, especially incremental.

    The guest runs at full speed while the job copies; only the first write to each not-yet-copied cluster
    pays a read and a write (copy-before-write). Push mode writes ``target_dir/<disk>.qcow2`` itself — the
    target is the backup, on any mounted filesystem; pull mode leaves the copying to an NBD client
    (``nbd`` transport) and exports only the changed blocks' map for incrementals. Incremental backups use a
    persistent dirty bitmap and fall back to full (with :class:`IncrementalFallbackWarning`) whenever the
    bitmap or a parent cannot be trusted. Powered-off images get a ``qemu-img convert`` (full), or the
    extents their persistent bitmap marks, served by ``qemu-nbd`` (incremental).

    :param machine: the VM
    :param target_dir: where push-mode targets (and pull-mode fleecing files) go; made 0700 if missing
    :param incremental: copy only what changed since the last backup (needs ``parents``)
    :param parents: for incrementals, disk name → the previous backup's image of that disk
    :param parent_id: the backup id of ``parents`` (an incremental's export says it is relative to it)
    :param bitmap: the persistent dirty bitmap's name
    :param mode: "push" (QEMU writes the target) or "pull" (fleecing + NBD export)
    :param wait: push mode: :meth:`create` returns once the targets are complete (False: as soon as the jobs
        run, so a frozen guest can be thawed at once; then :meth:`finish` or :meth:`export` waits)
    :param fleecing: pull mode: "filter" (copy-before-write + snapshot-access, QEMU >= 7.0), "job" (a
        ``blockdev-backup sync=none`` job into a temporary overlay, which needs no change of the device's
        node), or "auto": the filter, and the job where the device's node cannot be swapped
    :raise UsageError: bad bitmap name, mode or fleecing method
    """

    name: ClassVar[str] = "backup"
    traits: ClassVar[Traits] = Traits(
        qemu_command="blockdev-backup (sync=full, or sync=bitmap with a persistent dirty bitmap); "
        "copy-before-write + snapshot-access + NBD export for pull",
        libvirt_command="virsh backup-begin (push or pull), virsh checkpoint-create",
        os_command="qemu-img convert, or qemu-img bitmap + qemu-nbd --bitmap (VM off)",
        snapshot_is="a separate image file: the backup itself (or a fleecing file behind an NBD export)",
        scope="one VM",
        technology="QEMU block job with copy-before-write; dirty bitmaps for changed blocks",
        copy_out="QEMU writes the target (copy/rename), or an NBD client pulls",
        write_cost="while the job runs: first write to each uncopied cluster also reads and writes it once",
        delete_cost="none: close the target (pull: drop the fleecing file)",
        rollback_cost="rewrite the whole disk image from the backup chain (VM off)",
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        instant="transaction",
        online=True,
        offline=True,
        incremental=True,
        writes_images=True,
        tracks_changes=True,
    )

    def __init__(
        self,
        machine: Machine,
        *,
        target_dir: Path,
        incremental: bool = False,
        parents: Mapping[str, Path] | None = None,
        parent_id: str | None = None,
        bitmap: str = "vmsnap",
        mode: Mode = "push",
        wait: bool = True,
        fleecing: Fleecing = "auto",
    ) -> None:
        if mode not in ("push", "pull"):
            raise UsageError(f"unknown backup mode {mode!r}", hint="use 'push' or 'pull'")
        if fleecing not in ("auto", "filter", "job"):
            raise UsageError(f"unknown fleecing method {fleecing!r}", hint="use 'auto', 'filter' or 'job'")
        self.machine = machine
        self.target_dir = Path(target_dir)
        self.incremental = incremental
        self.parents: dict[str, Path] = {k: Path(v) for k, v in (parents or {}).items()}
        self.parent_id = parent_id
        self.bitmap = validate_name(bitmap, "bitmap name")
        self.mode: Mode = mode
        self.wait = wait
        self.fleecing: Fleecing = fleecing
        self.records = Records(self.target_dir)
        self._outcomes = Outcomes()

    @classmethod
    def for_backup(cls, machine: Machine, context: BackupContext) -> BlockdevBackupStrategy:
        """Push (QEMU writes ``workdir/<disk>.qcow2``) when ``context.push``, else pull (fleecing + NBD);
        incremental from ``context.since`` with the bitmap ``context.tracking``. ``create`` returns as soon
        as the jobs run, so a frozen guest is thawed at once; ``export`` waits for the copy."""
        since = context.since
        strategy = cls(
            machine,
            target_dir=context.workdir,
            incremental=since is not None,
            parents=dict(since.images) if since is not None else None,
            parent_id=since.backup_id if since is not None else None,
            bitmap=context.tracking,
            mode="push" if context.push else "pull",
            wait=False,
        )
        strategy.notes = context.note
        return strategy

    # -- probing and planning -----------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True for qcow2 and raw disks (a running VM's disk needs a node name)."""
        if disk.format not in ("qcow2", "raw"):
            return False
        return bool(disk.node_name) or not self.machine.is_running

    @property
    def planner(self) -> Planner:
        """Plans this strategy's backups (push targets are written on top of their parents)."""
        return Planner(self.target_dir, self.bitmap, self.incremental, self.parents, self.mode == "push")

    def _backup_set(self, name: str, disks: Sequence[Disk], fallback: str) -> BackupSet:
        return BackupSet(
            name=name,
            set_id=f"{name}-{uuid.uuid4().hex[:8]}",
            mode=self.mode,
            bitmap=self.bitmap,
            since=self.parent_id or "",
            fallback=fallback,
            disks=tuple(d.name for d in disks),
            offline=not self.machine.is_running,
        )

    @staticmethod
    def _node_bitmaps(qmp: QMPMonitor, disks: Sequence[Disk]) -> tuple[set[str], dict[str, list[Any]]]:
        """Every node name, and each disk's dirty bitmaps (one ``query-named-block-nodes``)."""
        nodes = [n for n in qmp.query_named_block_nodes() if n.get("node-name")]
        by_node = {n["node-name"]: list(n.get("dirty-bitmaps", [])) for n in nodes}
        return set(by_node), {d.name: by_node.get(d.node_name, []) for d in disks}

    def transaction_actions(self, disk: Disk, *, name: str) -> list[Mapping[str, Any]]:
        """The transaction actions that back up ``disk`` into its (already added) push target node.

        :meth:`create` adds the target nodes and runs these for all disks in one transaction; this is for
        callers that combine them with other actions. The kind follows this disk's bitmap alone.
        """
        validate_name(name, "snapshot name")
        plans, _ = self.planner.plan(self._node_bitmaps(self.machine.qmp(), [disk])[1], [disk])
        node = target_node(disk.name)
        return list(
            push.backup_actions(plans[0], self.bitmap, job_id=f"{node}-{uuid.uuid4().hex[:8]}", target=node)
        )

    # -- create -----------------------------------------------------------------------------------------

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Start the backup of all ``disks`` at one instant.

        Push mode returns once every target is complete (with ``wait=False``: as soon as the jobs run, so a
        frozen guest can be thawed at once; the targets are complete when :meth:`finish` returns or
        :meth:`export` is entered). Pull mode sets up fleecing; :meth:`export` serves it over NBD. A
        powered-off VM's push targets are complete when this returns; pull serves them with qemu-nbd.

        :raise UsageError: bad names, or a target that exists already
        :raise SnapshotError: QEMU or qemu-img refused (nothing is left behind: no node, job or bitmap change)
        """
        validate_name(name, "snapshot name")
        if not disks:
            raise UsageError("no disks to back up", hint="pass at least one disk")
        for disk in disks:
            validate_name(disk.name, "disk name")
        if not self.machine.is_running:
            return self._create_offline(disks, name=name)
        qmp = self.machine.qmp()
        for disk in disks:
            if not disk.node_name:
                raise UsageError(f"disk {disk.name!r} has no block node name", hint="list disks with QMP")
        nodes, bitmaps = self._node_bitmaps(qmp, disks)
        self._check_leftovers(nodes, disks)
        # every disk's leftover is merged back (a list, not a short-circuiting generator)
        if any([recover_pending(NodeBitmaps(qmp, d.node_name), self.bitmap) for d in disks]):
            nodes, bitmaps = self._node_bitmaps(qmp, disks)
        plans, reason = self.planner.plan(bitmaps, disks)
        self._warn_fallback(reason)
        # a full backup restarts the chain: a broken bitmap goes now, a fresh one is added in the transaction
        for plan in plans:
            if plan.bitmap_state == "broken":
                self._remove_broken_bitmap(qmp, plan.disk)
        self.target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        backup = self._backup_set(name, disks, reason)
        if self.mode == "push":
            refs = push.create_push(qmp, self.machine.runner, plans, backup, self.records)
        else:
            refs = fleecing.create_pull(self.machine, plans, backup, self.target_dir, self.fleecing)
            for ref in refs:
                self.records.write(ref)
        self._outcomes.start(backup.set_id, backup.disks)
        if self.mode == "push" and self.wait:
            self._finish_all(refs)
        return refs

    def _warn_fallback(self, reason: str) -> None:
        if reason:
            self.remark(
                f"incremental backup not possible ({reason}); taking a full backup of all disks",
                IncrementalFallbackWarning,
                stacklevel=3,
            )

    def _remove_broken_bitmap(self, qmp: QMPMonitor, disk: Disk) -> None:
        try:
            qmp.block_dirty_bitmap_remove(disk.node_name, self.bitmap)
        except QMPCommandError as err:
            raise SnapshotError(
                f"the bitmap {self.bitmap!r} of disk {disk.name!r} cannot be reset: {err.desc}",
                hint="another block job may be using it: wait for it, or run `vmsnap recover`",
            ) from err

    def _refuse_existing(self, disks: Sequence[Disk]) -> None:
        for disk in disks:
            self.records.refuse_existing(disk, self.planner.target(disk) if self.mode == "push" else None)

    def _check_leftovers(self, nodes: set[str], disks: Sequence[Disk]) -> None:
        self._refuse_existing(disks)
        for disk in disks:
            ours = {target_node(disk.name), *fleece_nodes(disk.name).values()}
            if nodes & ours:
                left = ", ".join(sorted(nodes & ours))
                raise SnapshotError(
                    f"a backup of disk {disk.name!r} is still in QEMU (nodes {left})",
                    hint="wait for it to end, or run `vmsnap recover` to remove what a dead run left",
                )

    def _create_offline(self, disks: Sequence[Disk], *, name: str) -> list[SnapshotRef]:
        self._refuse_existing(disks)
        runner = self.machine.runner
        plans, reason = offline.plan_offline(runner, self.planner, self.bitmap, disks)
        self._warn_fallback(reason)
        self.target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        backup = self._backup_set(name, disks, reason)
        refs = offline.create_offline(runner, plans, backup, self.records)
        # push: the targets are complete, so the backup's bits can be settled now
        self._outcomes.start(backup.set_id, backup.disks, "confirmed" if self.mode == "push" else "started")
        if self.mode == "push":
            for ref in refs:
                self._settle(ref)
        return refs

    def _finish_all(self, refs: Sequence[SnapshotRef]) -> None:
        """Wait for every job of one backup; if one fails, undo the whole backup and raise."""
        failure: SnapshotError | None = None
        for ref in refs:
            try:
                self.finish(ref)
            except SnapshotError as err:
                failure = err
                break
        if failure is None:
            return
        for ref in refs:
            self._outcomes.mark(ref, "failed")
        for ref in refs:
            with contextlib.suppress(VmsnapError):
                self.delete(ref)
        raise failure

    # -- finishing, exporting ---------------------------------------------------------------------------

    def finish(self, snap: SnapshotRef, *, timeout: float = 24 * 3600.0) -> None:
        """Wait for a push backup's job to end and close its target; the target file is then complete.

        :raise SnapshotError: the job failed or was cancelled (the target is incomplete; :meth:`delete`
            removes it and gives the bits back to the bitmap)
        """
        if snap.details.get("mode") != "push" or not self.machine.is_running:
            return
        if self._outcomes.state(snap) == "confirmed":
            return
        try:
            push.wait_for_target(self.machine.qmp(), snap, timeout=timeout)
        except SnapshotError:
            self._outcomes.mark(snap, "failed")
            raise
        self._outcomes.mark(snap, "confirmed")
        self._settle(snap)

    def export(self, snap: SnapshotRef) -> AbstractContextManager[ExportSource]:
        """The backup, readable for the body of the ``with``.

        Push: waits for the job (:meth:`finish`), then yields the target qcow2 file (for incrementals its
        backing file is the parent). Pull: adds an NBD export of the snapshot (QEMU's NBD server; for a
        powered-off VM qemu-nbd); for incrementals ``dirty_bitmap`` names the ``qemu:dirty-bitmap:…``
        context that marks the changed blocks; a body that ends without an error confirms the pull backup
        of this disk.

        :raise SnapshotError: the job failed, or the export could not be added
        """
        return self._export(snap)

    @contextlib.contextmanager
    def _export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        if snap.details.get("mode") == "pull":
            with self._serve(snap) as source:
                try:
                    yield source
                except BaseException:
                    self._outcomes.mark(snap, "failed")
                    raise
            self._outcomes.mark(snap, "confirmed")
            self._settle(snap)
            return
        self.finish(snap)
        target = Path(snap.details["target"])
        if not target.exists():
            raise NotFoundError(f"backup target {target} does not exist", hint="was it moved or deleted?")
        yield attrs.evolve(file_source(target, disk=snap.disk, force_share=False), since=since_of(snap))

    def _serve(self, snap: SnapshotRef) -> AbstractContextManager[ExportSource]:
        if snap.details.get("offline"):
            return offline.serve_image(self.machine.runner, snap)
        return export.nbd_export(self.machine.qmp(), snap, self.target_dir, self.machine.runner)

    def abandon(self, snaps: Sequence[SnapshotRef]) -> None:
        """Say, before :meth:`delete`, that these backups were not kept (e.g. their manifest could not be
        written), so the bits of those not yet settled go back to the bitmap."""
        for snap in snaps:
            self._outcomes.mark(snap, "failed")

    # -- delete -------------------------------------------------------------------------------------------

    def delete(self, snap: SnapshotRef) -> None:
        """End the backup of one disk: cancel a job still running, remove the target or fleecing nodes from
        QEMU (and stop the NBD server its export started, when a dead run left it), settle the bitmap, and
        forget the backup (its record file). The target file is removed when the backup is incomplete; a
        complete target is the backup and stays (the caller owns it).

        :raise SnapshotError: QEMU refused to remove a node (the message names it)
        """
        job_result = "unknown"
        if self.machine.is_running and not snap.details.get("offline"):
            qmp = self.machine.qmp()
            try:
                if snap.details.get("mode") == "pull":
                    export.end_export(qmp, snap, self.target_dir, self.machine.runner)
                    fleecing.delete_pull(qmp, snap)
                else:
                    job_result = push.delete_push(qmp, snap)
            except QMPCommandError as err:
                raise SnapshotError(
                    f"cleaning up the backup of disk {snap.disk.name!r} failed: {err.message}",
                    hint="run `vmsnap recover` once QEMU is idle",
                ) from err
        state = self._outcomes.state(snap)
        if state not in ("confirmed", "unknown") or job_result == "failed":
            self._outcomes.mark(snap, "failed")
            if snap.details.get("mode") == "push" and (job_result != "ok" or state == "failed"):
                push.remove_target(snap, self.target_dir)
        self.records.remove(snap.disk.name)
        self._settle(snap)

    def _bitmap_home(self, snap: SnapshotRef) -> BitmapHome | None:
        """Where ``snap``'s disk keeps its bitmaps now; None when they cannot be reached (an image made
        offline that a QEMU now runs on keeps its pending bits until the next backup merges them back)."""
        running = self.machine.is_running
        if snap.details.get("offline"):
            return None if running else offline.image_bitmaps(self.machine.runner, snap.disk)
        return NodeBitmaps(self.machine.qmp(), device_node(snap)) if running else None

    def _settle(self, snap: SnapshotRef) -> None:
        """Drop or give back the bits of ``snap``'s backup once the outcome of all its disks is known."""
        home = self._bitmap_home(snap)
        if home is not None:
            self._outcomes.settle(snap, home, self.bitmap)

    # -- rollback, list -----------------------------------------------------------------------------------

    def rollback(self, snap: SnapshotRef) -> None:
        """Replace the disk's image with the backup's content (the whole chain, made standalone).

        :raise SnapshotError: the VM is running, or the image is in use
        :raise NotFoundError: the backup file is gone
        """
        if self.machine.is_running:
            raise SnapshotError(
                f"cannot roll back disk {snap.disk.name!r} of {self.machine.name} while the VM runs",
                hint="shut the VM down, then roll back on its image files (--image FILE)",
            )
        source = Path(snap.details.get("target") or snap.location)
        if not source.exists():
            raise NotFoundError(
                f"backup {source} does not exist", hint="restore it from the repository first"
            )
        image = snap.disk.file
        runner = self.machine.runner
        try:
            qemu_img.info(runner, image, force_share=False)  # fails while a QEMU holds the image
        except CommandError as err:
            raise SnapshotError(
                f"image {image} is in use or unreadable: {err.message}", hint="stop the VM that uses it"
            ) from err
        partial = image.with_name(f".{image.name}.vmsnap-rollback")
        backup = file_source(source, disk=snap.disk, force_share=False)
        try:
            runner.run(qemu_img.convert_argv(backup, partial, target_format=snap.disk.format), timeout=None)
            os.chmod(partial, image.stat().st_mode & 0o777)
            os.replace(partial, image)
        except (VmsnapError, OSError) as err:
            partial.unlink(missing_ok=True)
            raise SnapshotError(
                f"rollback of {image} from {source} failed: {err}", hint="the image was not changed"
            ) from err

    def list(self) -> Sequence[SnapshotRef]:
        """The backups of this machine's disks that are recorded in ``target_dir`` or still in QEMU (running
        jobs, fleecing graphs a dead run left; those are named after ``target_dir``)."""
        refs: list[SnapshotRef] = []
        qmp = self.machine.qmp() if self.machine.is_running else None
        nodes = qmp.node_names() if qmp is not None else set()
        for disk in self.machine.disks():
            recorded = self.records.ref(disk)
            if recorded is not None:
                refs.append(recorded)
            elif qmp is not None:
                details = self._leftover_details(qmp, nodes, disk)
                if details is not None:
                    refs.append(SnapshotRef(self.name, self.target_dir.name, disk, details=details))
        return refs

    def find(self, name: str) -> Sequence[SnapshotRef]:
        """The backups ``create(..., name=name)`` recorded, and those a run that died before recording them
        left in QEMU (which :meth:`list` names after ``target_dir``, the run's own directory)."""
        return [ref for ref in self.list() if ref.name in (name, self.target_dir.name)]

    def _leftover_details(self, qmp: QMPMonitor, nodes: set[str], disk: Disk) -> dict[str, str] | None:
        """What a run that died before recording its backup of ``disk`` left in QEMU, or None."""
        details = fleecing.leftover_details(qmp, nodes, disk)
        if details is None and target_node(disk.name) in nodes:
            prefix = target_node(disk.name) + "-"
            jobs = [j.id for j in qmp.query_jobs() if j.id.startswith(prefix)]
            details = {"mode": "push", "job": jobs[0] if jobs else "", "node": target_node(disk.name)}
            details["target"] = str(self.planner.target(disk))
        if details is None:
            return None
        details.update({"pending": pending_name(self.bitmap), "bitmap": self.bitmap})
        details.update({"kind": "unknown", "fallback": "", "set": ""})
        return details
