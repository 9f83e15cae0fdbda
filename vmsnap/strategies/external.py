"""The ``external`` strategy: a qcow2 overlay per disk takes the new writes, so the layer below is frozen.

Online, ``blockdev-snapshot-sync`` for all disks in one transaction and ``block-commit``/``block-stream`` to
merge; offline, ``qemu-img create -b`` / ``qemu-img commit`` with the image's own path kept as the top layer.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
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
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, validate_name
from vmsnap.strategies.base import Capabilities, StrategyBase, distinct_names, file_source
from vmsnap.strategies.undo import undo_later
from vmsnap.vm.machine import Machine
from vmsnap.vm.qmp_actions import blockdev_snapshot_sync_action

OVERLAY_MARK = ".vmsnap-"
"""Overlay files are ``<image>.vmsnap-<snapshot>.qcow2`` next to the image they cover."""

_OVERLAY_RE = re.compile(r"^(?P<base>.+)\.vmsnap-(?P<name>[A-Za-z0-9][A-Za-z0-9_.+-]*)\.qcow2$")


def overlay_path(image: Path, snapshot: str) -> Path:
    """The overlay file of ``snapshot`` on ``image``: ``<image>.vmsnap-<snapshot>.qcow2``, next to it.

    :raise UsageError: the snapshot name cannot be part of a file name
    """
    validate_name(snapshot, "snapshot name")
    return image.with_name(f"{image.name}{OVERLAY_MARK}{snapshot}.qcow2")


def parse_overlay_path(path: Path) -> tuple[Path, str] | None:
    """``(image, snapshot)`` for a path made by :func:`overlay_path`, else None."""
    match = _OVERLAY_RE.match(path.name)
    if match is None:
        return None
    return path.with_name(match["base"]), match["name"]


Merge = Literal["auto", "commit", "stream"]


@attrs.frozen
class _Layer:
    """One snapshot found in a disk's chain.

    ``upper`` takes the writes made after the snapshot; ``lower`` holds the snapshot's content (with its
    own backing files). Online-made overlays are the upper file; offline-made snapshots keep the image's
    path on top, so their vmsnap file is the lower one.
    """

    name: str
    vmsnap_file: Path
    upper: Path
    lower: Path
    orphan: bool = False


def root_image(path: Path) -> Path:
    """The user's image a vmsnap overlay belongs to (``a.qcow2.vmsnap-s.qcow2`` → ``a.qcow2``)."""
    parsed = parse_overlay_path(path)
    while parsed is not None:
        path = parsed[0]
        parsed = parse_overlay_path(path)
    return path


def _node_name(disk: Disk, snapshot: str) -> str:
    digest = hashlib.sha256(f"{disk.file}\0{snapshot}".encode()).hexdigest()[:16]
    return f"vmsnap-{digest}"  # node names are limited to 31 characters


