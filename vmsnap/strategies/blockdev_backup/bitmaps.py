"""The dirty bitmaps of the ``backup`` strategy: their states, the actions that park a backup's bits, and
settling those bits once the backup's outcome is known.

How the bits are kept safe
--------------------------

QEMU 7.2 refuses ``completion-mode: grouped`` in a transaction that holds dirty-bitmap actions, so the
bitmap cannot be handed to the jobs and left to QEMU's ``bitmap-mode: on-success``: with one job failing
and another succeeding, one disk's bits would be gone although the backup as a whole failed. Instead, one
transaction (all disks at once) does, per disk::

    block-dirty-bitmap-add    BITMAP.pending (disabled, not persistent)   the bits up to this instant
    block-dirty-bitmap-merge  BITMAP -> BITMAP.pending
    block-dirty-bitmap-clear  BITMAP                                      counts from this instant on
    blockdev-backup           sync=full | sync=bitmap bitmap=BITMAP.pending bitmap-mode=never

(a full backup of a disk whose bitmap is missing, disabled or inconsistent removes the bad one first and
adds a new persistent bitmap in the transaction instead). The pending bits are dropped only when every disk
of the backup succeeded (push: its job completed; pull: its export ended without an error); otherwise they
go back into the bitmap (a bitmap that a failed full backup created is removed), and a pending bitmap left
by a dead process is merged back by the next ``create``. The next incremental backup therefore copies at
least every cluster written since the last backup that succeeded — never less.

Powered-off qcow2 images get the same steps through ``qemu-img bitmap`` (their pending bitmap is kept in
the image: a dead run's bits survive there until the next ``create`` merges them back).

External snapshots: the bitmap is looked up on the disk's active layer only. After an external snapshot
without a bitmap on the new overlay, the next backup falls back to full (with a warning); a strategy that
takes external snapshots keeps the chain by adding the bitmap on the overlay in the same transaction
(:func:`overlay_bitmap_actions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs

from vmsnap.image import qemu_img
from vmsnap.model import Disk, SnapshotRef
from vmsnap.runner import Runner
from vmsnap.vm.qmp import QMPMonitor
from vmsnap.vm.qmp_actions import (
    Action,
    bitmap_add_action,
    bitmap_clear_action,
    bitmap_merge_action,
    bitmap_remove_action,
)

BitmapState = Literal["ok", "missing", "broken"]

PENDING_SUFFIX = ".pending"
"""Suffix of the temporary bitmap that holds a backup's bits until the backup is known to have succeeded."""


def pending_name(bitmap: str) -> str:
    """The pending bitmap that holds ``bitmap``'s bits while a backup runs."""
    return bitmap + PENDING_SUFFIX


def bitmap_state(bitmaps: Sequence[Mapping[str, Any]], name: str) -> tuple[BitmapState, str]:
    """("ok" | "missing" | "broken", why) for bitmap ``name`` among a node's dirty bitmaps (QMP's shape)."""
    for info in bitmaps:
        if info.get("name") != name:
            continue
        if info.get("inconsistent"):
            return "broken", f"bitmap {name!r} is inconsistent (QEMU was not shut down cleanly)"
        if not info.get("recording", True):
            return "broken", f"bitmap {name!r} is disabled (it stopped recording writes)"
        if info.get("busy"):
            return "broken", f"bitmap {name!r} is in use by another job"
        return "ok", ""
    return "missing", f"bitmap {name!r} does not exist (new disk, or QEMU was killed before writing it)"


def overlay_bitmap_actions(overlay_node: str, *, bitmap: str = "vmsnap") -> list[Action]:
    """Transaction actions that give a new external overlay its own persistent bitmap ``bitmap``.

    Put them in the same transaction as ``blockdev-snapshot`` so the incremental chain survives the
    overlay; without them the next backup falls back to full.
    """
    return [bitmap_add_action(overlay_node, bitmap, persistent=True)]


def park_actions(disk: Disk, bitmap: str, state: BitmapState) -> list[Action]:
    """The bitmap actions of one disk in a backup's transaction: with a good bitmap, its bits move to the
    pending bitmap and it counts on from zero; else a new bitmap starts (persistent on qcow2; on raw the
    chain lasts as long as this QEMU)."""
    node = disk.node_name
    if state != "ok":
        return [bitmap_add_action(node, bitmap, persistent=disk.format == "qcow2")]
    pending = pending_name(bitmap)
    return [
        bitmap_add_action(node, pending, persistent=False, disabled=True),
        bitmap_merge_action(node, pending, [bitmap]),
        bitmap_clear_action(node, bitmap),
    ]


# -- where a disk's bitmaps live ------------------------------------------------------------------------


class BitmapHome(Protocol):
    """Where one disk's dirty bitmaps live: a node of a running QEMU, or a powered-off qcow2 image."""

    def infos(self) -> list[dict[str, Any]]:
        """The disk's dirty bitmaps, in QMP's shape (name, recording, inconsistent, busy)."""
        ...

    def remove(self, name: str) -> None:
        """Remove bitmap ``name``."""
        ...

    def merge_back(self, bitmap: str, pending: str) -> None:
        """Add the bits of ``pending`` to ``bitmap`` and remove ``pending``."""
        ...


