"""The ``backup`` strategy: QEMU's ``blockdev-backup`` job copies every disk as of one instant into a qcow2
target (push), or a copy-before-write filter serves that instant over NBD (pull); full or incremental.

Incremental backups follow a persistent dirty bitmap per disk. How the bits are kept safe
---------------------------------------------------------------------------------------

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
by a dead process is merged back by the next :meth:`create`. The next incremental backup therefore copies
at least every cluster written since the last backup that succeeded — never less.

What exists is recorded next to each target in a small 0600 file ``.<disk>.vmsnap-backup.json`` (name and
details), so :meth:`list`, :meth:`delete` and :meth:`rollback` work from another process; delete removes it.

External snapshots: the bitmap is looked up on the disk's active layer only. After an external snapshot
without a bitmap on the new overlay, the next backup falls back to full (with a warning); a strategy that
takes external snapshots keeps the chain by adding the bitmap on the overlay in the same transaction
(:func:`overlay_bitmap_actions`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs

from vmsnap.errors import (
    BlockJobError,
    CommandError,
    NotFoundError,
    QMPCommandError,
    SnapshotError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.image import qemu_img
from vmsnap.image.qcow2 import read_header
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.strategies.base import (
    BackupContext,
    Capabilities,
    IncrementalFallbackWarning,
    StrategyBase,
    paused,
)
from vmsnap.vm.machine import Machine
from vmsnap.vm.qmp import QMPMonitor

Mode = Literal["push", "pull"]
Fleecing = Literal["auto", "filter", "job"]
BitmapState = Literal["ok", "missing", "broken"]

PENDING_SUFFIX = ".pending"
"""Suffix of the temporary bitmap that holds a backup's bits until the backup is known to have succeeded."""

SIDECAR_SUFFIX = ".vmsnap-backup.json"
"""``target_dir/.<disk>.vmsnap-backup.json`` records a backup's name and details until it is deleted."""


class _DriveSwapRefused(SnapshotError):
    """QEMU refused to put the copy-before-write filter above a device's node (the job method may work)."""


def _short_id(prefix: str, disk_name: str) -> str:
    """A QEMU node / job id for ``disk_name`` (node names must stay under 32 characters)."""
    digest = hashlib.sha1(disk_name.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{prefix}-{digest}"


def target_node(disk_name: str) -> str:
    """The node name of the push target of ``disk_name`` (one backup per disk at a time)."""
    return _short_id("vbk", disk_name)


def fleece_nodes(disk_name: str) -> dict[str, str]:
    """Pull-mode node names of ``disk_name``: fleecing file, copy-before-write filter, snapshot-access."""
    base = _short_id("vfl", disk_name)
    return {"fleece": f"{base}-tmp", "cbw": f"{base}-cbw", "access": f"{base}-acc"}


def overlay_bitmap_actions(overlay_node: str, *, bitmap: str = "vmsnap") -> list[dict[str, Any]]:
    """Transaction actions that give a new external overlay its own persistent bitmap ``bitmap``.

    Put them in the same transaction as ``blockdev-snapshot`` so the incremental chain survives the
    overlay; without them the next backup falls back to full.
    """
    return [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": overlay_node, "name": bitmap, "persistent": True},
        }
    ]


@attrs.frozen
class _Plan:
    """What create does for one disk."""

    disk: Disk
    target: Path
    parent: Path | None
    bitmap_state: BitmapState
    incremental: bool = False


def _add_push_target(qmp: QMPMonitor, node: str, target: Path) -> None:
    """Open a push target in QEMU, written with O_DIRECT where the filesystem allows it.

    The job's writes then bypass the host's page cache: a large backup no longer evicts what the host and
    the guest need, and the copy ran 1.5-3x faster here (the digest reads the target back afterwards, from
    the disk). A filesystem without O_DIRECT (tmpfs) gets QEMU's default cache instead.
    """
    options: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": str(target), "cache": {"direct": True}},
    }
    try:
        qmp.blockdev_add(options)
    except QMPCommandError:
        del options["file"]["cache"]
        qmp.blockdev_add(options)


def _device_node(snap: SnapshotRef) -> str:
    """The disk's own node (below any fleecing filter), where its bitmaps live."""
    return snap.details.get("device_node") or snap.disk.node_name


def _filter_child(qmp: QMPMonitor, node: str) -> str:
    """The node under filter ``node`` (its "file" child), from QEMU's block graph; "" when unknown."""
    with contextlib.suppress(VmsnapError):
        graph = qmp.execute("x-debug-query-block-graph")
        names = {n["id"]: n.get("name", "") for n in graph.get("nodes", [])}
        ids = {name: node_id for node_id, name in names.items()}
        for edge in graph.get("edges", []):
            if edge.get("parent") == ids.get(node) and edge.get("name") == "file":
                return str(names.get(edge.get("child"), ""))
    return ""


def _bitmap_state(bitmaps: Sequence[Mapping[str, Any]], name: str) -> tuple[BitmapState, str]:
    """("ok" | "missing" | "broken", why) for bitmap ``name`` among a node's dirty bitmaps."""
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


