"""libvirt-native snapshot and backup steps for a :class:`LibvirtMachine`, keeping libvirt's metadata right.

External snapshots (``snapshot-create-as --disk-only --atomic``, deleted by ``blockcommit --active --pivot``),
internal snapshots, and ``virDomainBackupBegin`` push/pull backups with checkpoints for incremental chains.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from xml.sax.saxutils import quoteattr

from vmsnap.errors import (
    AgentError,
    BlockJobError,
    FreezeError,
    LibvirtError,
    NotFoundError,
    SnapshotError,
    UnsupportedError,
    UsageError,
)
from vmsnap.libvirt_machine import LibvirtMachine, libvirt_message
from vmsnap.machine import Machine, image_chain

try:
    import libvirt
except ImportError:  # pragma: no cover - LibvirtMachine() reports the missing package
    libvirt = None
from vmsnap.model import Disk, ExportSource, Progress, SnapshotRef, Traits, validate_name
from vmsnap.strategies.external import ExternalOverlayStrategy

MARK = "created by vmsnap"
"""Description given to every libvirt snapshot vmsnap makes, so :func:`recover` finds only its own."""

STRATEGY_EXTERNAL = "external"
STRATEGY_INTERNAL = "internal"


def _select(machine: LibvirtMachine, names: Sequence[str] | None) -> list[Disk]:
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


def _lookup_snapshot(machine: LibvirtMachine, name: str) -> Any:
    try:
        return machine.domain.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise NotFoundError(
                f"domain {machine.name} has no libvirt snapshot {name!r}",
                hint=f"virsh snapshot-list {machine.name} shows them",
            ) from err
        raise LibvirtError(f"looking up snapshot {name!r} failed: {libvirt_message(err)}") from err


def _snapshot_error(machine: LibvirtMachine, action: str, err: Exception, *, quiesce: bool) -> Exception:
    text = libvirt_message(err)
    if quiesce and "agent" in text.lower():
        return FreezeError(
            f"{action} on domain {machine.name} with --quiesce failed: {text}",
            hint="check that qemu-ga runs in the guest, or use --quiesce off",
        )
    return SnapshotError(f"{action} on domain {machine.name} failed: {text}", hint="nothing was changed")


# -- external snapshots ---------------------------------------------------------------------------


def create_external_snapshot(
    machine: LibvirtMachine,
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
    machine: LibvirtMachine, name: str, *, timeout: float = 3600.0, remove_overlays: bool = True
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


def rollback_external_snapshot(machine: LibvirtMachine, name: str) -> None:
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
        chain = image_chain(machine.runner, Path(overlays[dev]), force_share=False)
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


def _pivot_when_ready(machine: LibvirtMachine, target: str, deadline: float, timeout: float) -> None:
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
    machine: LibvirtMachine, name: str, *, quiesce: bool = False
) -> list[SnapshotRef]:
    """``virsh snapshot-create-as NAME``: internal qcow2 snapshots of every disk (with RAM when running).

    libvirt accepts ``--quiesce`` only for disk-only snapshots, so ``quiesce`` freezes through the guest
    agent around the call (always thawed after).

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
        with agent.frozen() if agent is not None else contextlib.nullcontext():
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


def delete_snapshot(machine: LibvirtMachine, name: str) -> None:
    """``virsh snapshot-delete NAME``; an external one is committed (:func:`commit_external_snapshot`)."""
    snapshot = _lookup_snapshot(machine, name)
    if external_overlays(snapshot):
        commit_external_snapshot(machine, name)
        return
    try:
        snapshot.delete(0)
    except libvirt.libvirtError as err:
        raise SnapshotError(f"deleting snapshot {name!r} failed: {libvirt_message(err)}") from err


def revert_snapshot(machine: LibvirtMachine, name: str) -> None:
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


def snapshots(machine: LibvirtMachine) -> list[str]:
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


# -- backups with checkpoints ---------------------------------------------------------------------


def checkpoints(machine: LibvirtMachine) -> list[str]:
    """Names of the domain's checkpoints, oldest first (the last is where the next incremental starts)."""
    return _oldest_first([c.getXMLDesc(0) for c in machine.domain.listAllCheckpoints(0)])


