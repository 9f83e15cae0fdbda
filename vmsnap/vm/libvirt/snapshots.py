"""libvirt-native snapshots of a :class:`LibvirtDomain`, keeping libvirt's metadata right: external
(``snapshot-create-as --disk-only --atomic``, deleted by ``blockcommit --active --pivot``) and internal.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from vmsnap.errors import (
    AgentError,
    BlockJobError,
    FreezeError,
    LibvirtError,
    NotFoundError,
    SnapshotError,
    UnsupportedError,
)
from vmsnap.image import qemu_img
from vmsnap.vm.freeze import frozen
from vmsnap.vm.libvirt.domain import LibvirtDomain, libvirt_message

try:
    import libvirt
except ImportError:  # pragma: no cover - LibvirtDomain() reports the missing package
    libvirt = None
from vmsnap.model import Disk, ExportSource, SnapshotRef, validate_name

MARK = "created by vmsnap"
"""Description given to every libvirt snapshot vmsnap makes, so :func:`recover` finds only its own."""

STRATEGY_EXTERNAL = "external"
STRATEGY_INTERNAL = "internal"


def _select(machine: LibvirtDomain, names: Sequence[str] | None) -> list[Disk]:
    disks = machine.disks()
    if names is None:
        return disks
    known = {d.name: d for d in disks}
    missing = [n for n in names if n not in known]
    if missing:
        raise NotFoundError(
            f"domain {machine.name} has no disk {', '.join(missing)}",
            hint=f"its disks: {', '.join(known) or 'none'}",
        )
    return [known[n] for n in names]


def _snapshot_xml(name: str, disks: Sequence[Disk], chosen: dict[str, str | None], *, external: bool) -> str:
    """``<domainsnapshot>``: chosen disks external (overlay path) or internal; every other disk left out."""
    parts = [f"<domainsnapshot><name>{_text(name)}</name><description>{MARK}</description><disks>"]
    for disk in disks:
        if disk.name not in chosen:
            parts.append(f"<disk name={quoteattr(disk.name)} snapshot='no'/>")
        elif external:
            overlay = chosen[disk.name]
            parts.append(
                f"<disk name={quoteattr(disk.name)} snapshot='external'><driver type='qcow2'/>"
                f"<source file={quoteattr(str(overlay))}/></disk>"
            )
        else:
            parts.append(f"<disk name={quoteattr(disk.name)} snapshot='internal'/>")
    parts.append("</disks></domainsnapshot>")
    return "".join(parts)


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _lookup_snapshot(machine: LibvirtDomain, name: str) -> Any:
    try:
        return machine.domain.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise NotFoundError(
                f"domain {machine.name} has no libvirt snapshot {name!r}",
                hint=f"virsh snapshot-list {machine.name} shows them",
            ) from err
        raise LibvirtError(f"looking up snapshot {name!r} failed: {libvirt_message(err)}") from err


def _snapshot_error(machine: LibvirtDomain, action: str, err: Exception, *, quiesce: bool) -> Exception:
    text = libvirt_message(err)
    if quiesce and "agent" in text.lower():
        return FreezeError(
            f"{action} on domain {machine.name} with --quiesce failed: {text}",
            hint="check that qemu-ga runs in the guest, or use --quiesce off",
        )
    return SnapshotError(f"{action} on domain {machine.name} failed: {text}", hint="nothing was changed")


# -- external snapshots ---------------------------------------------------------------------------


def create_external_snapshot(
    machine: LibvirtDomain,
    name: str,
    *,
    disks: Sequence[str] | None = None,
    quiesce: bool = False,
    overlay_dir: Path | None = None,
) -> list[SnapshotRef]:
    """``virsh snapshot-create-as NAME --disk-only --atomic [--quiesce]``: one overlay per disk, all at once.

    The overlays are ``<image stem>.<name>.qcow2`` next to each image (or in ``overlay_dir``); the images
    below them stop changing and can be copied out (:func:`external_snapshot_source`).

    :param disks: target devs to snapshot (default all); the others are left alone
    :param quiesce: freeze the guest's filesystems through its agent for the instant of the snapshot
    :raise SnapshotError: libvirt refused (nothing changed: the snapshot is atomic)
    :raise FreezeError: ``quiesce`` was asked for and the agent could not freeze
    """
    validate_name(name, "snapshot name")
    all_disks = machine.disks()
    chosen = _select(machine, disks)
    overlays: dict[str, str | None] = {}
    for disk in chosen:
        folder = overlay_dir if overlay_dir is not None else disk.file.parent
        overlay = folder / f"{disk.file.stem}.{name}.qcow2"
        if overlay.exists():
            raise SnapshotError(
                f"overlay {overlay} already exists",
                hint="choose another snapshot name, or run vmsnap recover to clean up an earlier run",
            )
        overlays[disk.name] = str(overlay)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    if quiesce:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    if not machine.is_running:
        flags &= ~libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    try:
        machine.domain.snapshotCreateXML(_snapshot_xml(name, all_disks, overlays, external=True), flags)
    except libvirt.libvirtError as err:
        raise _snapshot_error(machine, f"external snapshot {name!r}", err, quiesce=quiesce) from err
    return [
        SnapshotRef(
            strategy=STRATEGY_EXTERNAL,
            name=name,
            disk=disk,
            location=str(overlays[disk.name]),
            details={"libvirt": "snapshot", "base": str(disk.file), "quiesced": str(quiesce).lower()},
        )
        for disk in chosen
    ]


def external_snapshot_source(snap: SnapshotRef) -> ExportSource:
    """The frozen image below an external snapshot's overlay, as a transport reads it (shared, read-only)."""
    base = snap.details.get("base", str(snap.disk.file))
    return ExportSource(
        kind="file",
        location=base,
        format=snap.disk.format,
        disk=snap.disk,
        virtual_size=snap.disk.virtual_size,
        force_share=True,
    )


