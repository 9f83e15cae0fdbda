"""Pull mode of the ``backup`` strategy: fleecing keeps the backup point readable while the guest writes on,
for an NBD client to copy (:mod:`~vmsnap.strategies.blockdev_backup.export` serves it).

Two ways, as QEMU offers them: a copy-before-write filter put above the device's node with a
snapshot-access node on it (QEMU >= 7.0), or a ``blockdev-backup sync=none`` job into a temporary overlay
on the disk's node (older, and for nodes that no guest device uses).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from vmsnap.errors import QMPCommandError, SnapshotError, VmsnapError
from vmsnap.image import qemu_img
from vmsnap.model import Disk, SnapshotRef
from vmsnap.processes import crash_point
from vmsnap.runner import Runner
from vmsnap.strategies.base import paused
from vmsnap.strategies.blockdev_backup.bitmaps import NodeBitmaps, give_back, park_actions
from vmsnap.strategies.blockdev_backup.export import server_dir
from vmsnap.strategies.blockdev_backup.plan import (
    BackupSet,
    DiskPlan,
    backup_failed,
    device_node,
    fleece_nodes,
)
from vmsnap.strategies.blockdev_backup.push import end_job
from vmsnap.strategies.undo import undo_later
from vmsnap.vm.machine import Machine
from vmsnap.vm.qmp import QMPMonitor
from vmsnap.vm.qmp_actions import Action, blockdev_backup_action

Fleecing = Literal["auto", "filter", "job"]


class DriveSwapRefused(SnapshotError):
    """QEMU refused to put the copy-before-write filter above a device's node (the job method may work)."""


def fleece_file(target_dir: Path, disk: Disk) -> Path:
    """The temporary file that keeps the old data of what the guest overwrites during the backup."""
    return target_dir / f"{disk.name}.fleece"


def _make_fleece_file(runner: Runner, path: Path, fmt: str, size: int) -> None:
    qemu_img.create(runner, path, fmt, size)
    if runner.host == "local":
        path.chmod(0o600)
    else:  # QEMU runs on another host: the file is there (Machine.workspace made its directory)
        runner.run(["chmod", "0600", "--", str(path)], timeout=60)


def _bitmap_actions(plans: Sequence[DiskPlan], bitmap: str) -> list[Action]:
    return [action for plan in plans for action in park_actions(plan.disk, bitmap, plan.bitmap_state)]


def _pull_refs(
    plans: Sequence[DiskPlan], backup: BackupSet, target_dir: Path, extra: Mapping[str, Mapping[str, str]]
) -> list[SnapshotRef]:
    refs = []
    for plan in plans:
        fleece = fleece_file(target_dir, plan.disk)
        nbd_dir = str(server_dir(target_dir, plan.disk.name))
        details = {"fleece_file": str(fleece), "nbd_dir": nbd_dir, **extra[plan.disk.name]}
        refs.append(backup.ref(plan, fleece, details))
    return refs


def create_pull(
    machine: Machine, plans: Sequence[DiskPlan], backup: BackupSet, target_dir: Path, fleecing: Fleecing
) -> list[SnapshotRef]:
    """Start fleecing every disk at one instant, the way ``fleecing`` says ("auto": the filter, and the job
    where a device's node cannot be swapped).

    :raise SnapshotError: QEMU refused (nothing is left behind, the disks are on their own nodes)
    """
    if fleecing == "job":
        return pull_by_job(machine, plans, backup, target_dir)
    try:
        return pull_by_filter(machine, plans, backup, target_dir)
    except DriveSwapRefused:
        if fleecing == "filter":
            raise
    return pull_by_job(machine, plans, backup, target_dir)


