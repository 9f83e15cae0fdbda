"""libvirt-native backups: ``virDomainBackupBegin`` push and pull with checkpoints for incremental chains,
and :func:`recover`, which removes what a dead vmsnap run left in libvirt.
"""

from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from vmsnap.errors import (
    LibvirtError,
    NotFoundError,
    UsageError,
)
from vmsnap.vm.libvirt.domain import LibvirtDomain, libvirt_message

try:
    import libvirt
except ImportError:  # pragma: no cover - LibvirtDomain() reports the missing package
    libvirt = None
from vmsnap.model import Disk, ExportSource, Progress, validate_name
from vmsnap.vm.libvirt.snapshots import (
    MARK,
    _lookup_snapshot,
    _oldest_first,
    _select,
    _text,
    commit_external_snapshot,
    external_overlays,
    snapshots,
)

# -- backups with checkpoints ---------------------------------------------------------------------


def checkpoints(machine: LibvirtDomain) -> list[str]:
    """Names of the domain's checkpoints, oldest first (the last is where the next incremental starts)."""
    return _oldest_first([c.getXMLDesc(0) for c in machine.domain.listAllCheckpoints(0)])


def delete_checkpoint(machine: LibvirtDomain, name: str) -> None:
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


def _check_incremental(machine: LibvirtDomain, incremental: str | None) -> None:
    if incremental is not None and incremental not in checkpoints(machine):
        raise NotFoundError(
            f"domain {machine.name} has no checkpoint {incremental!r} to start an incremental backup from",
            hint="take a full backup first (it creates the checkpoint)",
        )


def backup_push(
    machine: LibvirtDomain,
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


def _begin(machine: LibvirtDomain, backup_xml: str, checkpoint_xml: str) -> None:
    try:
        machine.domain.backupBegin(backup_xml, checkpoint_xml, 0)
    except libvirt.libvirtError as err:
        raise LibvirtError(
            f"libvirt could not start a backup of domain {machine.name}: {libvirt_message(err)}",
            hint="another backup job may be running (virsh domjobinfo); vmsnap recover aborts a stale one",
        ) from err


def _wait_backup(machine: LibvirtDomain, timeout: float, progress: Progress | None) -> None:
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


def link_incremental(machine: LibvirtDomain, image: Path, parent: Path) -> None:
    """Make a push-mode incremental target a qcow2 layer on ``parent`` (relative link, no data copied)."""
    relative = os.path.relpath(parent, image.parent)
    machine.runner.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", relative, str(image)], timeout=120
    )


@contextlib.contextmanager
def backup_pull(
    machine: LibvirtDomain,
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


def recover(machine: LibvirtDomain) -> list[str]:
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