@attrs.frozen
class NodeBitmaps:
    """The bitmaps of block node ``node`` of a running QEMU."""

    qmp: QMPMonitor
    node: str

    def infos(self) -> list[dict[str, Any]]:
        """``query-named-block-nodes``' dirty bitmaps of the node."""
        return self.qmp.dirty_bitmaps(self.node)

    def remove(self, name: str) -> None:
        """``block-dirty-bitmap-remove``.

        :raise QMPCommandError: QEMU refused
        """
        self.qmp.block_dirty_bitmap_remove(self.node, name)

    def merge_back(self, bitmap: str, pending: str) -> None:
        """Merge and remove in one transaction.

        :raise QMPCommandError: QEMU refused (nothing changed)
        """
        self.qmp.transaction(
            [bitmap_merge_action(self.node, bitmap, [pending]), bitmap_remove_action(self.node, pending)]
        )


@attrs.frozen
class ImageBitmaps:
    """The persistent bitmaps of a qcow2 image that no QEMU holds (changed with ``qemu-img bitmap``)."""

    runner: Runner
    image: Path

    def infos(self) -> list[dict[str, Any]]:
        """``qemu-img info``'s bitmaps in QMP's shape ("auto" flag: recording; "in-use": inconsistent).

        :raise CommandError: the image cannot be read, or a QEMU holds it
        """
        return [
            {
                "name": b.get("name"),
                "recording": "auto" in b.get("flags", []),
                "inconsistent": "in-use" in b.get("flags", []),
            }
            for b in qemu_img.bitmaps(self.runner, self.image)
        ]

    def remove(self, name: str) -> None:
        """``qemu-img bitmap --remove``.

        :raise CommandError: qemu-img refused
        """
        qemu_img.bitmap(self.runner, self.image, name, remove=True)

    def merge_back(self, bitmap: str, pending: str) -> None:
        """Merge, then remove (a crash between the two leaves bits in both: merged again next time).

        :raise CommandError: qemu-img refused
        """
        qemu_img.bitmap(self.runner, self.image, bitmap, merge_from=pending)
        self.remove(pending)

    def park(self, bitmap: str, state: BitmapState) -> None:
        """What :func:`park_actions` does in a transaction, with ``qemu-img bitmap``: a good bitmap's bits
        move to a disabled pending bitmap (first, so a crash leaves them in both); else a new one starts.

        :raise CommandError: qemu-img refused
        """
        if state == "ok":
            qemu_img.bitmap(
                self.runner, self.image, pending_name(bitmap), add=True, merge_from=bitmap, disable=True
            )
            qemu_img.bitmap(self.runner, self.image, bitmap, clear=True)
            return
        if state == "broken":
            self.remove(bitmap)
        qemu_img.bitmap(self.runner, self.image, bitmap, add=True)


def give_back(home: BitmapHome, bitmap: str, *, new_bitmap: bool) -> None:
    """After a failed or unconfirmed backup: return the bits it took to ``bitmap`` (or remove the bitmap
    it created, ``new_bitmap``), and remove the pending bitmap."""
    pending = pending_name(bitmap)
    infos = home.infos()
    names = {b.get("name") for b in infos}
    if new_bitmap:
        if bitmap in names:
            home.remove(bitmap)
    elif pending in names and bitmap_state(infos, bitmap)[0] == "ok":
        home.merge_back(bitmap, pending)
        return
    if pending in names:
        home.remove(pending)


def recover_pending(home: BitmapHome, bitmap: str) -> bool:
    """Merge back the bits a dead run left in a pending bitmap, so no write is ever skipped; True if any."""
    if not any(b.get("name") == pending_name(bitmap) for b in home.infos()):
        return False
    give_back(home, bitmap, new_bitmap=False)
    return True


def drop_pending(home: BitmapHome, pending: str) -> None:
    """Remove ``pending`` (the backup that held its bits succeeded), if it is still there."""
    if pending and any(b.get("name") == pending for b in home.infos()):
        home.remove(pending)


# -- outcomes -------------------------------------------------------------------------------------------


class Outcomes:
    """What became of each disk of the backups one strategy object started ("started", "failed",
    "confirmed"), and the bits that wait until every disk of their backup has an outcome."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, str]] = {}
        self._waiting: dict[str, dict[str, tuple[BitmapHome, str, bool]]] = {}

    def start(self, set_id: str, disks: Iterable[str], state: str = "started") -> None:
        """A backup of ``disks`` began (``state`` "confirmed": its data is complete already)."""
        self._states[set_id] = {disk: state for disk in disks}

    def mark(self, snap: SnapshotRef, state: str) -> None:
        """Record ``snap``'s outcome (a failed disk stays failed)."""
        states = self._states.get(snap.details.get("set", ""))
        if states is not None and snap.disk.name in states:
            if states[snap.disk.name] == "failed" and state != "failed":
                return
            states[snap.disk.name] = state

    def state(self, snap: SnapshotRef) -> str:
        """``snap``'s outcome; "unknown" for a backup another process (or strategy object) started."""
        return self._states.get(snap.details.get("set", ""), {}).get(snap.disk.name, "unknown")

    def settle(self, snap: SnapshotRef, home: BitmapHome, bitmap: str) -> None:
        """Drop or give back the bits of ``snap``'s backup once the outcome of all its disks is known."""
        set_id = snap.details.get("set", "")
        states = self._states.get(set_id)
        if states is None:  # a backup of another process: never drop bits we cannot vouch for
            give_back(home, bitmap, new_bitmap=False)
            return
        waiting = self._waiting.setdefault(set_id, {})
        waiting[snap.disk.name] = (
            home,
            snap.details.get("pending", ""),
            snap.details.get("bitmap_new") == "1",
        )
        known = set(states.values())
        if "failed" in known:
            for where, _pending, new_bitmap in waiting.values():
                give_back(where, bitmap, new_bitmap=new_bitmap)
            waiting.clear()
        elif known == {"confirmed"}:
            for where, pending, _new in waiting.values():
                drop_pending(where, pending)
            waiting.clear()