class ExternalOverlayStrategy(StrategyBase):
    """Snapshots as qcow2 overlay files: the disk's current image turns read-only and an overlay next to it
    (``<image>.vmsnap-<name>.qcow2``) takes the writes until the snapshot is deleted (merged back).

    Pick it to back up a running VM whose disks may be raw or qcow2, with no cost while the snapshot exists
    beyond allocating new clusters in the overlay, and a backup that is a plain file copy of the frozen
    image. Deleting it copies the overlay's data back (``block-commit``; ``block-stream`` pulls the other
    way), so keep snapshots short-lived on write-heavy VMs. Rollback drops the overlay with the VM off; a
    running VM is never rolled back under its guest (its page cache would no longer match the disk).

    :param machine: the VM (running: QMP; offline: qemu-img, with the image's path kept on top)
    :param merge: how delete merges online: "commit" the overlay into the image (the VM stays on its
        image), "stream" the image into the overlay (the VM stays on the overlay file, as ``virsh
        blockpull`` does), or "auto": commit when the overlay is under half allocated, else stream
    :param job_timeout: seconds a commit / stream job may take
    """

    name: ClassVar[str] = "external"
    traits: ClassVar[Traits] = Traits(
        qemu_command="blockdev-snapshot-sync (one transaction); block-commit + job-complete / block-stream",
        libvirt_command="virsh snapshot-create-as --disk-only; virsh blockcommit --active --pivot",
        os_command="qemu-img create -f qcow2 -b IMAGE; qemu-img commit",
        snapshot_is="a separate overlay file; the image below turns read-only",
        scope="one VM",
        technology="qcow2 backing chain",
        copy_out="copy the read-only image below the overlay (copy)",
        write_cost="first write to each cluster allocates it in the overlay (no copy of old data)",
        delete_cost="merge: block-commit copies the overlay's data into the image",
        rollback_cost="none: drop the overlay (VM off)",
    )
    capabilities: ClassVar[Capabilities] = Capabilities(instant="transaction", online=True, offline=True)

    def __init__(self, machine: Machine, *, merge: Merge = "auto", job_timeout: float = 3600.0) -> None:
        if merge not in ("auto", "commit", "stream"):
            raise UsageError(f"unknown merge mode {merge!r}", hint="use 'auto', 'commit' or 'stream'")
        self.machine = machine
        self.runner = machine.runner
        self.merge = merge
        self.job_timeout = job_timeout

    # -- finding snapshots ------------------------------------------------------------------------

    def probe(self, disk: Disk) -> bool:
        """True for writable file disks (raw or qcow2 online; qcow2 offline)."""
        if disk.read_only or disk.format not in ("qcow2", "raw"):
            return False
        return self.machine.is_running or disk.format == "qcow2"

    def _layers(self, disk: Disk) -> builtins.list[_Layer]:
        chain = [disk.file, *disk.backing_chain]
        root = root_image(disk.file)
        root_at = chain.index(root) if root in chain else len(chain)
        layers: list[_Layer] = []
        for i, path in enumerate(chain):
            parsed = parse_overlay_path(path)
            if parsed is None:
                continue
            if i < root_at and i + 1 < len(chain):  # an overlay above the image: made online
                layers.append(_Layer(parsed[1], path, upper=path, lower=chain[i + 1]))
            elif i > root_at:  # a frozen layer below the image: made offline
                layers.append(_Layer(parsed[1], path, upper=chain[i - 1], lower=path))
        if not self.machine.is_running and disk.file == root:
            layers = self._orphans(root) + layers
        return layers

    def _orphans(self, image: Path) -> builtins.list[_Layer]:
        """Overlays made online whose VM was shut down while on them: they back onto ``image`` (or onto
        each other) but the offline machine names ``image``. Newest first, like the chain."""
        pattern = f"{_glob_escape(image.name)}{OVERLAY_MARK}*.qcow2"
        found = self.runner.run(
            ["find", str(image.parent), "-maxdepth", "1", "-type", "f", "-name", pattern], timeout=60
        ).stdout.split("\n")
        backing: dict[Path, Path] = {}
        for line in found:
            if not line.strip():
                continue
            path = Path(line.strip())
            parent = qemu_img.info(self.runner, path).get("full-backing-filename")
            if parent:
                backing[path] = Path(str(parent))
        layers: list[_Layer] = []
        current = image
        while True:
            above = [p for p, b in backing.items() if b == current and parse_overlay_path(p) is not None]
            if len(above) != 1:
                break
            path = above[0]
            parsed = parse_overlay_path(path)
            assert parsed is not None
            layers.insert(0, _Layer(parsed[1], path, upper=path, lower=current, orphan=True))
            current = path
        return layers

    def _ref(self, disk: Disk, layer: _Layer) -> SnapshotRef:
        return SnapshotRef(
            strategy=self.name,
            name=layer.name,
            disk=disk,
            location=str(layer.vmsnap_file),
            details={"upper": str(layer.upper), "lower": str(layer.lower), "orphan": str(layer.orphan)},
        )

    def list(self) -> builtins.list[SnapshotRef]:
        """The snapshots on the machine's disks: overlays in their chains (and, offline, overlays left by
        a VM shut down while it ran on them), oldest first per disk."""
        refs: list[SnapshotRef] = []
        for disk in self.machine.disks():
            refs.extend(self._ref(disk, layer) for layer in reversed(self._layers(disk)))
        return refs

    def _find(self, snap: SnapshotRef) -> tuple[Disk, _Layer]:
        root = root_image(Path(snap.location)) if snap.location else root_image(snap.disk.file)
        for disk in self.machine.disks():
            if root_image(disk.file) != root and disk.name != snap.disk.name:
                continue
            for layer in self._layers(disk):
                if layer.name == snap.name:
                    return disk, layer
        raise NotFoundError(
            f"disk {snap.disk.name} has no external snapshot {snap.name!r}",
            hint="list them with `vmsnap snapshot list --strategy external`",
        )

    # -- create -----------------------------------------------------------------------------------

    def transaction_actions(self, disk: Disk, *, name: str) -> builtins.list[Mapping[str, Any]]:
        """One ``blockdev-snapshot-sync`` action: QEMU creates the overlay file and switches the disk."""
        overlay = overlay_path(root_image(disk.file), name)
        return [
            blockdev_snapshot_sync_action(
                disk.node_name, snapshot_file=overlay, snapshot_node=_node_name(disk, name)
            )
        ]

    def create(self, disks: Sequence[Disk], *, name: str) -> builtins.list[SnapshotRef]:
        """Put an overlay on every disk at one instant (one transaction online; offline one disk after the
        other, undoing the earlier ones when a later one fails).

        :raise UsageError: bad name, no disks
        :raise UnsupportedError: offline raw image, or an overlay left from an earlier run
        :raise SnapshotError: the name exists on a disk, or QEMU / qemu-img failed (nothing is left behind)
        """
        validate_name(name, "snapshot name")
        if OVERLAY_MARK in f".{name}":
            raise UsageError(f"invalid snapshot name {name!r}", hint="it may not contain 'vmsnap-'")
        if not disks:
            raise UsageError("no disks to snapshot", hint="name at least one disk")
        distinct_names(disks)
        for disk in disks:
            if disk.format not in ("qcow2", "raw") or disk.read_only:
                what = f"{disk.format}, read-only" if disk.read_only else disk.format
                raise UnsupportedError(
                    f"disk {disk.name} ({disk.file}) is {what}",
                    hint="external snapshots need a writable raw or qcow2 disk",
                )
            target = overlay_path(root_image(disk.file), name)
            existing = {layer.name for layer in self._layers(disk)} if disk.file.exists() else set()
            if name in existing:
                raise SnapshotError(
                    f"disk {disk.name} already has an external snapshot named {name!r}",
                    hint="choose another name, or delete it first (vmsnap snapshot delete)",
                )
            if self._exists(target):
                raise SnapshotError(
                    f"{target} exists but is not an overlay of disk {disk.name} (snapshot {name!r})",
                    hint="it is left from an earlier run: inspect it, then remove it or run `vmsnap recover`",
                )
        if self.machine.is_running:
            return self._create_online(disks, name)
        return self._create_offline(disks, name)

    def _exists(self, path: Path) -> bool:
        return self.runner.run(["test", "-e", str(path)], ok_codes=(0, 1), timeout=30).exit_code == 0

    def _rm(self, path: Path) -> None:
        self.runner.run(["rm", "-f", "--", str(path)], timeout=60)

    def _create_online(self, disks: Sequence[Disk], name: str) -> builtins.list[SnapshotRef]:
        actions = [a for disk in disks for a in self.transaction_actions(disk, name=name)]
        targets = [overlay_path(root_image(d.file), name) for d in disks]
        try:
            self.machine.qmp().transaction(actions)
        except QMPCommandError as err:
            for target in targets:  # QEMU created the files before an action failed; nothing uses them
                self._rm(target)
            raise SnapshotError(
                f"external snapshot {name!r} of {', '.join(d.name for d in disks)} failed: {err.desc}",
                hint="no disk was changed (the transaction is atomic); fix the cause and retry",
            ) from err
        refs: list[SnapshotRef] = []
        with contextlib.ExitStack() as undo:
            # never leave the VM on a growing overlay: every new overlay is merged back before raising
            for disk, target in zip(disks, targets, strict=True):
                undo_later(undo, self._merge_back, disk, name, target)
            try:
                for disk, target in zip(disks, targets, strict=True):
                    self.runner.run(["chmod", f"--reference={disk.file}", "--", str(target)], timeout=30)
                    refs.append(self._ref(disk, _Layer(name, target, upper=target, lower=disk.file)))
            except VmsnapError as err:
                raise SnapshotError(
                    f"external snapshot {name!r} failed after the overlays were made: {err}",
                    hint="the overlays were merged back; fix the cause and retry",
                ) from err
            undo.pop_all()
        return refs

    def _merge_back(self, disk: Disk, name: str, overlay: Path) -> None:
        current, layer = self._find(SnapshotRef(self.name, name, disk, location=str(overlay)))
        self._delete_online(current, layer, "commit")

    def _create_offline(self, disks: Sequence[Disk], name: str) -> builtins.list[SnapshotRef]:
        try:
            with contextlib.ExitStack() as undo:
                refs = [self._freeze_offline(disk, name, undo) for disk in disks]
                undo.pop_all()
        except UnsupportedError:
            raise
        except VmsnapError as err:
            raise SnapshotError(
                f"offline external snapshot {name!r} failed: {err}",
                hint="no snapshot was kept on any disk; check that the images exist and no QEMU uses them",
            ) from err
        return refs

    def _freeze_offline(self, disk: Disk, name: str, undo: contextlib.ExitStack) -> SnapshotRef:
        """Freeze ``disk``'s image under its snapshot name and put a new top at its path; on ``undo`` the
        frozen image goes back to its path.

        :raise UnsupportedError: the image is not qcow2
        :raise VmsnapError: a step failed (what this disk's steps made is removed)
        """
        image = disk.file
        frozen = overlay_path(root_image(image), name)
        if disk.format != "qcow2":
            raise UnsupportedError(
                f"offline external snapshots keep the image's path on top, so {image} would change "
                f"from {disk.format} to qcow2",
                hint="convert it to qcow2, or snapshot while the VM runs",
            )
        size = int(self._info_unshared(image)["virtual-size"])
        fresh = image.with_name(f".{image.name}.vmsnap-new-{uuid.uuid4().hex[:8]}")
        # the image's path never disappears: a new top is made aside, the old image gets a second name
        # (hard link), and the new top replaces the path in one rename
        with contextlib.ExitStack() as steps:
            undo_later(steps, self._rm, fresh)
            qemu_img.create(self.runner, fresh, "qcow2", size, backing=frozen, unsafe=True)
            self.runner.run(["chmod", f"--reference={image}", "--", str(fresh)], timeout=30)
            self.runner.run(["ln", "--", str(image), str(frozen)], timeout=30)
            undo_later(steps, self._rm, frozen)  # a second name only, until the rename below
            self.runner.run(["mv", "-f", "--", str(fresh), str(image)], timeout=30)
            steps.pop_all()
        undo_later(undo, self.runner.run, ["mv", "-f", "--", str(frozen), str(image)], timeout=30)
        return self._ref(disk, _Layer(name, frozen, upper=image, lower=frozen))

    def _info_unshared(self, image: Path) -> dict[str, Any]:
        """qemu-img info without -U: fails when a running QEMU holds the image (which offline must not)."""
        return qemu_img.info(self.runner, image, force_share=False)

    # -- export -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def export(self, snap: SnapshotRef) -> Iterator[ExportSource]:
        """The snapshot's content is the read-only layer below the overlay: yield it as a file source
        (read with ``-U`` while QEMU holds it; the copy transport takes it from there).

        :raise NotFoundError: no such snapshot
        """
        disk, layer = self._find(snap)
        fmt = str(self._chain_info(layer.lower).get("format", "qcow2"))
        yield file_source(layer.lower, disk=disk, fmt=fmt, force_share=True)

    def _chain_info(self, image: Path) -> dict[str, Any]:
        return qemu_img.info(self.runner, image)

    # -- delete -----------------------------------------------------------------------------------

    def delete(self, snap: SnapshotRef) -> None:
        """Merge the snapshot's overlay back, then remove its file; the disk keeps all data.

        Online: an active overlay is committed (``block-commit`` with ``job-complete``; the VM returns to
        its image) or streamed into (``merge``), an older one is committed; offline ``qemu-img commit``.

        :raise NotFoundError: no such snapshot
        :raise SnapshotError: the merge failed (the overlay is kept, the VM keeps running on it)
        """
        disk, layer = self._find(snap)
        if self.machine.is_running:
            self._delete_online(disk, layer, self.merge)
        else:
            self._delete_offline(layer)

    def _nodes_by_file(self) -> dict[Path, str]:
        nodes: dict[Path, str] = {}
        for node in self.machine.qmp().query_named_block_nodes():
            if node.get("drv") in ("file", "host_device", "host_cdrom") or not node.get("node-name"):
                continue
            nodes.setdefault(Path(str(node["file"])), str(node["node-name"]))
        return nodes

    def _delete_online(self, disk: Disk, layer: _Layer, merge: Merge) -> None:
        qmp = self.machine.qmp()
        nodes = self._nodes_by_file()
        chain = [disk.file, *disk.backing_chain]
        upper_node, lower_node = nodes.get(layer.upper), nodes.get(layer.lower)
        if upper_node is None or lower_node is None:
            raise SnapshotError(f"QEMU has no node for {layer.upper} or {layer.lower} of disk {disk.name}")
        active_node = nodes.get(disk.file, disk.node_name)
        job_id = f"vmsnap-merge-{uuid.uuid4().hex[:8]}"
        below = chain[chain.index(layer.lower) + 1] if chain.index(layer.lower) + 1 < len(chain) else None
        if layer.vmsnap_file == layer.lower:
            merge = "stream"  # made offline: the image's path is on top and must stay
        elif layer.upper != disk.file:
            merge = "commit"  # an older overlay: commit it into its backing
        elif merge == "auto":
            merge = "commit" if qemu_img.allocated_fraction(self.runner, layer.upper) < 0.5 else "stream"
        try:
            if merge == "stream":
                base = nodes[below] if below is not None else None
                qmp.block_stream(job_id, node=upper_node, base_node=base, timeout=self.job_timeout)
                if layer.vmsnap_file == layer.upper:
                    return  # the VM now runs on the overlay file, which holds everything; the image stays
            else:
                qmp.block_commit(
                    job_id,
                    device=active_node,
                    top_node=upper_node,
                    base_node=lower_node,
                    timeout=self.job_timeout,
                    complete_on_ready=layer.upper == disk.file,
                )
        except (QMPCommandError, BlockJobError, KeyError) as err:
            raise SnapshotError(
                f"merging snapshot {layer.name!r} of {disk.name} failed: {err}",
                hint=f"the VM keeps running on {disk.file}; retry the delete, or run `vmsnap recover`",
            ) from err
        self._rm(layer.vmsnap_file)

    def _delete_offline(self, layer: _Layer) -> None:
        try:
            self._info_unshared(layer.upper)
            children = self._orphan_children(layer) if layer.orphan else []
            qemu_img.commit(self.runner, layer.upper, timeout=self.job_timeout)
            if layer.vmsnap_file == layer.lower:
                # the image's path is the upper file: the merged lower file takes its place
                self.runner.run(["mv", "-f", "--", str(layer.lower), str(layer.upper)], timeout=30)
                return
            lower_fmt = str(self._chain_info(layer.lower).get("format", "qcow2"))
            for child in children:
                qemu_img.rebase_unsafe(self.runner, child, layer.lower, lower_fmt)
            self._rm(layer.upper)
        except CommandError as err:
            raise SnapshotError(
                f"merging snapshot {layer.name!r} ({layer.vmsnap_file}) failed: {err}",
                hint="check that no QEMU uses the image, then retry",
            ) from err

    def _orphan_children(self, layer: _Layer) -> builtins.list[Path]:
        root = root_image(layer.upper)
        return [o.upper for o in self._orphans(root) if o.lower == layer.upper]

    # -- rollback ---------------------------------------------------------------------------------

    def rollback(self, snap: SnapshotRef) -> None:
        """Drop everything written since the snapshot (VM off): remove its overlay (and newer ones), or,
        for a snapshot made offline, put its frozen file back at the image's path.

        :raise UnsupportedError: the VM is running (shut it down, then roll back its images)
        :raise NotFoundError: no such snapshot
        """
        disk, layer = self._find(snap)
        if self.machine.is_running:
            raise UnsupportedError(
                f"cannot roll {disk.name} back to external snapshot {snap.name!r} while {self.machine.name} "
                "runs",
                hint="shut the VM down and run `vmsnap snapshot rollback --image FILE --strategy external`",
            )
        try:
            self._info_unshared(disk.file)
            if layer.vmsnap_file == layer.lower:
                chain = [disk.file, *disk.backing_chain]
                newer = [p for p in chain[1 : chain.index(layer.lower)] if parse_overlay_path(p) is not None]
                # overlays a shut-down VM left on top of the image were made later still: they go too
                newer += [o.upper for o in self._orphans(chain[0])]
                self.runner.run(["mv", "-f", "--", str(layer.lower), str(chain[0])], timeout=30)
                for path in newer:
                    self._rm(path)
                return
            if not layer.orphan and layer.upper == disk.file:
                raise UnsupportedError(
                    f"{disk.file} is the overlay of snapshot {snap.name!r} itself",
                    hint=f"name the image below it ({layer.lower}) to roll back",
                )
            newer_orphans = [o.upper for o in self._orphans(root_image(layer.upper))]
            drop = newer_orphans[: newer_orphans.index(layer.upper) + 1] if layer.orphan else [layer.upper]
            for path in drop:
                self._rm(path)
        except CommandError as err:
            raise SnapshotError(f"rolling back {snap.name!r} on {disk.name} failed: {err}") from err


def _glob_escape(name: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in name)