def commit_external_snapshot(
    machine: LibvirtDomain, name: str, *, timeout: float = 3600.0, remove_overlays: bool = True
) -> None:
    """``virsh blockcommit DISK --active --pivot`` for every disk of snapshot ``name``, then forget it.

    Each overlay's writes go back into the image below it and the domain runs on that image again
    (``domblklist`` shows the original sources); the snapshot's metadata and overlay files are removed.

    :raise NotFoundError: no such libvirt snapshot
    :raise UnsupportedError: the domain is shut off (block commit needs a running QEMU)
    :raise BlockJobError: a commit failed or did not finish within ``timeout`` (it is aborted; the domain
        stays on the overlay, with all data)
    """
    snapshot = _lookup_snapshot(machine, name)
    if not machine.is_running:
        raise UnsupportedError(
            f"committing snapshot {name!r} needs domain {machine.name} running",
            hint="start the domain, then run the delete again",
        )
    overlays = external_overlays(snapshot)
    active = machine.block_targets()
    pending = [t for t, overlay in overlays.items() if active.get(t) == overlay]
    below = {Path(p) for d in machine.disks() for p in d.backing_chain}
    buried = [o for t, o in overlays.items() if t not in pending and Path(o) in below]
    if buried:
        raise SnapshotError(
            f"snapshot {name!r} has newer snapshots on top of it ({', '.join(buried)})",
            hint="delete the newest first (or per disk with the strategy); nothing was changed",
        )
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    for target in pending:
        try:
            machine.domain.blockCommit(target, None, None, 0, flags)
        except libvirt.libvirtError as err:
            raise BlockJobError(target, f"libvirt blockcommit failed: {libvirt_message(err)}") from err
    deadline = time.monotonic() + timeout
    for target in pending:
        _pivot_when_ready(machine, target, deadline, timeout)
    try:
        snapshot.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"forgetting snapshot {name!r} failed: {libvirt_message(err)}") from err
    if remove_overlays:
        for overlay in overlays.values():
            machine.runner.run(["rm", "-f", "--", overlay], timeout=60)