def delete_checkpoint(machine: LibvirtMachine, name: str) -> None:
    """``virsh checkpoint-delete NAME`` (its bitmap is merged into its parent's, so chains stay valid)."""
    try:
        machine.domain.checkpointLookupByName(name, 0).delete(0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            raise NotFoundError(f"domain {machine.name} has no checkpoint {name!r}") from err
        raise LibvirtError(f"deleting checkpoint {name!r} failed: {libvirt_message(err)}") from err


def _checkpoint_xml(name: str, all_disks: Sequence[Disk], chosen: Sequence[Disk]) -> str:
    wanted = {d.name for d in chosen}
    parts = [f"<domaincheckpoint><name>{_text(name)}</name><description>{MARK}</description><disks>"]
    for disk in all_disks:
        mode = "bitmap" if disk.name in wanted else "no"
        parts.append(f"<disk name={quoteattr(disk.name)} checkpoint='{mode}'/>")
    parts.append("</disks></domaincheckpoint>")
    return "".join(parts)


def _check_incremental(machine: LibvirtMachine, incremental: str | None) -> None:
    if incremental is not None and incremental not in checkpoints(machine):
        raise NotFoundError(
            f"domain {machine.name} has no checkpoint {incremental!r} to start an incremental backup from",
            hint="take a full backup first (it creates the checkpoint)",
        )


def backup_push(
    machine: LibvirtMachine,
    target_dir: Path,
    *,
    checkpoint: str,
    incremental: str | None = None,
    disks: Sequence[str] | None = None,
    timeout: float = 3600.0,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """``virsh backup-begin`` in push mode: QEMU writes ``target_dir/<disk>.qcow2`` for each disk.

    A new checkpoint ``checkpoint`` is created at the same instant, so the next incremental backup
    (``incremental=checkpoint``) holds exactly the clusters written after this one. An incremental target
    holds only changed clusters; libvirt gives it the live image as backing file —
    :func:`link_incremental` points it at the previous backup instead.

    :return: disk name → target file
    :raise NotFoundError: ``incremental`` names no checkpoint of the domain
    :raise LibvirtError: libvirt refused to start the job, or the job failed (targets removed)
    """
    validate_name(checkpoint, "checkpoint name")
    _check_incremental(machine, incremental)
    all_disks = machine.disks()
    chosen = _select(machine, disks)
    targets = {d.name: target_dir / f"{d.name}.qcow2" for d in chosen}
    _refuse_existing(targets.values())
    parts = ["<domainbackup mode='push'>"]
    if incremental is not None:
        parts.append(f"<incremental>{_text(incremental)}</incremental>")
    parts.append("<disks>")
    for disk in all_disks:
        if disk.name in targets:
            parts.append(
                f"<disk name={quoteattr(disk.name)} backup='yes' type='file'>"
                f"<target file={quoteattr(str(targets[disk.name]))}/><driver type='qcow2'/></disk>"
            )
        else:
            parts.append(f"<disk name={quoteattr(disk.name)} backup='no'/>")
    parts.append("</disks></domainbackup>")
    _begin(machine, "".join(parts), _checkpoint_xml(checkpoint, all_disks, chosen))
    try:
        _wait_backup(machine, timeout, progress)
    except BaseException:
        for path in targets.values():
            machine.runner.run(["rm", "-f", "--", str(path)], timeout=60)
        raise
    return targets


def _refuse_existing(paths: Iterable[Path]) -> None:
    """Files vmsnap would make (and remove after a failure) must not be somebody else's."""
    taken = [str(p) for p in paths if p.exists()]
    if taken:
        raise UsageError(
            f"{', '.join(taken)} already exist(s)",
            hint="choose an empty target directory; nothing was started",
        )


def _begin(machine: LibvirtMachine, backup_xml: str, checkpoint_xml: str) -> None:
    try:
        machine.domain.backupBegin(backup_xml, checkpoint_xml, 0)
    except libvirt.libvirtError as err:
        raise LibvirtError(
            f"libvirt could not start a backup of domain {machine.name}: {libvirt_message(err)}",
            hint="another backup job may be running (virsh domjobinfo); vmsnap recover aborts a stale one",
        ) from err


def _wait_backup(machine: LibvirtMachine, timeout: float, progress: Progress | None) -> None:
    deadline = time.monotonic() + timeout
    interval = 0.01
    while True:
        info = machine.domain.jobInfo()
        if info[0] == libvirt.VIR_DOMAIN_JOB_NONE:
            break
        if progress is not None and info[6]:
            progress(int(info[7]), int(info[6]))  # dataProcessed, dataTotal
        if time.monotonic() > deadline:
            with contextlib.suppress(libvirt.libvirtError):
                machine.domain.abortJob()
            raise LibvirtError(f"the backup of domain {machine.name} ran past {timeout:g} s; it was aborted")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)
    stats = machine.domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if not stats.get("success", False) or stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise LibvirtError(
            f"the backup job of domain {machine.name} failed: {stats.get('errmsg', 'see the domain log')}",
            hint="see /var/log/libvirt/qemu/<domain>.log; the checkpoint, if created, can stay",
        )
    if progress is not None:
        total = int(stats.get("disk_total", 0))
        progress(total, total)


def link_incremental(machine: LibvirtMachine, image: Path, parent: Path) -> None:
    """Make a push-mode incremental target a qcow2 layer on ``parent`` (relative link, no data copied)."""
    relative = os.path.relpath(parent, image.parent)
    machine.runner.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", relative, str(image)], timeout=120
    )