def pull_by_job(
    machine: Machine, plans: Sequence[DiskPlan], backup: BackupSet, target_dir: Path
) -> list[SnapshotRef]:
    """Fleecing with ``blockdev-backup sync=none`` into an overlay on the disk's node: old data is copied
    into the overlay before the guest overwrites it; the overlay reads as the backup point.

    :raise SnapshotError: QEMU refused (nothing is left behind)
    """
    qmp = machine.qmp()
    extra: dict[str, dict[str, str]] = {}
    try:
        with contextlib.ExitStack() as undo:
            jobs: list[Action] = []
            for plan in plans:
                nodes = fleece_nodes(plan.disk.name)
                fleece = fleece_file(target_dir, plan.disk)
                undo_later(undo, fleece.unlink, True)
                _make_fleece_file(machine.runner, fleece, "qcow2", plan.disk.virtual_size)
                qmp.blockdev_add(
                    {
                        "driver": "qcow2",
                        "node-name": nodes["fleece"],
                        "file": {"driver": "file", "filename": str(fleece)},
                        "backing": plan.disk.node_name,
                    }
                )
                undo_later(undo, qmp.blockdev_del, nodes["fleece"])
                job = f"{nodes['fleece']}-{backup.suffix}"
                jobs.append(
                    blockdev_backup_action(
                        job, device=plan.disk.node_name, target=nodes["fleece"], sync="none"
                    )
                )
                extra[plan.disk.name] = {
                    "fleecing": "job",
                    "fleece": nodes["fleece"],
                    "job": job,
                    "export": nodes["access"],
                    "export_node": nodes["fleece"],
                }
            # jobs and bitmaps: one instant for all disks, no pause needed
            qmp.transaction([*_bitmap_actions(plans, backup.bitmap), *jobs])
            undo.pop_all()
    except VmsnapError as err:
        raise backup_failed(
            "pull backup", backup.disks, err, hint="nothing was changed on the disks; check QEMU's log"
        ) from err
    return _pull_refs(plans, backup, target_dir, extra)


def _devices(qmp: QMPMonitor, plans: Sequence[DiskPlan]) -> dict[str, str]:
    """Disk name → the guest device (qdev) whose active node is the disk's node.

    :raise DriveSwapRefused: a disk is not the active node of a guest device
    """
    qdevs = {b["inserted"].get("node-name"): b.get("qdev") for b in qmp.query_block() if b.get("inserted")}
    devices = {}
    for plan in plans:
        qdev = qdevs.get(plan.disk.node_name)
        if not qdev:
            raise DriveSwapRefused(
                f"disk {plan.disk.name!r} is not the active node of a guest device",
                hint="the copy-before-write filter goes above a device's node; use fleecing='job'",
            )
        devices[plan.disk.name] = str(qdev)
    return devices


def _add_filter(
    qmp: QMPMonitor, runner: Runner, plan: DiskPlan, target_dir: Path, undo: contextlib.ExitStack
) -> None:
    """The fleecing file and the copy-before-write filter that writes old data into it, not yet in use."""
    nodes = fleece_nodes(plan.disk.name)
    fleece = fleece_file(target_dir, plan.disk)
    undo_later(undo, fleece.unlink, True)
    _make_fleece_file(runner, fleece, "raw", plan.disk.virtual_size)
    qmp.blockdev_add({"driver": "file", "node-name": nodes["fleece"], "filename": str(fleece)})
    undo_later(undo, qmp.blockdev_del, nodes["fleece"])
    qmp.blockdev_add(
        {
            "driver": "copy-before-write",
            "node-name": nodes["cbw"],
            "file": plan.disk.node_name,
            "target": nodes["fleece"],
        }
    )
    undo_later(undo, qmp.blockdev_del, nodes["cbw"])


def _swap_in_filter(qmp: QMPMonitor, plan: DiskPlan, qdev: str, undo: contextlib.ExitStack) -> None:
    """Put the device on its copy-before-write filter.

    :raise DriveSwapRefused: QEMU refused
    """
    try:
        qmp.set_device_node(qdev, fleece_nodes(plan.disk.name)["cbw"])
    except QMPCommandError as err:
        raise DriveSwapRefused(
            f"QEMU refused a copy-before-write filter on disk {plan.disk.name!r}: {err.desc}",
            hint="use fleecing='job' (a backup job with sync=none) for this VM",
        ) from err
    undo_later(undo, qmp.set_device_node, qdev, plan.disk.node_name)


