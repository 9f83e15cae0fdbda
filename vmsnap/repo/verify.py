"""``verify``: re-read backups of the ``qcow2`` layout and check every backing link, virtual size and chunk
digest against the manifest, with QEMU's reader or an independent one (libqcow); problems are collected.

An incremental whose parent verified in the same run is read only where its own image holds clusters (the
rest reads as the parent, just checked); its content must still match its own manifest, so damage in a chunk
only the parent holds fails the incremental too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from vmsnap.errors import ChainError, RepositoryError, UsageError, VmsnapError
from vmsnap.image import libqcow
from vmsnap.image.digest import ChunkDigests, image_chunks
from vmsnap.repo.manifest import Damaged, DiskRecord, Manifest
from vmsnap.repo.progress import DiskProgress, scaled
from vmsnap.repo.qcow2_layout import Qcow2Layout, difference_text
from vmsnap.repo.reports import VerifyProblem, VerifyReport

log = logging.getLogger(__name__)

Reader = Literal["auto", "qemu", "libqcow"]
ChosenReader = Literal["qemu", "libqcow"]


def choose_reader(reader: Reader) -> ChosenReader:
    """The reader ``verify`` uses: "auto" is libqcow when pyqcow is installed, else qemu.

    :raise UsageError: "libqcow" without pyqcow installed
    """
    if reader == "qemu":
        return "qemu"
    if libqcow.available():
        return "libqcow"
    if reader == "libqcow":
        raise UsageError(
            "reader libqcow needs the optional qcow extra (pyqcow)",
            hint="pip install 'vmsnap[qcow]', or use --reader qemu",
        )
    return "qemu"


def verify_backups(
    layout: Qcow2Layout,
    targets: Sequence[Manifest],
    *,
    reader: ChosenReader,
    progress: DiskProgress,
    damaged: Sequence[Damaged] = (),
) -> VerifyReport:
    """Check ``targets`` (oldest first per VM); ``damaged`` backups count as checked, each with a problem.

    :param reader: which reader reads the images (see :func:`choose_reader`)
    """
    problems = [VerifyProblem(d.vm, d.backup_id, "", d.error.message) for d in damaged]
    checked = [(m.vm, m.backup_id) for m in targets] + [(d.vm, d.backup_id) for d in damaged]
    # (vm, backup id, disk) → digests of content verified in this run: an incremental on top of one is
    # read only where its own image holds clusters (elsewhere it reads as its parent, just verified)
    verified: dict[tuple[str, str, str], ChunkDigests] = {}
    for manifest in targets:
        problems += _verify_backup(layout, manifest, reader, progress, verified)
    return VerifyReport(reader, tuple(sorted(checked)), tuple(problems))


def _verify_backup(
    layout: Qcow2Layout,
    manifest: Manifest,
    reader: ChosenReader,
    progress: DiskProgress,
    verified: dict[tuple[str, str, str], ChunkDigests],
) -> list[VerifyProblem]:
    """The problems of one backup: its chain, then each disk's links and content. Adds the digests of each
    disk that verified to ``verified``."""

    def problem(disk: str, message: str) -> VerifyProblem:
        return VerifyProblem(manifest.vm, manifest.backup_id, disk, message)

    try:
        chain = layout.chain(manifest)
    except ChainError as err:
        return [problem("", err.message)]
    found: list[VerifyProblem] = []
    for record in manifest.disks:
        link = layout.link_problem(chain, record.name)
        if link is not None:
            found.append(problem(record.name, link))
            continue
        parent = verified.get((manifest.vm, manifest.parent or "", record.name))
        messages, content = _verify_disk(layout, manifest, record, reader, progress, parent)
        found += [problem(record.name, m) for m in messages]
        if not messages and content is not None:
            verified[(manifest.vm, manifest.backup_id, record.name)] = content
    return found


def _verify_disk(
    layout: Qcow2Layout,
    manifest: Manifest,
    record: DiskRecord,
    reader: ChosenReader,
    progress: DiskProgress,
    parent: ChunkDigests | None,
) -> tuple[list[str], ChunkDigests | None]:
    """What is wrong with one disk of a backup (its chunk digests file, its size, its content), and the
    digests of its content as read (None when it could not be read).

    :param parent: the verified digests of the parent backup's content (incrementals): then only the
        chunks the image's own layer touches are read
    """
    problems: list[str] = []
    stored: ChunkDigests | None = None
    try:
        stored = layout.chunk_digests(manifest, record.name)
    except RepositoryError as err:
        problems.append(err.message)
    progress(record.name, 0, record.virtual_size)
    image = layout.image(manifest, record)
    try:
        if parent is not None and parent.size != record.virtual_size:
            parent = None
        read = "its own clusters on its verified parent" if parent is not None else "in full"
        log.debug("verify %s/%s disk %s: read %s", manifest.vm, manifest.backup_id, record.name, read)
        if reader == "libqcow":
            content = libqcow.libqcow_chunks(image, parent=parent)
        else:
            on_chunks = scaled(progress, record.name, record.virtual_size)
            content = image_chunks(image, "qcow2", parent=parent, runner=layout.runner, progress=on_chunks)
    except (VmsnapError, OSError) as err:
        return [*problems, f"unreadable: {err}"], None
    progress(record.name, record.virtual_size, record.virtual_size)
    if content.size != record.virtual_size:
        problems.append(f"virtual size {content.size}, the manifest says {record.virtual_size}")
    elif content.root != record.sha256:
        where = difference_text(stored, content) if stored is not None else ""
        problems.append(
            f"sha256 {content.root[:16]}… does not match the manifest's {record.sha256[:16]}…{where}"
        )
    return problems, content