@contextlib.contextmanager
def backup_pull(
    machine: LibvirtMachine,
    socket: Path,
    *,
    checkpoint: str,
    incremental: str | None = None,
    disks: Sequence[str] | None = None,
    scratch_dir: Path | None = None,
) -> Iterator[dict[str, ExportSource]]:
    """``virsh backup-begin`` in pull mode: QEMU serves each disk's point-in-time view over NBD.

    For the body of the ``with``, each disk is an NBD export named after it on unix socket ``socket``
    (read it raw; for an incremental backup, only the clusters in the ``qemu:dirty-bitmap:backup-<disk>``
    context changed). Leaving the ``with`` ends the job (``virsh domjobabort``) and removes scratch files.

    :return: disk name → NBD :class:`ExportSource`
    """
    validate_name(checkpoint, "checkpoint name")
    _check_incremental(machine, incremental)
    all_disks = machine.disks()
    chosen = _select(machine, disks)
    scratch = scratch_dir if scratch_dir is not None else socket.parent
    scratch_files = {d.name: scratch / f"{d.name}.{checkpoint}.scratch.qcow2" for d in chosen}
    _refuse_existing(scratch_files.values())
    parts = ["<domainbackup mode='pull'>"]
    if incremental is not None:
        parts.append(f"<incremental>{_text(incremental)}</incremental>")
    parts.append(f"<server transport='unix' socket={quoteattr(str(socket))}/><disks>")
    for disk in all_disks:
        if disk.name in scratch_files:
            parts.append(
                f"<disk name={quoteattr(disk.name)} backup='yes' type='file'>"
                f"<scratch file={quoteattr(str(scratch_files[disk.name]))}/></disk>"
            )
        else:
            parts.append(f"<disk name={quoteattr(disk.name)} backup='no'/>")
    parts.append("</disks></domainbackup>")
    _begin(machine, "".join(parts), _checkpoint_xml(checkpoint, all_disks, chosen))
    try:
        yield {
            disk.name: ExportSource(
                kind="nbd",
                location=f"nbd+unix:///{disk.name}?socket={socket}",
                format="raw",
                disk=disk,
                virtual_size=disk.virtual_size,
                dirty_bitmap=f"backup-{disk.name}" if incremental is not None else None,
            )
            for disk in chosen
        }
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            machine.domain.abortJob()
        for path in scratch_files.values():
            machine.runner.run(["rm", "-f", "--", str(path)], timeout=60)


# -- recovery -------------------------------------------------------------------------------------