def rollback_external_snapshot(machine: LibvirtDomain, name: str) -> None:
    """Return a shut-off domain to external snapshot ``name``: drop the overlays, run on the images below.

    libvirt 9.0 cannot revert external snapshots, so vmsnap points each disk's ``<source>`` in the
    persistent definition back at the overlay's backing image, then forgets the snapshot and removes the
    overlays (their writes are discarded: that is the rollback).

    :raise UnsupportedError: the domain is running (shut it down first)
    :raise SnapshotError: a newer snapshot is stacked on this one (roll that back or delete it first)
    """
    snapshot = _lookup_snapshot(machine, name)
    if machine.is_running:
        raise UnsupportedError(
            f"rolling back to external snapshot {name!r} needs domain {machine.name} shut off",
            hint=f"virsh shutdown {machine.name} (or destroy), then roll back",
        )
    if snapshot.numChildren(0):
        raise SnapshotError(
            f"snapshot {name!r} of domain {machine.name} has newer snapshots on top of it",
            hint="roll back to or delete the newest snapshot first",
        )
    overlays = external_overlays(snapshot)
    root = machine.xml_tree(inactive=True)
    changed = []
    for disk in root.iterfind("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        dev = target.get("dev", "") if target is not None else ""
        if source is None or dev not in overlays or source.get("file") != overlays[dev]:
            continue
        chain = qemu_img.chain_info(machine.runner, Path(overlays[dev]), force_share=False)
        if len(chain) < 2:
            raise SnapshotError(f"overlay {overlays[dev]} of disk {dev} has no backing image to return to")
        source.set("file", str(chain[1]["filename"]))
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", str(chain[1].get("format", "qcow2")))
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
        changed.append(dev)
    try:
        if changed:
            machine.connection.defineXML(ET.tostring(root, encoding="unicode"))
        snapshot.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as err:
        raise SnapshotError(f"rolling back to snapshot {name!r} failed: {libvirt_message(err)}") from err
    for dev in changed:
        machine.runner.run(["rm", "-f", "--", overlays[dev]], timeout=60)


def external_overlays(snapshot: Any) -> dict[str, str]:
    """target dev → overlay file of the external disks of a libvirt snapshot object."""
    root = ET.fromstring(snapshot.getXMLDesc(0))  # noqa: S314 - libvirt's own XML
    found = {}
    for disk in root.iterfind("./disks/disk"):
        source = disk.find("source")
        if disk.get("snapshot") == "external" and source is not None and source.get("file"):
            found[str(disk.get("name"))] = str(source.get("file"))
    return found


def _pivot_when_ready(machine: LibvirtDomain, target: str, deadline: float, timeout: float) -> None:
    interval = 0.01
    while True:
        try:
            info = machine.domain.blockJobInfo(target, 0)
        except libvirt.libvirtError as err:
            raise BlockJobError(target, f"libvirt lost the commit job: {libvirt_message(err)}") from err
        if not info:
            raise BlockJobError(
                target, "the commit job vanished before it could pivot", hint="see the domain's log"
            )
        if info.get("cur") == info.get("end"):
            try:
                machine.domain.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                return
            except libvirt.libvirtError as err:
                if "not ready" not in libvirt_message(err).lower():
                    raise BlockJobError(target, f"pivot failed: {libvirt_message(err)}") from err
        if time.monotonic() > deadline:
            with contextlib.suppress(libvirt.libvirtError):
                machine.domain.blockJobAbort(target, 0)
            raise BlockJobError(target, f"commit did not become ready within {timeout:g} s; it was aborted")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


# -- internal snapshots ---------------------------------------------------------------------------


def create_internal_snapshot(
    machine: LibvirtDomain, name: str, *, quiesce: bool = False
) -> list[SnapshotRef]:
    """``virsh snapshot-create-as NAME``: internal qcow2 snapshots of every disk (with RAM when running).

    libvirt accepts ``--quiesce`` only for disk-only snapshots, so ``quiesce`` freezes through the guest
    agent around the call (always thawed after; a thaw guard thaws it if this process dies).

    :raise SnapshotError: libvirt refused (e.g. a raw disk)
    :raise FreezeError: the agent could not freeze
    """
    validate_name(name, "snapshot name")
    disks = machine.disks()
    xml = _snapshot_xml(name, disks, dict.fromkeys((d.name for d in disks), None), external=False)
    agent = machine.agent() if quiesce else None
    if quiesce and agent is None:
        raise FreezeError(
            f"domain {machine.name} has no guest agent channel to quiesce with",
            hint="add an org.qemu.guest_agent.0 channel, or use --quiesce off",
        )
    try:
        with frozen(machine) if agent is not None else contextlib.nullcontext():
            machine.domain.snapshotCreateXML(xml, 0)
    except libvirt.libvirtError as err:
        raise _snapshot_error(machine, f"internal snapshot {name!r}", err, quiesce=False) from err
    return [
        SnapshotRef(
            strategy=STRATEGY_INTERNAL,
            name=name,
            disk=disk,
            location=str(disk.file),
            details={"libvirt": "snapshot", "quiesced": str(quiesce).lower()},
        )
        for disk in disks
    ]


def internal_snapshot_source(snap: SnapshotRef) -> ExportSource:
    """An internal snapshot as a transport reads it: the image with ``snapshot.name`` (shared, read-only)."""
    return ExportSource(
        kind="file",
        location=str(snap.disk.file),
        format=snap.disk.format,
        disk=snap.disk,
        virtual_size=snap.disk.virtual_size,
        image_opts={"snapshot.name": snap.name},
        force_share=True,
    )


def delete_snapshot(machine: LibvirtDomain, name: str) -> None:
    """``virsh snapshot-delete NAME``; an external one is committed (:func:`commit_external_snapshot`)."""
    snapshot = _lookup_snapshot(machine, name)
    if external_overlays(snapshot):
        commit_external_snapshot(machine, name)
        return
    try:
        snapshot.delete(0)
    except libvirt.libvirtError as err:
        raise SnapshotError(f"deleting snapshot {name!r} failed: {libvirt_message(err)}") from err


def revert_snapshot(machine: LibvirtDomain, name: str) -> None:
    """``virsh snapshot-revert NAME``: disks (and RAM, for a running snapshot) return to the snapshot.

    A guest that was frozen for a quiesced snapshot is thawed after the revert.
    """
    snapshot = _lookup_snapshot(machine, name)
    try:
        machine.domain.revertToSnapshot(snapshot, 0)
    except libvirt.libvirtError as err:
        raise SnapshotError(f"reverting to snapshot {name!r} failed: {libvirt_message(err)}") from err
    agent = machine.agent()
    if agent is not None:
        with contextlib.suppress(AgentError):
            if agent.fsfreeze_status() == "frozen":
                agent.fsfreeze_thaw()


def snapshots(machine: LibvirtDomain) -> list[str]:
    """Names of the domain's libvirt snapshots, oldest first."""
    return _oldest_first([s.getXMLDesc(0) for s in machine.domain.listAllSnapshots(0)])


def _oldest_first(xmls: Sequence[str]) -> list[str]:
    """Names of libvirt snapshots or checkpoints, parents before children (creation times tie within
    a second, so the ``<parent>`` links decide), then by creation time and name."""
    parent: dict[str, str] = {}
    created: dict[str, int] = {}
    for xml in xmls:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
        name = root.findtext("name") or ""
        parent[name] = root.findtext("parent/name") or ""
        created[name] = int(root.findtext("creationTime") or 0)

    def depth(name: str) -> int:
        seen: set[str] = set()
        while parent.get(name) in parent and name not in seen:
            seen.add(name)
            name = parent[name]
        return len(seen)

    return sorted(parent, key=lambda n: (depth(n), created[n], n))