class BlockdevBackupStrategy(StrategyBase):
    """Back up with QEMU's own backup job: pick it for real backups of a running VM, especially incremental.

    The guest runs at full speed while the job copies; only the first write to each not-yet-copied cluster
    pays a read and a write (copy-before-write). Push mode writes ``target_dir/<disk>.qcow2`` itself — the
    target is the backup, on any mounted filesystem; pull mode leaves the copying to an NBD client
    (``nbd`` transport) and exports only the changed blocks' map for incrementals. Incremental backups use a
    persistent dirty bitmap and fall back to full (with :class:`IncrementalFallbackWarning`) whenever the
    bitmap or a parent cannot be trusted. Offline images get a full ``qemu-img convert``.

    :param machine: the VM
    :param target_dir: where push-mode targets (and pull-mode fleecing files) go; made 0700 if missing
    :param incremental: copy only what changed since the last backup (needs ``parents``)
    :param parents: for incrementals, disk name → the previous backup's image of that disk
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
        os_command="qemu-img convert (VM off)",
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
        # per backup (set id): disk name → "started" | "done" | "failed" | "confirmed"
        self._outcomes: dict[str, dict[str, str]] = {}
        # per backup: disk → (node, pending bitmap, bitmap was new), settled once all disks' outcome is known
        self._deferred: dict[str, dict[str, tuple[str, str, bool]]] = {}

    @classmethod
    def for_backup(cls, machine: Machine, context: BackupContext) -> BlockdevBackupStrategy:
        """Push (QEMU writes ``workdir/<disk>.qcow2``) when ``context.push``, else pull (fleecing + NBD);
        incremental from ``context.since`` with the bitmap ``context.tracking``. ``create`` returns as soon
        as the jobs run, so a frozen guest is thawed at once; ``export`` waits for the copy."""
        since = context.since
        return cls(
            machine,
            target_dir=context.workdir,
            incremental=since is not None,
            parents=dict(since.images) if since is not None else None,
            parent_id=since.backup_id if since is not None else None,
            bitmap=context.tracking,
            mode="push" if context.push else "pull",
            wait=False,
        )

    # -- probing and planning -----------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True for qcow2 and raw disks (a running VM's disk needs a node name)."""
        if disk.format not in ("qcow2", "raw"):
            return False
        return bool(disk.node_name) or not self.machine.is_running

    def _target(self, disk: Disk) -> Path:
        return self.target_dir / f"{validate_name(disk.name, 'disk name')}.qcow2"

    def _sidecar(self, disk_name: str) -> Path:
        return self.target_dir / f".{disk_name}{SIDECAR_SUFFIX}"

    def _write_sidecar(self, ref: SnapshotRef) -> None:
        path = self._sidecar(ref.disk.name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"name": ref.name, "details": dict(ref.details)}, out)

    def _read_sidecar(self, disk_name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._sidecar(disk_name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("details"), dict) else None

    @staticmethod
    def _node_state(qmp: QMPMonitor) -> tuple[set[str], dict[str, list[dict[str, Any]]]]:
        """Every node name, and each node's dirty bitmaps (one ``query-named-block-nodes``)."""
        nodes = [n for n in qmp.query_named_block_nodes() if n.get("node-name")]
        return {n["node-name"] for n in nodes}, {
            n["node-name"]: list(n.get("dirty-bitmaps", [])) for n in nodes
        }

    def _parent_problem(self, disk: Disk) -> str:
        parent = self.parents.get(disk.name)
        if parent is None:
            return f"no parent backup was given for disk {disk.name!r}"
        if not parent.exists():
            return f"the parent backup {parent} of disk {disk.name!r} does not exist"
        try:
            size = read_header(parent).virtual_size
        except (OSError, ValueError) as err:
            return f"the parent backup {parent} of disk {disk.name!r} cannot be used: {err}"
        if size != disk.virtual_size:
            return f"the parent backup {parent} has another size than disk {disk.name!r} (resized?)"
        return ""

    def _plan(
        self, bitmaps: Mapping[str, Sequence[Mapping[str, Any]]], disks: Sequence[Disk]
    ) -> tuple[list[_Plan], str]:
        """Per-disk plans and, when an incremental backup must become full, the reason ("" otherwise)."""
        states: dict[str, tuple[BitmapState, str]] = {}
        for disk in disks:
            states[disk.name] = _bitmap_state(bitmaps.get(disk.node_name, []), self.bitmap)
        reason = ""
        if self.incremental:
            for disk in disks:
                state, why = states[disk.name]
                if state != "ok":
                    reason = f"{disk.name}: {why}"
                    break
                problem = self._parent_problem(disk) if self.mode == "push" or self.parents else ""
                if problem:
                    reason = problem
                    break
        incremental = self.incremental and not reason
        plans = [
            _Plan(
                disk=disk,
                target=self._target(disk),
                parent=self.parents.get(disk.name) if incremental else None,
                bitmap_state=states[disk.name][0],
                incremental=incremental,
            )
            for disk in disks
        ]
        return plans, reason

    # -- transaction ----------------------------------------------------------------------------------

    def _actions(self, plan: _Plan, *, job_id: str, device: str | None, target: str | None) -> list[Any]:
        """Bitmap actions (+ the backup job when ``target`` is given) for one disk."""
        node = plan.disk.node_name
        pending = self.bitmap + PENDING_SUFFIX
        actions: list[dict[str, Any]] = []
        if plan.bitmap_state == "ok":
            actions += [
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {"node": node, "name": pending, "persistent": False, "disabled": True},
                },
                {
                    "type": "block-dirty-bitmap-merge",
                    "data": {"node": node, "target": pending, "bitmaps": [self.bitmap]},
                },
                {"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": self.bitmap}},
            ]
        else:
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    # persistent bitmaps need qcow2; on raw the chain lasts as long as this QEMU
                    "data": {"node": node, "name": self.bitmap, "persistent": plan.disk.format == "qcow2"},
                }
            )
        if target is not None:
            data: dict[str, Any] = {
                "job-id": job_id,
                "device": device or node,
                "target": target,
                "auto-dismiss": False,
            }
            if plan.incremental:
                data.update({"sync": "bitmap", "bitmap": pending, "bitmap-mode": "never"})
            else:
                data["sync"] = "full"
            actions.append({"type": "blockdev-backup", "data": data})
        return actions

    def transaction_actions(self, disk: Disk, *, name: str) -> list[Mapping[str, Any]]:
        """The transaction actions that back up ``disk`` into its (already added) push target node.

        :meth:`create` adds the target nodes and runs these for all disks in one transaction; this is for
        callers that combine them with other actions. The kind follows this disk's bitmap alone.
        """
        validate_name(name, "snapshot name")
        plans, _ = self._plan(self._node_state(self.machine.qmp())[1], [disk])
        node = target_node(disk.name)
        return list(
            self._actions(plans[0], job_id=f"{node}-{uuid.uuid4().hex[:8]}", device=None, target=node)
        )

    # -- create -----------------------------------------------------------------------------------------

    def create(self, disks: Sequence[Disk], *, name: str) -> Sequence[SnapshotRef]:
        """Start the backup of all ``disks`` at one instant.

        Push mode returns once every target is complete (with ``wait=False``: as soon as the jobs run, so a
        frozen guest can be thawed at once; the targets are complete when :meth:`finish` returns or
        :meth:`export` is entered). Pull mode sets up fleecing; :meth:`export` serves it over NBD.

        :raise UsageError: bad names, or a target that exists already
        :raise SnapshotError: QEMU refused (nothing is left behind: no node, job or bitmap change)
        :raise UnsupportedError: an incremental backup of a powered-off VM
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
        nodes, bitmaps = self._node_state(qmp)
        self._check_leftovers(nodes, disks)
        if self._recover_pending(qmp, disks, bitmaps):
            nodes, bitmaps = self._node_state(qmp)
        plans, reason = self._plan(bitmaps, disks)
        if reason:
            warnings.warn(
                f"incremental backup not possible ({reason}); taking a full backup of all disks",
                IncrementalFallbackWarning,
                stacklevel=2,
            )
        # a full backup restarts the chain: a broken bitmap goes now, a fresh one is added in the transaction
        for plan in plans:
            if plan.bitmap_state == "broken":
                try:
                    qmp.execute(
                        "block-dirty-bitmap-remove", {"node": plan.disk.node_name, "name": self.bitmap}
                    )
                except QMPCommandError as err:
                    raise SnapshotError(
                        f"the bitmap {self.bitmap!r} of disk {plan.disk.name!r} cannot be reset: {err.desc}",
                        hint="another block job may be using it: wait for it, or run `vmsnap recover`",
                    ) from err
        self.target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        set_id = f"{name}-{uuid.uuid4().hex[:8]}"
        if self.mode == "push":
            return self._create_push(qmp, plans, name=name, set_id=set_id, fallback=reason)
        refs = self._create_pull(qmp, plans, name=name, set_id=set_id, fallback=reason)
        for ref in refs:
            self._write_sidecar(ref)
        self._outcomes[set_id] = {p.disk.name: "started" for p in plans}
        return refs

    def _check_leftovers(self, nodes: set[str], disks: Sequence[Disk]) -> None:
        for disk in disks:
            self._refuse_existing(disk)
            ours = {target_node(disk.name), *fleece_nodes(disk.name).values()}
            if nodes & ours:
                left = ", ".join(sorted(nodes & ours))
                raise SnapshotError(
                    f"a backup of disk {disk.name!r} is still in QEMU (nodes {left})",
                    hint="wait for it to end, or run `vmsnap recover` to remove what a dead run left",
                )

    def _refuse_existing(self, disk: Disk) -> None:
        existing = self._read_sidecar(disk.name)
        if existing is not None or (self.mode == "push" and self._target(disk).exists()):
            what = f"backup {existing['name']!r}" if existing else "a backup"
            raise UsageError(
                f"{what} of disk {disk.name!r} exists already in {self.target_dir}",
                hint="delete it, move it away, or choose an empty target directory",
            )

    def _recover_pending(
        self, qmp: QMPMonitor, disks: Sequence[Disk], bitmaps: Mapping[str, Sequence[Mapping[str, Any]]]
    ) -> bool:
        """Merge back the bits a dead run left in a pending bitmap, so no write is ever skipped."""
        pending = self.bitmap + PENDING_SUFFIX
        found = False
        for disk in disks:
            if any(b.get("name") == pending for b in bitmaps.get(disk.node_name, [])):
                self._undo_bitmap(qmp, disk.node_name, new_bitmap=False)
                found = True
        return found

    def _undo_bitmap(self, qmp: QMPMonitor, node: str, *, new_bitmap: bool) -> None:
        """After a failed or unconfirmed backup: restore the bits it took (or drop the bitmap it created)."""
        pending = self.bitmap + PENDING_SUFFIX
        names = {b.get("name"): b for b in qmp.dirty_bitmaps(node)}
        if new_bitmap:
            if self.bitmap in names:
                qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": self.bitmap})
        elif pending in names:
            state, _ = _bitmap_state(list(names.values()), self.bitmap)
            if state == "ok":
                qmp.transaction(
                    [
                        {
                            "type": "block-dirty-bitmap-merge",
                            "data": {"node": node, "target": self.bitmap, "bitmaps": [pending]},
                        },
                        {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": pending}},
                    ]
                )
                return
        if pending in names:
            qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": pending})

    def _details(self, plan: _Plan, *, set_id: str, fallback: str, disks: Sequence[str]) -> dict[str, str]:
        return {
            "kind": "incremental" if plan.incremental else "full",
            "bitmap": self.bitmap,
            "pending": self.bitmap + PENDING_SUFFIX if plan.bitmap_state == "ok" else "",
            "bitmap_new": "" if plan.bitmap_state == "ok" else "1",
            "target": str(plan.target) if self.mode == "push" else "",
            "parent": str(plan.parent) if plan.parent is not None else "",
            "since": (self.parent_id or "") if plan.incremental else "",
            "fallback": fallback,
            "mode": self.mode,
            "device_node": plan.disk.node_name,
            "set": set_id,
            "disks": ",".join(disks),
        }

    def _create_push(
        self, qmp: QMPMonitor, plans: Sequence[_Plan], *, name: str, set_id: str, fallback: str
    ) -> list[SnapshotRef]:
        runner = self.machine.runner
        names = [p.disk.name for p in plans]
        refs = [
            SnapshotRef(
                strategy=self.name,
                name=name,
                disk=plan.disk,
                location=str(plan.target),
                details={
                    **self._details(plan, set_id=set_id, fallback=fallback, disks=names),
                    "job": f"{target_node(plan.disk.name)}-{set_id.rsplit('-', 1)[-1]}",
                    "node": target_node(plan.disk.name),
                },
            )
            for plan in plans
        ]
        created: list[Path] = []
        added: list[str] = []
        try:
            for plan in plans:
                argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
                if plan.parent is not None:
                    # relative, so the chain can be moved as a whole (repository directories)
                    rel = os.path.relpath(plan.parent.resolve(), plan.target.parent.resolve())
                    argv += ["-b", rel, "-F", "qcow2"]
                created.append(plan.target)
                runner.run([*argv, str(plan.target), str(plan.disk.virtual_size)], timeout=120)
                os.chmod(plan.target, 0o600)
                node = target_node(plan.disk.name)
                _add_push_target(qmp, node, plan.target)
                added.append(node)
            # the records go first: once the jobs run they may fill the target filesystem
            for ref in refs:
                created.append(self._sidecar(ref.disk.name))
                self._write_sidecar(ref)
            actions: list[Any] = []
            for plan, ref in zip(plans, refs, strict=True):
                # a fresh job id per backup: events of an earlier job with the same id may still be queued
                actions += self._actions(
                    plan, job_id=ref.details["job"], device=None, target=ref.details["node"]
                )
            qmp.transaction(actions)
        except (VmsnapError, OSError) as err:
            for node in reversed(added):
                with contextlib.suppress(VmsnapError):
                    qmp.blockdev_del(node)
            for path in created:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            reason = (
                err.message if isinstance(err, VmsnapError) else f"{err.strerror or err} ({err.filename})"
            )
            raise SnapshotError(
                f"backup of {', '.join(names)} could not start: {reason}",
                hint="nothing was changed on the disks; check the target directory and QEMU's log",
            ) from err
        self._outcomes[set_id] = {p.disk.name: "started" for p in plans}
        if self.wait:
            self._finish_all(qmp, refs)
        return refs

    def _finish_all(self, qmp: QMPMonitor, refs: Sequence[SnapshotRef]) -> None:
        """Wait for every job of one backup; if one fails, undo the whole backup and raise."""
        failure: SnapshotError | None = None
        for ref in refs:
            try:
                self.finish(ref)
            except SnapshotError as err:
                failure = failure or err
                break
        if failure is None:
            return
        for ref in refs:
            self._mark(ref, "failed")
        for ref in refs:
            with contextlib.suppress(VmsnapError):
                self.delete(ref)
        raise failure

    # -- pull mode (fleecing) ---------------------------------------------------------------------------

    def _create_pull(
        self, qmp: QMPMonitor, plans: Sequence[_Plan], *, name: str, set_id: str, fallback: str
    ) -> list[SnapshotRef]:
        if self.fleecing == "job":
            return self._pull_by_job(qmp, plans, name=name, set_id=set_id, fallback=fallback)
        try:
            return self._pull_by_filter(qmp, plans, name=name, set_id=set_id, fallback=fallback)
        except _DriveSwapRefused:
            if self.fleecing == "filter":
                raise
        return self._pull_by_job(qmp, plans, name=name, set_id=set_id, fallback=fallback)

    def _pull_refs(
        self,
        plans: Sequence[_Plan],
        *,
        name: str,
        set_id: str,
        fallback: str,
        extra: Mapping[str, dict[str, str]],
    ) -> list[SnapshotRef]:
        names = [p.disk.name for p in plans]
        return [
            SnapshotRef(
                strategy=self.name,
                name=name,
                disk=plan.disk,
                location=str(self.target_dir / f"{plan.disk.name}.fleece"),
                details={
                    **self._details(plan, set_id=set_id, fallback=fallback, disks=names),
                    "fleece_file": str(self.target_dir / f"{plan.disk.name}.fleece"),
                    **extra[plan.disk.name],
                },
            )
            for plan in plans
        ]

    def _pull_by_job(
        self, qmp: QMPMonitor, plans: Sequence[_Plan], *, name: str, set_id: str, fallback: str
    ) -> list[SnapshotRef]:
        """Fleecing with ``blockdev-backup sync=none`` into an overlay on the disk's node: old data is
        copied into the overlay before the guest overwrites it; the overlay reads as the backup point."""
        added: list[str] = []
        files: list[Path] = []
        suffix = set_id.rsplit("-", 1)[-1]
        try:
            actions: list[Any] = []
            for plan in plans:
                node = fleece_nodes(plan.disk.name)["fleece"]
                fleece = self.target_dir / f"{plan.disk.name}.fleece"
                files.append(fleece)
                self.machine.runner.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", str(fleece), str(plan.disk.virtual_size)],
                    timeout=120,
                )
                os.chmod(fleece, 0o600)
                qmp.blockdev_add(
                    {
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {"driver": "file", "filename": str(fleece)},
                        "backing": plan.disk.node_name,
                    }
                )
                added.append(node)
                actions += self._actions(plan, job_id="", device=None, target=None)
                actions.append(
                    {
                        "type": "blockdev-backup",
                        "data": {
                            "job-id": f"{node}-{suffix}",
                            "device": plan.disk.node_name,
                            "target": node,
                            "sync": "none",
                            "auto-dismiss": False,
                        },
                    }
                )
            qmp.transaction(actions)  # jobs and bitmaps: one instant for all disks, no pause needed
        except VmsnapError as err:
            for node in reversed(added):
                with contextlib.suppress(VmsnapError):
                    qmp.blockdev_del(node)
            for path in files:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise SnapshotError(
                f"pull backup of {', '.join(p.disk.name for p in plans)} could not start: {err.message}",
                hint="nothing was changed on the disks; check QEMU's log",
            ) from err
        extra = {}
        for plan in plans:
            nodes = fleece_nodes(plan.disk.name)
            extra[plan.disk.name] = {
                "fleecing": "job",
                "fleece": nodes["fleece"],
                "job": f"{nodes['fleece']}-{suffix}",
                "export": nodes["access"],
                "export_node": nodes["fleece"],
            }
        return self._pull_refs(plans, name=name, set_id=set_id, fallback=fallback, extra=extra)

    def _pull_by_filter(
        self, qmp: QMPMonitor, plans: Sequence[_Plan], *, name: str, set_id: str, fallback: str
    ) -> list[SnapshotRef]:
        """Fleecing with a copy-before-write filter put above each device's node and a snapshot-access node
        on it; the vCPUs are paused while the filters go in, so all disks hold one instant."""
        runner = self.machine.runner
        blocks = {b.get("inserted", {}).get("node-name"): b for b in qmp.query_block() if b.get("inserted")}
        for plan in plans:
            block = blocks.get(plan.disk.node_name)
            if block is None or not block.get("qdev"):
                raise _DriveSwapRefused(
                    f"disk {plan.disk.name!r} is not the active node of a guest device",
                    hint="the copy-before-write filter goes above a device's node; use fleecing='job'",
                )
        added: list[str] = []
        files: list[Path] = []
        swapped: list[tuple[str, str]] = []  # (qdev, original node)
        transacted = False
        try:
            for plan in plans:
                nodes = fleece_nodes(plan.disk.name)
                fleece = self.target_dir / f"{plan.disk.name}.fleece"
                files.append(fleece)
                runner.run(
                    ["qemu-img", "create", "-q", "-f", "raw", str(fleece), str(plan.disk.virtual_size)],
                    timeout=120,
                )
                os.chmod(fleece, 0o600)
                qmp.blockdev_add({"driver": "file", "node-name": nodes["fleece"], "filename": str(fleece)})
                added.append(nodes["fleece"])
                qmp.blockdev_add(
                    {
                        "driver": "copy-before-write",
                        "node-name": nodes["cbw"],
                        "file": plan.disk.node_name,
                        "target": nodes["fleece"],
                    }
                )
                added.append(nodes["cbw"])
            actions: list[Any] = []
            for plan in plans:
                actions += self._actions(plan, job_id="", device=None, target=None)
            # the filters and the bitmap operations must take effect at one instant for all disks
            with paused(self.machine):
                qmp.transaction(actions)
                transacted = True
                for plan in plans:
                    qdev = str(blocks[plan.disk.node_name]["qdev"])
                    try:
                        self._set_drive(qmp, qdev, fleece_nodes(plan.disk.name)["cbw"])
                    except QMPCommandError as err:
                        raise _DriveSwapRefused(
                            f"QEMU refused a copy-before-write filter on disk {plan.disk.name!r}: {err.desc}",
                            hint="use fleecing='job' (a backup job with sync=none) for this VM",
                        ) from err
                    swapped.append((qdev, plan.disk.node_name))
            for plan in plans:
                nodes = fleece_nodes(plan.disk.name)
                qmp.blockdev_add(
                    {"driver": "snapshot-access", "node-name": nodes["access"], "file": nodes["cbw"]}
                )
                added.append(nodes["access"])
        except VmsnapError as err:
            # order matters: snapshot-access first, then the devices back on their nodes, then the filters
            for node in [n for n in added if n.endswith("-acc")]:
                with contextlib.suppress(VmsnapError):
                    qmp.blockdev_del(node)
                added.remove(node)
            for qdev, original in reversed(swapped):
                with contextlib.suppress(VmsnapError):
                    self._set_drive(qmp, qdev, original)
            if transacted:  # give the bits back
                for plan in plans:
                    with contextlib.suppress(VmsnapError):
                        self._undo_bitmap(qmp, plan.disk.node_name, new_bitmap=plan.bitmap_state != "ok")
            for node in reversed(added):
                with contextlib.suppress(VmsnapError):
                    qmp.blockdev_del(node)
            for path in files:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if isinstance(err, _DriveSwapRefused):
                raise
            raise SnapshotError(
                f"pull backup of {', '.join(p.disk.name for p in plans)} could not start: {err.message}",
                hint="the disks are back on their own nodes; check QEMU's log",
            ) from err
        extra = {}
        for plan in plans:
            nodes = fleece_nodes(plan.disk.name)
            extra[plan.disk.name] = {
                **nodes,
                "fleecing": "filter",
                "qdev": str(blocks[plan.disk.node_name]["qdev"]),
                "export": nodes["access"],
                "export_node": nodes["access"],
            }
        return self._pull_refs(plans, name=name, set_id=set_id, fallback=fallback, extra=extra)

    @staticmethod
    def _drive_of(qmp: QMPMonitor, qdev: str) -> str | None:
        for block in qmp.query_block():
            if block.get("qdev") == qdev and block.get("inserted"):
                return str(block["inserted"].get("node-name"))
        return None

    def _set_drive(self, qmp: QMPMonitor, qdev: str, node: str) -> None:
        # qom-set of a device's drive to the node it already has aborts QEMU 7.2: look first
        if self._drive_of(qmp, qdev) == node:
            return
        qmp.execute("qom-set", {"path": qdev, "property": "drive", "value": node})

    # -- offline ------------------------------------------------------------------------------------------

    def _create_offline(self, disks: Sequence[Disk], *, name: str) -> list[SnapshotRef]:
        if self.incremental:
            raise UnsupportedError(
                f"incremental backups of the powered-off VM {self.machine.name} are not supported",
                hint="take a full backup (drop --incremental), or start the VM and back it up running",
            )
        if self.mode == "pull":
            raise UnsupportedError(
                "pull mode needs a running VM", hint="use mode='push', or the internal strategy with nbd"
            )
        runner = self.machine.runner
        for disk in disks:
            self._refuse_existing(disk)
        self.target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        set_id = f"{name}-{uuid.uuid4().hex[:8]}"
        refs: list[SnapshotRef] = []
        done: list[Path] = []
        try:
            for disk in disks:
                target = self._target(disk)
                done.append(target)
                runner.run(
                    ["qemu-img", "convert", "-f", disk.format, "-O", "qcow2", str(disk.file), str(target)],
                    timeout=None,
                )
                os.chmod(target, 0o600)
        except VmsnapError as err:
            for path in done:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise SnapshotError(
                f"offline backup of {', '.join(d.name for d in disks)} failed: {err.message}",
                hint="is an image in use by a running QEMU, or the target filesystem full?",
            ) from err
        # restart the chain: a fresh persistent bitmap from this point, for online incrementals later
        for disk in disks:
            if disk.format == "qcow2":
                self._reset_offline_bitmap(disk)
        names = [d.name for d in disks]
        for disk in disks:
            plan = _Plan(disk=disk, target=self._target(disk), parent=None, bitmap_state="missing")
            refs.append(
                SnapshotRef(
                    strategy=self.name,
                    name=name,
                    disk=disk,
                    location=str(plan.target),
                    details={**self._details(plan, set_id=set_id, fallback="", disks=names), "pending": ""},
                )
            )
        for ref in refs:
            self._write_sidecar(ref)
        self._outcomes[set_id] = {d.name: "confirmed" for d in disks}
        return refs

    def _reset_offline_bitmap(self, disk: Disk) -> None:
        runner = self.machine.runner
        info = qemu_img.info(runner, disk.file, force_share=False)
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        for bitmap in bitmaps:
            if bitmap.get("name") in (self.bitmap, self.bitmap + PENDING_SUFFIX):
                runner.run(["qemu-img", "bitmap", "--remove", str(disk.file), bitmap["name"]], timeout=120)
        runner.run(["qemu-img", "bitmap", "--add", str(disk.file), self.bitmap], timeout=120)

    # -- finishing, exporting ---------------------------------------------------------------------------

    def _mark(self, snap: SnapshotRef, state: str) -> None:
        outcome = self._outcomes.get(snap.details.get("set", ""))
        if outcome is not None and snap.disk.name in outcome:
            if outcome[snap.disk.name] == "failed" and state != "failed":
                return
            outcome[snap.disk.name] = state

    def _state(self, snap: SnapshotRef) -> str:
        return self._outcomes.get(snap.details.get("set", ""), {}).get(snap.disk.name, "unknown")

    def finish(self, snap: SnapshotRef, *, timeout: float = 24 * 3600.0) -> None:
        """Wait for a push backup's job to end and close its target; the target file is then complete.

        :raise SnapshotError: the job failed or was cancelled (the target is incomplete; :meth:`delete`
            removes it and gives the bits back to the bitmap)
        """
        if snap.details.get("mode") != "push" or not self.machine.is_running:
            return
        if self._state(snap) == "confirmed":
            return
        qmp = self.machine.qmp()
        job = snap.details.get("job", "")
        try:
            if qmp.job(job) is not None:
                qmp.wait_job(job, timeout=timeout)
            else:
                raise SnapshotError(
                    f"backup job {job} of disk {snap.disk.name!r} is gone; its result is unknown",
                    hint="delete this backup and take a new one",
                )
        except BlockJobError as err:
            self._mark(snap, "failed")
            raise SnapshotError(
                f"backup of disk {snap.disk.name!r} failed: {err.message}",
                hint="the target is incomplete; delete it, check free space and QEMU's log, and retry",
            ) from err
        node = snap.details.get("node", "")
        if node in qmp.node_names():
            qmp.blockdev_del(node)  # closes (and flushes) the target
        self._mark(snap, "confirmed")
        self._settle(qmp, snap)

    def export(self, snap: SnapshotRef) -> AbstractContextManager[ExportSource]:
        """The backup, readable for the body of the ``with``.

        Push: waits for the job (:meth:`finish`), then yields the target qcow2 file (for incrementals its
        backing file is the parent). Pull: adds an NBD export of the snapshot; for incrementals
        ``dirty_bitmap`` names the ``qemu:dirty-bitmap:…`` context that marks the changed blocks; a body
        that ends without an error confirms the pull backup of this disk.

        :raise SnapshotError: the job failed, or the export could not be added
        """
        return self._export(snap)

    @contextlib.contextmanager
    def _export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        if snap.details.get("mode") == "pull":
            with self._nbd_export(snap) as source:
                yield source
            self._mark(snap, "confirmed")
            if self.machine.is_running:
                self._settle(self.machine.qmp(), snap)
            return
        self.finish(snap)
        target = Path(snap.details["target"])
        if not target.exists():
            raise NotFoundError(f"backup target {target} does not exist", hint="was it moved or deleted?")
        yield ExportSource(
            kind="file",
            location=str(target),
            format="qcow2",
            disk=snap.disk,
            virtual_size=snap.disk.virtual_size,
            since=snap.details.get("since") or None if snap.details.get("kind") == "incremental" else None,
        )

    @contextlib.contextmanager
    def _nbd_export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        qmp = self.machine.qmp()
        export_id = snap.details["export"]
        arguments: dict[str, Any] = {
            "type": "nbd",
            "id": export_id,
            "node-name": snap.details.get("export_node") or snap.details["access"],
            "name": snap.disk.name,
            "writable": False,
        }
        pending = snap.details.get("pending", "")
        incremental = snap.details.get("kind") == "incremental"
        if incremental:
            arguments["bitmaps"] = [{"node": _device_node(snap), "name": pending}]
        socket_dir = Path(tempfile.mkdtemp(prefix="vmsnap-nbd-"))  # 0700: only we reach the socket
        socket = socket_dir / "nbd.sock"
        try:
            qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket)}}})
        except QMPCommandError as err:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise SnapshotError(
                f"cannot start QEMU's NBD server for disk {snap.disk.name!r}: {err.desc}",
                hint="export one disk at a time (QEMU runs one NBD server), or stop the other NBD server",
            ) from err
        try:
            qmp.execute("block-export-add", arguments)
        except QMPCommandError as err:
            self._stop_server(qmp, socket_dir)
            raise SnapshotError(
                f"cannot export the backup of disk {snap.disk.name!r} over NBD: {err.desc}",
                hint="is another export of this disk still open?",
            ) from err
        try:
            yield ExportSource(
                kind="nbd",
                location=f"nbd+unix:///{snap.disk.name}?socket={socket}",
                format="raw",
                disk=snap.disk,
                virtual_size=snap.disk.virtual_size,
                dirty_bitmap=f"qemu:dirty-bitmap:{pending}" if incremental else None,
                since=snap.details.get("since") or None if incremental else None,
            )
        except BaseException:
            self._mark(snap, "failed")
            raise
        finally:
            self._del_export(qmp, export_id)
            self._stop_server(qmp, socket_dir)

    @staticmethod
    def _stop_server(qmp: QMPMonitor, socket_dir: Path) -> None:
        with contextlib.suppress(QMPCommandError):
            qmp.execute("nbd-server-stop")
        shutil.rmtree(socket_dir, ignore_errors=True)

    @staticmethod
    def _del_export(qmp: QMPMonitor, export_id: str) -> None:
        exports = {e.get("id") for e in qmp.execute("query-block-exports")}
        if not export_id or export_id not in exports:
            return
        qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
        with contextlib.suppress(VmsnapError):
            qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": export_id}, timeout=30)

    def abandon(self, snaps: Sequence[SnapshotRef]) -> None:
        """Say, before :meth:`delete`, that these backups were not kept (e.g. their manifest could not be
        written), so the bits of those not yet settled go back to the bitmap."""
        for snap in snaps:
            self._mark(snap, "failed")

    # -- delete -------------------------------------------------------------------------------------------

    def delete(self, snap: SnapshotRef) -> None:
        """End the backup of one disk: cancel a job still running, remove the target or fleecing nodes from
        QEMU, settle the bitmap, and forget the backup (its record file). The target file is removed when
        the backup is incomplete; a complete target is the backup and stays (the caller owns it).

        :raise SnapshotError: QEMU refused to remove a node (the message names it)
        """
        job_result = "unknown"
        if self.machine.is_running:
            qmp = self.machine.qmp()
            try:
                if snap.details.get("mode") == "pull":
                    self._delete_pull(qmp, snap)
                else:
                    job_result = self._delete_push(qmp, snap)
            except QMPCommandError as err:
                raise SnapshotError(
                    f"cleaning up the backup of disk {snap.disk.name!r} failed: {err.message}",
                    hint="run `vmsnap recover` once QEMU is idle",
                ) from err
        state = self._state(snap)
        if state not in ("confirmed", "unknown") or job_result == "failed":
            self._mark(snap, "failed")
            if snap.details.get("mode") == "push" and (job_result != "ok" or state == "failed"):
                self._remove_target(snap)
        with contextlib.suppress(FileNotFoundError):
            self._sidecar(snap.disk.name).unlink()
        if self.machine.is_running:
            self._settle(self.machine.qmp(), snap)

    def _settle(self, qmp: QMPMonitor, snap: SnapshotRef) -> None:
        """Drop or give back the bits of ``snap``'s backup once the outcome of all its disks is known."""
        set_id = snap.details.get("set", "")
        entry = (_device_node(snap), snap.details.get("pending", ""), snap.details.get("bitmap_new") == "1")
        outcome = self._outcomes.get(set_id)
        if outcome is None:  # a backup of another process: never drop bits we cannot vouch for
            self._undo_bitmap(qmp, entry[0], new_bitmap=False)
            return
        waiting = self._deferred.setdefault(set_id, {})
        waiting[snap.disk.name] = entry
        states = set(outcome.values())
        if "failed" in states:
            for node, _pending, new_bitmap in waiting.values():
                self._undo_bitmap(qmp, node, new_bitmap=new_bitmap)
            waiting.clear()
        elif states == {"confirmed"}:
            for node, pending, _new in waiting.values():
                if pending and any(b.get("name") == pending for b in qmp.dirty_bitmaps(node)):
                    qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": pending})
            waiting.clear()

    def _delete_push(self, qmp: QMPMonitor, snap: SnapshotRef) -> str:
        """Cancel or reap the job and close the target node; the job's result: "ok", "failed", "unknown"."""
        job = snap.details.get("job", "")
        info = qmp.job(job) if job else None
        result = "unknown"
        if info is not None:
            if info.status != "concluded":
                with contextlib.suppress(QMPCommandError):
                    qmp.execute("job-cancel", {"id": job})
                result = "failed"
            try:
                qmp.wait_job(job, timeout=60)
                if result == "unknown":
                    result = "ok"
            except BlockJobError:
                result = "failed"
        node = snap.details.get("node", "")
        if node and node in qmp.node_names():
            qmp.blockdev_del(node)
        return result

    def _delete_pull(self, qmp: QMPMonitor, snap: SnapshotRef) -> None:
        self._del_export(qmp, snap.details.get("export", ""))
        # order matters: while snapshot-access sits on the filter, the filter forbids other writers
        access = snap.details.get("access", "")
        if access and access in qmp.node_names():
            qmp.blockdev_del(access)
        qdev = snap.details.get("qdev", "")
        cbw = snap.details.get("cbw", "")
        if qdev and self._drive_of(qmp, qdev) == cbw:
            self._set_drive(qmp, qdev, _device_node(snap))
        job = snap.details.get("job", "")
        if job and qmp.job(job) is not None:  # the sync=none job runs until cancelled
            with contextlib.suppress(QMPCommandError):
                qmp.execute("job-cancel", {"id": job})
            with contextlib.suppress(BlockJobError):
                qmp.wait_job(job, timeout=60)
        nodes = qmp.node_names()
        for key in ("cbw", "fleece"):
            node = snap.details.get(key, "")
            if node and node in nodes:
                qmp.blockdev_del(node)
        fleece_file = snap.details.get("fleece_file", "")
        if fleece_file:
            with contextlib.suppress(FileNotFoundError):
                Path(fleece_file).unlink()

    def _remove_target(self, snap: SnapshotRef) -> None:
        target = snap.details.get("target", "")
        if not target:
            return
        path = Path(target)
        if path.parent.resolve() == self.target_dir.resolve():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

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
        try:
            runner.run(
                ["qemu-img", "convert", "-O", snap.disk.format, str(source), str(partial)], timeout=None
            )
            os.chmod(partial, image.stat().st_mode & 0o777)
            os.replace(partial, image)
        except (VmsnapError, OSError) as err:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
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
            record = self._read_sidecar(disk.name)
            if record is not None:
                refs.append(
                    SnapshotRef(
                        strategy=self.name,
                        name=str(record["name"]),
                        disk=disk,
                        location=str(record["details"].get("target", "")),
                        details={str(k): str(v) for k, v in record["details"].items()},
                    )
                )
                continue
            flee = fleece_nodes(disk.name)
            if flee["cbw"] in nodes or flee["fleece"] in nodes:
                details = {**flee, "mode": "pull", "qdev": disk.qdev or "", "export": flee["access"]}
                cbw_up = qmp is not None and flee["cbw"] in nodes
                details["device_node"] = _filter_child(qmp, flee["cbw"]) if qmp is not None and cbw_up else ""
                if not cbw_up:  # fleecing by a sync=none job: the job and its overlay
                    prefix = flee["fleece"] + "-"
                    jobs = (
                        [j.id for j in qmp.query_jobs() if j.id.startswith(prefix)] if qmp is not None else []
                    )
                    details.update({"job": jobs[0] if jobs else "", "export_node": flee["fleece"]})
                details["pending"] = self.bitmap + PENDING_SUFFIX
            elif target_node(disk.name) in nodes:
                prefix = target_node(disk.name) + "-"
                jobs = [j.id for j in qmp.query_jobs() if j.id.startswith(prefix)] if qmp is not None else []
                details = {"mode": "push", "job": jobs[0] if jobs else "", "node": target_node(disk.name)}
                details.update({"pending": self.bitmap + PENDING_SUFFIX, "target": str(self._target(disk))})
            else:
                continue
            details.update({"bitmap": self.bitmap, "kind": "unknown", "fallback": "", "set": ""})
            refs.append(
                SnapshotRef(strategy=self.name, name=self.target_dir.name, disk=disk, details=details)
            )
        return refs