def recover(machine: LibvirtMachine) -> list[str]:
    """Undo what a dead vmsnap run left in libvirt: a backup job, external snapshots still active.

    External snapshots vmsnap made whose overlays are still the active layer are committed back and
    forgotten; a running backup job is aborted. Checkpoints stay (they are the next incremental's base).

    :return: one line per thing cleaned up
    """
    done: list[str] = []
    if not machine.is_running:
        return done
    info = machine.domain.jobInfo()
    if info[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        with contextlib.suppress(libvirt.libvirtError):
            machine.domain.abortJob()
            done.append(f"aborted the running job of domain {machine.name}")
    for name in reversed(snapshots(machine)):  # newest first: each is on top once the newer are gone
        snapshot = _lookup_snapshot(machine, name)
        root = ET.fromstring(snapshot.getXMLDesc(0))  # noqa: S314 - libvirt's own XML
        if (root.findtext("description") or "") != MARK:
            continue
        overlays = external_overlays(snapshot)
        active = machine.block_targets()
        if overlays and any(active.get(t) == o for t, o in overlays.items()):
            commit_external_snapshot(machine, name)
            done.append(f"committed and removed external snapshot {name}")
    return done


# -- restoring a domain ---------------------------------------------------------------------------


def saved_domain_xml(machine: LibvirtMachine) -> str:
    """The domain's persistent definition, to store beside a backup so a restore can redefine it."""
    return machine.xml(inactive=True)


def restored_domain_xml(xml: str, *, name: str, images: Mapping[str, Path]) -> str:
    """A copy of a saved domain definition that runs on restored images and cannot clash with the original.

    The name is replaced, the UUID and MAC addresses dropped (libvirt makes new ones), every disk points
    at its restored qcow2 image, and agent sockets get libvirt's default paths.

    :param images: disk target (``vda``) → restored image; every disk of the domain must have one
    :raise UsageError: a disk of the saved domain has no restored image (it would share the original's)
    """
    validate_name(name, "domain name")
    root = ET.fromstring(xml)  # noqa: S314 - a libvirt definition vmsnap saved
    name_node = root.find("name")
    if name_node is None:
        raise UsageError("the saved domain XML has no <name>", hint="is it a libvirt domain definition?")
    name_node.text = name
    for tag in ("uuid", "description"):
        for node in root.findall(tag):
            root.remove(node)
    devices = root.find("devices")
    missing = []
    for disk in devices.findall("disk") if devices is not None else []:
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if disk.get("device", "disk") != "disk" or disk.find("source") is None:
            continue
        if dev not in images:
            missing.append(dev)
            continue
        disk.set("type", "file")
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", "qcow2")
        disk.insert(1, ET.Element("source", {"file": str(images[dev])}))
    if missing:
        raise UsageError(
            f"the restore has no image for disk(s) {', '.join(missing)} of the saved domain",
            hint="restore every disk of the backup (no --disk filter) to redefine the domain",
        )
    for interface in devices.findall("interface") if devices is not None else []:
        for mac in interface.findall("mac"):
            interface.remove(mac)
    for channel in devices.findall("channel") if devices is not None else []:
        source = channel.find("source")
        if channel.get("type") == "unix" and source is not None:
            source.attrib.pop("path", None)
    return ET.tostring(root, encoding="unicode")


def define_restored_domain(
    machine_or_uri: LibvirtMachine | str | None, xml: str, *, name: str, images: Mapping[str, Path]
) -> str:
    """Define (not start) a new domain ``name`` from a saved definition over restored images.

    :param machine_or_uri: a connected machine, or the libvirt URI to connect to
    :return: the new domain's name
    :raise UsageError: a domain called ``name`` exists already, or a disk has no restored image
    :raise LibvirtError: libvirt refused the definition
    """
    from vmsnap.libvirt_machine import open_connection

    definition = restored_domain_xml(xml, name=name, images=images)
    if isinstance(machine_or_uri, LibvirtMachine):
        own, conn = False, machine_or_uri.connection
    else:
        own, conn = True, open_connection(machine_or_uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name)
            raise UsageError(f"a libvirt domain {name!r} exists already", hint="choose another --define name")
        try:
            conn.defineXML(definition)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"libvirt refused to define domain {name!r}: {libvirt_message(err)}") from err
    finally:
        if own:
            conn.close()
    return name


# -- the external strategy, the libvirt way -------------------------------------------------------


class LibvirtExternalSnapshotStrategy:
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
        info = image_chain(self.machine.runner, below)[0]
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
                driver.set("type", str(image_chain(self.machine.runner, below)[0].get("format", "qcow2")))
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
