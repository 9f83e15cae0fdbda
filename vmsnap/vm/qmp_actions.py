"""The actions of a QMP ``transaction`` (:meth:`vmsnap.vm.qmp.QMPMonitor.transaction`), as typed builders of
the data QEMU takes: all of one transaction's actions take effect at one instant, or none does."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

Action = dict[str, Any]
"""One action of :meth:`QMPMonitor.transaction`: ``{"type": COMMAND, "data": {...}}``."""


def bitmap_add_action(node_name: str, name: str, *, persistent: bool, disabled: bool = False) -> Action:
    """``block-dirty-bitmap-add``: a new dirty bitmap on ``node_name`` (``persistent``: kept in the qcow2
    image; ``disabled``: it records no writes)."""
    data: dict[str, Any] = {"node": node_name, "name": name, "persistent": persistent}
    if disabled:
        data["disabled"] = True
    return {"type": "block-dirty-bitmap-add", "data": data}


def bitmap_merge_action(node_name: str, target: str, sources: Sequence[str]) -> Action:
    """``block-dirty-bitmap-merge``: the bits of ``sources`` are added to bitmap ``target``."""
    return {
        "type": "block-dirty-bitmap-merge",
        "data": {"node": node_name, "target": target, "bitmaps": list(sources)},
    }


def bitmap_clear_action(node_name: str, name: str) -> Action:
    """``block-dirty-bitmap-clear``: bitmap ``name`` starts again from no dirty bits."""
    return {"type": "block-dirty-bitmap-clear", "data": {"node": node_name, "name": name}}


def bitmap_remove_action(node_name: str, name: str) -> Action:
    """``block-dirty-bitmap-remove``: bitmap ``name`` goes (from the image too, when persistent)."""
    return {"type": "block-dirty-bitmap-remove", "data": {"node": node_name, "name": name}}


def blockdev_backup_action(
    job_id: str, *, device: str, target: str, sync: str, bitmap: str | None = None
) -> Action:
    """``blockdev-backup`` of node ``device`` into node ``target``; the job is not dismissed by itself.

    :param sync: "full" (everything), "bitmap" (the clusters ``bitmap`` marks; the job never changes its
        bits: ``bitmap-mode`` "never"), or "none" (only the old data of clusters the guest overwrites:
        fleecing)
    """
    data: dict[str, Any] = {"job-id": job_id, "device": device, "target": target, "auto-dismiss": False}
    if sync == "bitmap":
        data.update({"sync": "bitmap", "bitmap": bitmap, "bitmap-mode": "never"})
    else:
        data["sync"] = sync
    return {"type": "blockdev-backup", "data": data}


def blockdev_snapshot_sync_action(
    node_name: str, *, snapshot_file: str | os.PathLike[str], snapshot_node: str
) -> Action:
    """``blockdev-snapshot-sync``: QEMU creates the qcow2 overlay ``snapshot_file`` (absolute backing path)
    as node ``snapshot_node`` and moves ``node_name``'s users onto it."""
    return {
        "type": "blockdev-snapshot-sync",
        "data": {
            "node-name": node_name,
            "snapshot-file": str(snapshot_file),
            "snapshot-node-name": snapshot_node,
            "format": "qcow2",
            "mode": "absolute-paths",
        },
    }


def blockdev_snapshot_internal_action(node_name: str, name: str) -> Action:
    """``blockdev-snapshot-internal-sync``: internal snapshot ``name`` in the qcow2 image of ``node_name``."""
    return {"type": "blockdev-snapshot-internal-sync", "data": {"device": node_name, "name": name}}