def pull_by_filter(
    machine: Machine, plans: Sequence[DiskPlan], backup: BackupSet, target_dir: Path
) -> list[SnapshotRef]:
    """Fleecing with a copy-before-write filter put above each device's node and a snapshot-access node
    on it; the vCPUs are paused while the filters go in, so all disks hold one instant.

    :raise DriveSwapRefused: a device's node cannot be swapped (nothing is left behind)
    :raise SnapshotError: QEMU refused something else (nothing is left behind)
    """
    qmp = machine.qmp()
    devices = _devices(qmp, plans)
    try:
        # undone last first: snapshot-access nodes, the devices back on their nodes, the bits, the filters
        with contextlib.ExitStack() as undo:
            for plan in plans:
                _add_filter(qmp, machine.runner, plan, target_dir, undo)
            # the filters and the bitmap operations must take effect at one instant for all disks
            with paused(machine):
                crash_point("fleecing-paused")  # a dead run leaves the vCPUs paused here
                qmp.transaction(_bitmap_actions(plans, backup.bitmap))
                for plan in plans:
                    home = NodeBitmaps(qmp, plan.disk.node_name)
                    undo_later(undo, give_back, home, backup.bitmap, new_bitmap=plan.bitmap_state != "ok")
                for plan in plans:
                    _swap_in_filter(qmp, plan, devices[plan.disk.name], undo)
            for plan in plans:
                nodes = fleece_nodes(plan.disk.name)
                qmp.blockdev_add(
                    {"driver": "snapshot-access", "node-name": nodes["access"], "file": nodes["cbw"]}
                )
                undo_later(undo, qmp.blockdev_del, nodes["access"])
            undo.pop_all()
    except DriveSwapRefused:
        raise
    except VmsnapError as err:
        raise backup_failed(
            "pull backup", backup.disks, err, hint="the disks are back on their own nodes; check QEMU's log"
        ) from err
    extra = {
        plan.disk.name: {
            **fleece_nodes(plan.disk.name),
            "fleecing": "filter",
            "qdev": devices[plan.disk.name],
            "export": fleece_nodes(plan.disk.name)["access"],
            "export_node": fleece_nodes(plan.disk.name)["access"],
        }
        for plan in plans
    }
    return _pull_refs(plans, backup, target_dir, extra)


def delete_pull(qmp: QMPMonitor, snap: SnapshotRef) -> None:
    """Take a pull backup's fleecing out of QEMU: the snapshot-access node, the device back on its own node,
    the sync=none job, the filter and fleecing nodes, the fleecing file.

    :raise QMPCommandError: QEMU refused to remove a node
    """
    # order matters: while snapshot-access sits on the filter, the filter forbids other writers
    access = snap.details.get("access", "")
    if access and access in qmp.node_names():
        qmp.blockdev_del(access)
    qdev = snap.details.get("qdev", "")
    if qdev and qmp.device_node(qdev) == snap.details.get("cbw", ""):
        qmp.set_device_node(qdev, device_node(snap))
    end_job(qmp, snap.details.get("job", ""))  # the sync=none job runs until cancelled
    nodes = qmp.node_names()
    for key in ("cbw", "fleece"):
        node = snap.details.get(key, "")
        if node and node in nodes:
            qmp.blockdev_del(node)
    if snap.details.get("fleece_file"):
        Path(snap.details["fleece_file"]).unlink(missing_ok=True)


def leftover_details(qmp: QMPMonitor, nodes: set[str], disk: Disk) -> dict[str, Any] | None:
    """The details of a pull backup of ``disk`` that a dead run left in QEMU without a record, or None."""
    flee = fleece_nodes(disk.name)
    if flee["cbw"] not in nodes and flee["fleece"] not in nodes:
        return None
    details: dict[str, Any] = {**flee, "mode": "pull", "qdev": disk.qdev or "", "export": flee["access"]}
    if flee["cbw"] in nodes:
        details["device_node"] = qmp.filter_child(flee["cbw"])
    else:  # fleecing by a sync=none job: the job and its overlay
        prefix = flee["fleece"] + "-"
        jobs = [j.id for j in qmp.query_jobs() if j.id.startswith(prefix)]
        details.update({"device_node": "", "job": jobs[0] if jobs else "", "export_node": flee["fleece"]})
    return details
