"""The ``backup`` strategy on powered-off images: no QEMU runs, so ``qemu-img`` and ``qemu-nbd`` do what the
backup job and QEMU's NBD server do online.

A full backup is a ``qemu-img convert`` of the image (push) or the image served read-only by ``qemu-nbd``
(pull). An incremental one follows the image's persistent dirty bitmap, kept safe as online
(:mod:`~vmsnap.strategies.blockdev_backup.bitmaps`): ``qemu-img bitmap`` parks its bits in the pending
bitmap, ``qemu-nbd --bitmap`` exposes those as the ``qemu:dirty-bitmap:`` context, and push mode copies
exactly those extents into an overlay on the parent (pull mode leaves that to the NBD client).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from vmsnap.errors import SnapshotError, TransferError, VmsnapError
from vmsnap.image import qemu_img
from vmsnap.image.nbd import (
    CHUNK,
    DIRTY,
    QemuNbdServer,
    dirty_context,
    extents,
    libnbd,
    nbd_connection,
    pread,
)
from vmsnap.model import Disk, ExportSource, SnapshotRef
from vmsnap.runner import Runner
from vmsnap.strategies.base import file_source
from vmsnap.strategies.blockdev_backup.bitmaps import ImageBitmaps, give_back, pending_name, recover_pending
from vmsnap.strategies.blockdev_backup.plan import (
    BackupSet,
    DiskPlan,
    Planner,
    Records,
    backup_failed,
    create_target,
    nbd_source,
)
from vmsnap.strategies.undo import undo_later


def image_bitmaps(runner: Runner, disk: Disk) -> ImageBitmaps | None:
    """Where ``disk``'s persistent bitmaps live: its qcow2 image (None for raw: it keeps no bitmaps)."""
    return ImageBitmaps(runner, disk.file) if disk.format == "qcow2" else None


def plan_offline(
    runner: Runner, planner: Planner, bitmap: str, disks: Sequence[Disk]
) -> tuple[list[DiskPlan], str]:
    """Give back what a dead run left in a pending bitmap, then plan (see :meth:`Planner.plan`).

    :raise SnapshotError: an image cannot be read, or a running QEMU holds it
    """
    found: dict[str, list[dict[str, object]]] = {}
    try:
        for disk in disks:
            home = image_bitmaps(runner, disk)
            if home is not None:
                recover_pending(home, bitmap)
                found[disk.name] = home.infos()
    except VmsnapError as err:
        raise backup_failed(
            "offline backup",
            [d.name for d in disks],
            err,
            verb="failed",
            hint="is an image in use by a running QEMU? Back the VM up through its QMP socket instead",
        ) from err
    return planner.plan(found, disks)


def create_offline(
    runner: Runner, plans: Sequence[DiskPlan], backup: BackupSet, records: Records
) -> list[SnapshotRef]:
    """Park each disk's bits, write the push targets (pull: nothing to write) and record the backups.

    :raise SnapshotError: something failed; the bits are back and no target or record is left
    """
    refs = [backup.ref(plan, plan.target if backup.mode == "push" else plan.disk.file) for plan in plans]
    try:
        with contextlib.ExitStack() as undo:
            for plan in plans:
                home = image_bitmaps(runner, plan.disk)
                if home is not None:
                    home.park(backup.bitmap, plan.bitmap_state)
                    undo_later(undo, give_back, home, backup.bitmap, new_bitmap=plan.bitmap_state != "ok")
            if backup.mode == "push":
                for plan in plans:
                    undo_later(undo, plan.target.unlink, True)
                    write_target(runner, plan, backup.bitmap)
            for ref in refs:
                undo_later(undo, records.remove, ref.disk.name)
                records.write(ref)
            undo.pop_all()
    except (VmsnapError, OSError) as err:
        raise backup_failed(
            "offline backup",
            backup.disks,
            err,
            verb="failed",
            hint="is an image in use by a running QEMU, or the target filesystem full?",
        ) from err
    return refs


def write_target(runner: Runner, plan: DiskPlan, bitmap: str) -> None:
    """Write ``plan.target`` (0600): the whole image, or for an incremental an overlay on the parent with
    the extents the pending bitmap marks.

    :raise VmsnapError: qemu-img, qemu-nbd or the copy failed
    """
    if not plan.incremental:
        image = file_source(plan.disk.file, disk=plan.disk, fmt=plan.disk.format, force_share=False)
        runner.run(qemu_img.convert_argv(image, plan.target), timeout=None)
        plan.target.chmod(0o600)
        return
    create_target(runner, plan)
    pending = pending_name(bitmap)
    with (
        QemuNbdServer(plan.disk.file, "qcow2", bitmap=pending, runner=runner) as source,
        QemuNbdServer(plan.target, "qcow2", read_only=False, runner=runner) as sink,
    ):
        copy_dirty(source.uri, dirty_context(pending), sink.uri)


def copy_dirty(source_uri: str, context: str, sink_uri: str) -> None:
    """Copy the extents that the dirty-bitmap ``context`` of NBD export ``source_uri`` marks into the same
    offsets of ``sink_uri`` (a dirty range that reads as zeros is written as zeros: it must hide the parent).

    :raise TransferError: the source lacks the context, or a read or write failed
    """
    nbd = libnbd()
    with nbd_connection(source_uri, contexts=[context]) as src, nbd_connection(sink_uri) as dst:
        if not src.can_meta_context(context):
            raise TransferError(f"the NBD export {source_uri} does not expose {context}")
        try:
            for offset, length, flags in extents(src, context):
                if not flags & DIRTY:
                    continue
                for pos in range(offset, offset + length, CHUNK):
                    data = pread(src, min(CHUNK, offset + length - pos), pos)
                    if data.count(0) == len(data):
                        dst.zero(len(data), pos)
                    else:
                        dst.pwrite(data, pos)
            dst.flush()
        except nbd.Error as err:
            raise TransferError(f"writing the changed extents to {sink_uri} failed: {err.string}") from err


@contextlib.contextmanager
def serve_image(runner: Runner, snap: SnapshotRef) -> Iterator[ExportSource]:
    """Serve a powered-off disk read-only with ``qemu-nbd`` for the body of the ``with`` (for an
    incremental with its pending bitmap as the ``qemu:dirty-bitmap:`` context).

    :raise SnapshotError: qemu-nbd could not start (a running QEMU holds the image?)
    """
    incremental = snap.details.get("kind") == "incremental"
    pending = snap.details.get("pending", "")
    server = QemuNbdServer(
        Path(snap.disk.file),
        snap.disk.format,
        bitmap=pending if incremental else None,
        persistent=True,  # several clients may read one after the other (a dead reader's is stopped by pid)
        export_name=snap.disk.name,
        runner=runner,
    )
    try:
        server.start()
    except VmsnapError as err:
        raise SnapshotError(
            f"qemu-nbd could not serve disk {snap.disk.name!r} ({snap.disk.file}): {err.message}",
            hint="is the VM running again? Back it up through its QMP socket then",
        ) from err
    try:
        yield nbd_source(snap, server.uri)
    finally:
        server.stop()
