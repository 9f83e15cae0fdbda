"""Layout ``qcow2`` (manifest format 1): per backup a directory of qcow2 images, incrementals as overlays on
their parent's images; plain files QEMU can use without vmsnap. Sealing, chains, restore to standalone images.
(:mod:`vmsnap.repo.qcow2_repo` puts it behind the repository interface.)

On disk::

    REPO/vmsnap-repo.json                   {"format": 2, "layout": "qcow2", …}, or vmsnap 0.1's {"format": 1}
    REPO/<vm>/<backup-id>/manifest.json     written last, atomically (temp file, fsync, rename, fsync dir)
    REPO/<vm>/<backup-id>/<disk>.qcow2      full: standalone; incremental: qcow2 backed by the parent's file,
                                            through a relative path (``../<parent-id>/<disk>.qcow2``)
    REPO/<vm>/<backup-id>/<disk>.chunks     sha256 of each 4 MiB chunk of the disk's content, 32 bytes each
    REPO/<vm>/.partial-<backup-id>/         staging; renamed into place when complete
    REPO/<vm>/.deleting-<backup-id>/        a backup being pruned (renamed first, so it is never half listed)
    REPO/<vm>/.lock                         flock held by a backup, prune or recover of that VM
    REPO/<vm>/.journal.json                 what a running backup has done (see :mod:`vmsnap.repo.journal`)
    REPO/<vm>/.needs-full                   the next backup must be full (a dead run touched the bitmap)

A backup exists once ``<backup-id>/manifest.json`` does; anything whose name starts with a dot is not a
backup. Backup ids are ``YYYYMMDDTHHMMSS.ffffffZ-xxxx`` (UTC, microseconds, random suffix): they sort by time.
Files are 0600 and directories 0700. ``manifest.json`` holds format, vm, backup_id, kind (full|incremental),
parent, strategy, transport, created (UTC ISO 8601), quiesced, bitmap, digest (``sha256-4MiB-chunks``), and
disks[] with name, file, virtual_size, bytes_written and sha256 (see :mod:`vmsnap.repo.manifest`).

The digest (``sha256-4MiB-chunks``, defined in :mod:`vmsnap.image.digest`): the guest-visible content of a
disk (the whole chain read through) cut in 4 MiB chunks (the last one short), ``<disk>.chunks`` the sha256
of each chunk, 32 raw bytes each, and the manifest's ``sha256`` the sha256 of ``<disk>.chunks`` — so the
manifest covers that file too. An incremental backup reads only the chunks its own image holds clusters of;
the other chunk digests are its parent's (when the parent's ``.chunks`` matches its manifest).

A backing link is good when the full backup's image has no backing file and every incremental's image names
its parent's image of the same disk by the relative path above; restore and verify check every link first.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from vmsnap.errors import ChainError, ChecksumMismatchError, NotFoundError, RepositoryError, VmsnapError
from vmsnap.files import FILE_MODE, atomic_target, fsync_dir, fsync_file, make_private_dir, write_json_atomic
from vmsnap.image.digest import (
    ChunkDigests,
    chunk_offset_text,
    image_chunks,
    read_chunks_file,
    write_chunks_file,
)
from vmsnap.image.qcow2 import read_header
from vmsnap.image.qemu_img import image_args
from vmsnap.model import validate_name
from vmsnap.repo.manifest import CHUNKS_SUFFIX, MANIFEST, DiskRecord, Manifest, read_manifest
from vmsnap.repo.progress import DiskProgress, no_progress, scaled
from vmsnap.repo.reports import RestoredDisk
from vmsnap.runner import Runner

PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"


@attrs.frozen
class Qcow2Layout:
    """The format-1 tree under ``root`` (see the module docstring): its paths, sealing, chains and restore.

    :param root: the repository directory
    :param runner: runs qemu-img
    """

    root: Path
    runner: Runner

    # -- paths ---------------------------------------------------------------------------------------

    def vm_dir(self, vm: str) -> Path:
        """``REPO/<vm>`` (the name is validated first)."""
        return self.root / validate_name(vm, "VM name")

    def backup_dir(self, vm: str, backup_id: str) -> Path:
        """``REPO/<vm>/<backup-id>``."""
        return self.vm_dir(vm) / validate_name(backup_id, "backup id")

    def staging_dir(self, vm: str, backup_id: str) -> Path:
        """``REPO/<vm>/.partial-<backup-id>``."""
        return self.vm_dir(vm) / f"{PARTIAL_PREFIX}{validate_name(backup_id, 'backup id')}"

    def image(self, manifest: Manifest, record: DiskRecord) -> Path:
        """The qcow2 image of one disk of a backup."""
        return self.backup_dir(manifest.vm, manifest.backup_id) / record.file

    def load(self, vm: str, backup_id: str) -> Manifest:
        """The manifest of backup ``backup_id`` of ``vm``.

        :raise RepositoryError: unreadable, damaged, or about another backup
        """
        return read_manifest(self.backup_dir(vm, backup_id) / MANIFEST, vm, backup_id)

    # -- sealing -------------------------------------------------------------------------------------

    def digest_staged(
        self, staging: Path, disk: str, virtual_size: int, *, parent: Manifest | None = None
    ) -> str:
        """Compute the chunk digests of the staged ``<disk>.qcow2``, write them to ``<disk>.chunks`` (0600,
        fsync'd) and return the disk's digest (the manifest's ``sha256``).

        With ``parent`` (an incremental whose image is backed by the parent's image of ``disk``), only the
        chunks the staged image itself holds clusters of are read; the others are the parent's. A parent
        whose chunk digests do not match its manifest is not trusted: then every chunk is read.

        :raise RepositoryError: the staged image is missing
        :raise VmsnapError: the image cannot be read (qemu-img or a read failed)
        """
        image = staging / f"{validate_name(disk, 'disk name')}.qcow2"
        if not image.is_file():
            raise RepositoryError(f"staged backup {staging} lacks {image.name}")
        known: ChunkDigests | None = None
        if parent is not None and backed_by(image, self.backup_dir(parent.vm, parent.backup_id) / image.name):
            with contextlib.suppress(RepositoryError, NotFoundError):
                known = self.chunk_digests(parent, disk)
        chunks = image_chunks(image, "qcow2", parent=known, runner=self.runner)
        if chunks.size != virtual_size:
            raise RepositoryError(
                f"staged image {image} has virtual size {chunks.size}, the disk has {virtual_size}",
                hint="the backup is incomplete; take it again",
            )
        write_chunks_file(staging / f"{disk}{CHUNKS_SUFFIX}", chunks)
        return chunks.root

    def chunk_digests(self, manifest: Manifest, disk: str) -> ChunkDigests:
        """The stored chunk digests of ``disk`` in a backup, checked against the manifest's sha256.

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: the file is missing or unreadable
        :raise ChecksumMismatchError: its content does not match the manifest's sha256
        """
        record = manifest.disk(disk)
        path = self.backup_dir(manifest.vm, manifest.backup_id) / record.chunks_file
        chunks = read_chunks_file(path, record.virtual_size)
        if chunks.root != record.sha256:
            raise ChecksumMismatchError(
                f"chunk digests {path} do not match the manifest's sha256 {record.sha256[:16]}…",
                hint="the backup is damaged: run `vmsnap verify` and restore another backup",
            )
        return chunks

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Seal a staged backup: files 0600 and fsync'd, manifest written last, staging renamed into place.

        :raise RepositoryError: a disk image or chunk digests file named in the manifest is missing from the
            staging directory, or the digests do not match the manifest's sha256
        """
        for record in manifest.disks:
            image = staging / record.file
            if not image.is_file():
                raise RepositoryError(f"staged backup {staging} lacks {record.file}")
            os.chmod(image, FILE_MODE)
            fsync_file(image)
            chunks = read_chunks_file(staging / record.chunks_file, record.virtual_size)
            if chunks.root != record.sha256:
                raise RepositoryError(
                    f"staged {record.chunks_file} does not match the manifest's sha256 {record.sha256[:16]}…",
                    hint="compute the digest with Repository.digest_staged",
                )
            os.chmod(staging / record.chunks_file, FILE_MODE)
            fsync_file(staging / record.chunks_file)
        write_json_atomic(staging / MANIFEST, manifest.to_json())
        final = self.backup_dir(manifest.vm, manifest.backup_id)
        os.rename(staging, final)
        fsync_dir(final.parent)
        return final

    # -- chains --------------------------------------------------------------------------------------

    def chain(self, manifest: Manifest) -> list[Manifest]:
        """``manifest`` and its ancestors, oldest (the full backup) first.

        :raise ChainError: a parent is missing, or the links loop
        :raise RepositoryError: a parent's manifest is damaged
        """
        chain = [manifest]
        seen = {manifest.backup_id}
        current = manifest
        while current.parent is not None:
            if not (self.backup_dir(current.vm, current.parent) / MANIFEST).is_file():
                raise ChainError(
                    f"backup {current.vm}/{current.backup_id} needs parent {current.parent}, "
                    "which is missing",
                    hint="restore an older full backup, or take a new full backup",
                )
            if current.parent in seen:
                raise ChainError(f"the chain of {manifest.backup_id} loops at {current.parent}")
            current = self.load(current.vm, current.parent)
            seen.add(current.backup_id)
            chain.append(current)
        chain.reverse()
        if chain[0].kind != "full":
            raise ChainError(f"the chain of {manifest.backup_id} does not start with a full backup")
        return chain

    def link_problem(self, chain: Sequence[Manifest], disk: str) -> str | None:
        """The first thing wrong with the images of ``disk`` along ``chain`` (oldest first), or None: a
        missing disk or image, an unreadable image, or a backing link other than the relative path to the
        parent's image."""
        previous: Manifest | None = None
        for manifest in chain:
            try:
                record = manifest.disk(disk)
            except NotFoundError:
                return f"{manifest.backup_id} in its chain has no disk {disk}"
            image = self.image(manifest, record)
            if not image.is_file():
                return f"image {image} is missing"
            expected = self.image(previous, record) if previous is not None else None
            try:
                problem = _link_problem(image, expected)
            except RepositoryError as err:
                return err.message
            if problem is not None:
                return problem
            previous = manifest
        return None

    def check_links(self, chain: Sequence[Manifest], disk: str) -> None:
        """Raise for the :meth:`link_problem` of ``disk`` along ``chain``.

        :raise ChainError: naming the backup, the disk and the problem
        """
        problem = self.link_problem(chain, disk)
        if problem is not None:
            raise ChainError(
                f"chain of {chain[-1].vm}/{chain[-1].backup_id}, disk {disk}: {problem}",
                hint="restore an older backup, or take a new full backup",
            )

    # -- restore -------------------------------------------------------------------------------------

    def restore(
        self,
        manifest: Manifest,
        to: Path,
        *,
        disks: Sequence[str] = (),
        progress: DiskProgress = no_progress,
        format: str = "qcow2",
    ) -> list[RestoredDisk]:
        """Write standalone ``to/<disk>.qcow2`` images (``format`` "raw": sparse ``to/<disk>.raw`` files) of a
        backup and check each against its sha256.

        Every backing link and every chunk digests file is checked before anything is written; each image
        is converted from the chain's top (``qemu-img convert``), read back and its chunk digests compared
        with the manifest before it gets its final name; nothing in ``to`` is overwritten.

        :param disks: restore only these disks (default: all)
        :raise NotFoundError: no such disk
        :raise ChainError: a parent of the backup is missing or a backing link points elsewhere
        :raise ChecksumMismatchError: the restored content differs from what was backed up (image removed),
            or a chunk digests file does not match the manifest (before anything is written)
        :raise VmsnapError: ``to/<disk>.qcow2`` exists already
        """
        chain = self.chain(manifest)
        records = [manifest.disk(d) for d in disks] if disks else list(manifest.disks)
        for record in records:
            self.check_links(chain, record.name)
        make_private_dir(to)
        for record in records:
            if (to / f"{record.name}.{format}").exists():
                raise VmsnapError(
                    f"{to / f'{record.name}.{format}'} exists already; restore never overwrites",
                    hint="restore into an empty directory, or move that file away",
                )
        expected = {record.name: self.chunk_digests(manifest, record.name) for record in records}
        return [
            self._restore_disk(
                manifest, record, to / f"{record.name}.{format}", expected[record.name], progress
            )
            for record in records
        ]

    def _restore_disk(
        self,
        manifest: Manifest,
        record: DiskRecord,
        final: Path,
        expected: ChunkDigests,
        progress: DiskProgress,
    ) -> RestoredDisk:
        """Convert one disk of a backup to ``final`` (its suffix is the format: qcow2 or raw); the image gets
        that name only once its content matches ``expected`` (else it is removed).

        :raise ChecksumMismatchError: the restored content differs from ``expected``
        """
        fmt = "raw" if final.suffix == ".raw" else "qcow2"
        progress(record.name, 0, record.virtual_size)
        with atomic_target(final) as partial:
            # -W: out-of-order writes, so the reads of a chain do not serialise the copy (4x faster)
            self.runner.run(
                [
                    *("qemu-img", "convert", "-q", "-W", "-m", "16", "-O", fmt),
                    *image_args(self.image(manifest, record), "qcow2"),
                    str(partial),
                ],
                timeout=None,
            )
            # the image goes to disk while it is read back from the page cache and hashed
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as syncer:
                synced = syncer.submit(fsync_file, partial)
                got = image_chunks(
                    partial,
                    fmt,
                    runner=self.runner,
                    progress=scaled(progress, record.name, record.virtual_size),
                )
                synced.result()
            if got.root != record.sha256:
                raise ChecksumMismatchError(
                    f"restored {record.name} of {manifest.vm}/{manifest.backup_id} "
                    f"has sha256 {got.root[:16]}…, the manifest says {record.sha256[:16]}…"
                    + difference_text(expected, got),
                    hint="the backup is damaged: run `vmsnap verify` and restore an older backup",
                )
        progress(record.name, record.virtual_size, record.virtual_size)
        return RestoredDisk(record.name, final, record.virtual_size, got.root)


def _link_problem(image: Path, parent_image: Path | None) -> str | None:
    """What is wrong with ``image``'s backing link, or None: a full backup's image (no ``parent_image``) has
    none, an incremental's names ``parent_image`` by a relative path.

    :raise RepositoryError: ``image`` is not a readable qcow2 image
    """
    backing = qcow2_backing_file(image)
    if parent_image is None:
        return f"{image} is a full backup but has a backing file {backing!r}" if backing is not None else None
    if backing is None:
        return f"{image} should be backed by {parent_image} but has no backing file"
    if os.path.isabs(backing):
        return f"{image} has an absolute backing path {backing!r}; it must be relative"
    if os.path.normpath(image.parent / backing) != os.path.normpath(parent_image):
        return f"{image} is backed by {backing!r}, not by its parent's {parent_image.name}"
    return None


def backed_by(image: Path, parent_image: Path) -> bool:
    """True when ``image``'s backing file is ``parent_image`` (a relative name resolved from its directory).

    :raise RepositoryError: ``image`` is not a readable qcow2 image
    """
    backing = qcow2_backing_file(image)
    return backing is not None and os.path.normpath(image.parent / backing) == os.path.normpath(parent_image)


def qcow2_backing_file(image: Path) -> str | None:
    """The backing file name stored in a qcow2 header (as written, relative or not), or None.

    :raise RepositoryError: not a qcow2 image, or unreadable
    """
    try:
        return read_header(image).backing_file
    except ValueError as err:
        raise RepositoryError(str(err), hint="the backup is damaged") from err
    except OSError as err:
        raise RepositoryError(f"cannot read {image}: {err.strerror or err}") from err


def difference_text(expected: ChunkDigests, got: ChunkDigests) -> str:
    """ " (first difference in chunk 3 (offset 12 MiB), 2 chunk(s) differ)", or "" when not comparable."""
    if expected.size != got.size:
        return f" (virtual size {got.size}, expected {expected.size})"
    differing = expected.differing(got)
    if not differing:
        return ""
    return f" (first difference in {chunk_offset_text(differing[0])}, {len(differing)} chunk(s) differ)"
