"""The backup repository (format 1): backups on disk, their chains, restore, verify, list and retention.

Layout::

    REPO/vmsnap-repo.json                   {"format": 1}
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
disks[] with name, file, virtual_size, bytes_written and sha256: the digest of the guest-visible content (the
whole chain read through) as :mod:`vmsnap.image.digest` defines it — the sha256 of ``<disk>.chunks``, so the
manifest covers that file too. An incremental backup reads only the chunks its own image holds clusters of;
the other chunk digests are its parent's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import (
    ChainError,
    ChecksumMismatchError,
    NotFoundError,
    RepositoryError,
    UsageError,
    VmsnapError,
)
from vmsnap.files import DIR_MODE, FILE_MODE, fsync_dir, fsync_file, make_private_dir, write_json_atomic
from vmsnap.image.digest import (
    ALGORITHM,
    ChunkDigests,
    chunk_offset_text,
    image_chunks,
    read_chunks_file,
    write_chunks_file,
)
from vmsnap.image.libqcow import libqcow_chunks
from vmsnap.image.qcow2 import read_header
from vmsnap.model import validate_name
from vmsnap.runner import LocalRunner, Runner

REPO_FORMAT = 1
MARKER = "vmsnap-repo.json"
MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
NEEDS_FULL = ".needs-full"
LOCK = ".lock"
CHUNKS_SUFFIX = ".chunks"

Kind = Literal["full", "incremental"]
Reader = Literal["auto", "qemu", "libqcow"]
DiskProgress = Callable[[str, int, int], None]
"""Progress of a repository operation: (disk name, bytes done, bytes total)."""


def _no_progress(disk: str, done: int, total: int) -> None:
    pass


def new_backup_id(now: dt.datetime | None = None) -> str:
    """A backup id that sorts by time: ``20261127T120812.123456Z-3f9a`` (UTC)."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{moment:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(2)}"


def utc_now_iso() -> str:
    """The current UTC time in ISO 8601 with a ``Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- manifest ------------------------------------------------------------------------------------------


@attrs.frozen
class DiskRecord:
    """One disk of a backup, as the manifest lists it.

    :param name: the disk's name (a valid path component)
    :param file: its image in the backup directory, always ``<name>.qcow2``
    :param virtual_size: guest-visible size in bytes
    :param bytes_written: what the transport (or QEMU) wrote for this backup
    :param sha256: the ``sha256-4MiB-chunks`` digest of the guest-visible content (the whole chain read
        through), hex; equal to the sha256 of the ``<name>.chunks`` file
    """

    name: str
    file: str
    virtual_size: int
    bytes_written: int
    sha256: str

    @property
    def chunks(self) -> str:
        """The file of its chunk digests in the backup directory, ``<name>.chunks``."""
        return f"{self.name}{CHUNKS_SUFFIX}"

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object for this disk."""
        return attrs.asdict(self)


@attrs.frozen
class Manifest:
    """Everything recorded about one backup (``manifest.json``)."""

    vm: str
    backup_id: str
    kind: Kind
    parent: str | None
    strategy: str
    transport: str
    created: str
    quiesced: bool
    bitmap: str | None
    disks: tuple[DiskRecord, ...]
    format: int = REPO_FORMAT
    digest: str = ALGORITHM

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``."""
        data = attrs.asdict(self, recurse=False)
        data["disks"] = [d.to_json() for d in self.disks]
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: Path) -> Manifest:
        """Parse and check a manifest read from ``where``.

        :raise RepositoryError: malformed, of another format, or naming files outside its directory
        """
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            if data.get("format") != REPO_FORMAT:
                raise RepositoryError(
                    f"{where} has manifest format {data.get('format')!r}; this vmsnap reads {REPO_FORMAT}",
                    hint="use the vmsnap version that wrote this repository",
                )
            if data.get("digest") != ALGORITHM:
                raise RepositoryError(
                    f"{where} has digest {data.get('digest')!r}; this vmsnap knows {ALGORITHM}",
                    hint="use the vmsnap version that wrote this repository",
                )
            disks = []
            for d in data["disks"]:
                name = validate_name(str(d["name"]), "disk name")
                if d["file"] != f"{name}.qcow2":
                    raise ValueError(f"disk {name} names file {d['file']!r}, not {name}.qcow2")
                disks.append(
                    DiskRecord(
                        name, d["file"], int(d["virtual_size"]), int(d["bytes_written"]), str(d["sha256"])
                    )
                )
            kind = data["kind"]
            if kind not in ("full", "incremental"):
                raise ValueError(f"kind {kind!r}")
            parent = data.get("parent")
            if kind == "incremental" and not parent:
                raise ValueError("an incremental backup without a parent")
            return cls(
                vm=validate_name(str(data["vm"]), "VM name"),
                backup_id=validate_name(str(data["backup_id"]), "backup id"),
                kind=kind,
                parent=validate_name(str(parent), "backup id") if parent else None,
                strategy=str(data["strategy"]),
                transport=str(data["transport"]),
                created=str(data["created"]),
                quiesced=bool(data["quiesced"]),
                bitmap=data.get("bitmap"),
                disks=tuple(disks),
            )
        except RepositoryError:
            raise
        except (KeyError, TypeError, ValueError, UsageError) as err:
            raise RepositoryError(
                f"manifest {where} is damaged: {err}",
                hint="run `vmsnap verify`; restore from another backup",
            ) from err

    def disk(self, name: str) -> DiskRecord:
        """The record of disk ``name``.

        :raise NotFoundError: listing the disks it has
        """
        for record in self.disks:
            if record.name == name:
                return record
        raise NotFoundError(
            f"backup {self.backup_id} has no disk {name!r}",
            hint=f"its disks: {', '.join(d.name for d in self.disks)}",
        )

    @property
    def size(self) -> int:
        """Bytes written for this backup, all disks."""
        return sum(d.bytes_written for d in self.disks)


# -- results -------------------------------------------------------------------------------------------


@attrs.frozen
class RestoredDisk:
    """One image ``restore`` wrote: where, its size, and its (checked) sha256."""

    name: str
    path: Path
    virtual_size: int
    sha256: str


@attrs.frozen
class VerifyProblem:
    """One thing ``verify`` found wrong (``disk`` is "" when it concerns the whole backup)."""

    vm: str
    backup_id: str
    disk: str
    message: str

    def __str__(self) -> str:
        where = f"{self.vm}/{self.backup_id}" + (f"/{self.disk}" if self.disk else "")
        return f"{where}: {self.message}"


@attrs.frozen
class Damaged:
    """A backup directory whose manifest cannot be used, and why."""

    vm: str
    backup_id: str
    error: RepositoryError


@attrs.frozen
class VerifyReport:
    """What ``verify`` checked (``(vm, backup id)`` pairs), with which reader, and what it found."""

    reader: str
    checked: tuple[tuple[str, str], ...]
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@attrs.frozen
class PruneResult:
    """What ``prune`` removed and kept (ids, oldest first); ``needed`` are old ones kept for a chain."""

    vm: str
    removed: tuple[str, ...]
    kept: tuple[str, ...]
    needed: tuple[str, ...]


# -- the repository ------------------------------------------------------------------------------------


class Repository:
    """A directory of backups in format 1 (see the module docstring).

    Use :meth:`open` (or :meth:`create`): the constructor does no I/O.

    :param root: the repository directory
    :param runner: runs qemu-img (default: this host)
    """

    def __init__(self, root: Path, *, runner: Runner | None = None) -> None:
        self.root = Path(root)
        self.runner: Runner = runner if runner is not None else LocalRunner()

    # -- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, create: bool = False, runner: Runner | None = None) -> Repository:
        """Open the repository at ``root``; with ``create``, make one in a missing or empty directory.

        :raise RepositoryError: no repository there, a non-empty directory that is not one, or another format
        """
        repo = cls(Path(root), runner=runner)
        marker = repo.root / MARKER
        if not marker.exists():
            if not create:
                raise RepositoryError(
                    f"no vmsnap repository at {repo.root} (no {MARKER})",
                    hint="check --repo; `vmsnap backup --repo DIR` creates one in a new or empty directory",
                )
            if repo.root.exists() and (not repo.root.is_dir() or any(repo.root.iterdir())):
                raise RepositoryError(
                    f"{repo.root} is not empty and not a vmsnap repository",
                    hint="choose a new or empty directory for --repo",
                )
            make_private_dir(repo.root)
            write_json_atomic(marker, {"format": REPO_FORMAT})
            return repo
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
            version = data["format"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RepositoryError(
                f"{marker} is unreadable or damaged: {err}", hint="check the path and its permissions"
            ) from err
        if version != REPO_FORMAT:
            raise RepositoryError(
                f"repository {repo.root} has format {version!r}; this vmsnap reads format {REPO_FORMAT}",
                hint="use the vmsnap version that wrote it",
            )
        return repo

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

    def journal_path(self, vm: str) -> Path:
        """``REPO/<vm>/.journal.json``."""
        return self.vm_dir(vm) / ".journal.json"

    # -- reading -------------------------------------------------------------------------------------

    def vms(self) -> list[str]:
        """The VMs that have a directory here, sorted."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _valid(p.name)
        )

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]:
        """Complete backups (those with a manifest) of ``vm``, or of every VM; oldest first per VM.

        :param damaged: collect backups whose manifest is damaged here instead of raising
        :raise RepositoryError: a manifest is damaged (without ``damaged``)
        """
        vms = [validate_name(vm, "VM name")] if vm is not None else self.vms()
        found: list[Manifest] = []
        for name in vms:
            vm_dir = self.root / name
            if not vm_dir.is_dir():
                continue
            for entry in sorted(vm_dir.iterdir()):
                if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                    continue
                try:
                    found.append(self._read_manifest(entry / MANIFEST, name, entry.name))
                except RepositoryError as err:
                    if damaged is None:
                        raise
                    damaged.append(Damaged(name, entry.name, err))
        return found

    def _read_manifest(self, path: Path, vm: str, backup_id: str) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RepositoryError(
                f"manifest {path} is unreadable: {err}", hint="run `vmsnap verify`; restore another backup"
            ) from err
        manifest = Manifest.from_json(data, where=path)
        if manifest.vm != vm or manifest.backup_id != backup_id:
            raise RepositoryError(
                f"manifest {path} says {manifest.vm}/{manifest.backup_id}, not {vm}/{backup_id}",
                hint="a backup directory was renamed or copied by hand; move it back",
            )
        return manifest

    def get(self, vm: str, backup_id: str | None = None) -> Manifest:
        """The backup ``backup_id`` of ``vm`` (the latest when None).

        :raise NotFoundError: no such VM or backup (with the ids that exist)
        """
        if backup_id is not None:
            validate_name(backup_id, "backup id")
        damaged: list[Damaged] = []
        backups = self.backups(vm, damaged=damaged)
        for bad in damaged:  # the one asked for, or a newer one than the latest good
            if bad.backup_id == backup_id or (
                backup_id is None and (not backups or bad.backup_id > backups[-1].backup_id)
            ):
                raise bad.error
        if not backups:
            raise NotFoundError(
                f"no backups of VM {vm!r} in {self.root}",
                hint=f"VMs in this repository: {', '.join(self.vms()) or 'none'}",
            )
        if backup_id is None:
            return backups[-1]
        for manifest in backups:
            if manifest.backup_id == backup_id:
                return manifest
        raise NotFoundError(
            f"no backup {backup_id!r} of VM {vm!r}",
            hint=f"`vmsnap list --repo {self.root} --vm {vm}` shows them; latest is {backups[-1].backup_id}",
        )

    def latest(self, vm: str) -> Manifest | None:
        """The newest backup of ``vm``, or None.

        :raise RepositoryError: the newest backup's manifest is damaged
        """
        try:
            return self.get(vm)
        except NotFoundError:
            return None

    def chain(self, manifest: Manifest) -> list[Manifest]:
        """``manifest`` and its ancestors, oldest (the full backup) first.

        :raise ChainError: a parent is missing, or the links loop
        """
        chain = [manifest]
        seen = {manifest.backup_id}
        current = manifest
        while current.parent is not None:
            parent_dir = self.backup_dir(current.vm, current.parent)
            if not (parent_dir / MANIFEST).is_file():
                raise ChainError(
                    f"backup {current.vm}/{current.backup_id} needs parent {current.parent}, "
                    "which is missing",
                    hint="restore an older full backup, or take a new full backup",
                )
            if current.parent in seen:
                raise ChainError(f"the chain of {manifest.backup_id} loops at {current.parent}")
            current = self._read_manifest(parent_dir / MANIFEST, current.vm, current.parent)
            seen.add(current.backup_id)
            chain.append(current)
        chain.reverse()
        if chain[0].kind != "full":
            raise ChainError(f"the chain of {manifest.backup_id} does not start with a full backup")
        return chain

    # -- writing -------------------------------------------------------------------------------------

    def new_backup_id(self, vm: str) -> str:
        """A fresh id for ``vm`` that sorts after every id it has (backups, staging, or being pruned)."""
        vm_dir = self.vm_dir(vm)
        existing = [
            p.name.removeprefix(PARTIAL_PREFIX).removeprefix(DELETING_PREFIX)
            for p in (vm_dir.iterdir() if vm_dir.is_dir() else [])
        ]
        newest = max((e for e in existing if e[:1].isdigit()), default="")
        moment = dt.datetime.now(dt.UTC)
        candidate = new_backup_id(moment)
        while candidate <= newest:  # a clock that went back: step past the newest id
            moment += dt.timedelta(microseconds=1)
            candidate = new_backup_id(max(moment, _id_time(newest) + dt.timedelta(microseconds=1)))
        return candidate

    @contextlib.contextmanager
    def lock(self, vm: str) -> Iterator[None]:
        """Hold ``REPO/<vm>/.lock`` (flock) for the body: one backup, prune or recover of a VM at a time.

        The kernel drops the lock when the holder dies, so a killed run never leaves it held.

        :raise RepositoryError: another process holds it
        """
        vm_dir = make_private_dir(self.vm_dir(vm))
        fd = os.open(vm_dir / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise RepositoryError(
                    f"another vmsnap run holds {vm_dir / LOCK} (a backup, prune or recover of {vm})",
                    hint="wait for it to finish; a killed run releases the lock by itself",
                ) from err
            yield
        finally:
            os.close(fd)

    def stage(self, vm: str, backup_id: str) -> Path:
        """Create the staging directory of a new backup (0700) and return it."""
        make_private_dir(self.vm_dir(vm))
        staging = self.staging_dir(vm, backup_id)
        staging.mkdir(mode=DIR_MODE)
        fsync_dir(staging.parent)
        return staging

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
        parent_image = self.backup_dir(parent.vm, parent.backup_id) / image.name if parent else None
        if parent is not None and parent_image is not None and self._backed_by(image, parent_image):
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

    @staticmethod
    def _backed_by(image: Path, parent_image: Path) -> bool:
        backing = qcow2_backing_file(image)
        return backing is not None and os.path.normpath(image.parent / backing) == os.path.normpath(
            parent_image
        )

    def chunk_digests(self, manifest: Manifest, disk: str) -> ChunkDigests:
        """The stored chunk digests of ``disk`` in a backup, checked against the manifest's sha256.

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: the file is missing or unreadable
        :raise ChecksumMismatchError: its content does not match the manifest's sha256
        """
        record = manifest.disk(disk)
        path = self.backup_dir(manifest.vm, manifest.backup_id) / record.chunks
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
            chunks = read_chunks_file(staging / record.chunks, record.virtual_size)
            if chunks.root != record.sha256:
                raise RepositoryError(
                    f"staged {record.chunks} does not match the sha256 {record.sha256[:16]}… of the manifest",
                    hint="compute the digest with Repository.digest_staged",
                )
            os.chmod(staging / record.chunks, FILE_MODE)
            fsync_file(staging / record.chunks)
        write_json_atomic(staging / MANIFEST, manifest.to_json())
        final = self.backup_dir(manifest.vm, manifest.backup_id)
        os.rename(staging, final)
        fsync_dir(final.parent)
        return final

    def discard(self, path: Path) -> None:
        """Remove a staging (or half-deleted) directory of this repository."""
        if path.parent.parent != self.root or not path.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)):
            raise RepositoryError(f"refusing to remove {path}: not a staging directory of {self.root}")
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(path.parent)

    def leftovers(self, vm: str) -> list[Path]:
        """Staging and half-deleted directories of ``vm`` (left by a run that died)."""
        vm_dir = self.vm_dir(vm)
        if not vm_dir.is_dir():
            return []
        return sorted(p for p in vm_dir.iterdir() if p.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)))

    def require_full(self, vm: str, reason: str) -> None:
        """Make the next backup of ``vm`` a full one (its dirty bitmap can no longer be trusted)."""
        make_private_dir(self.vm_dir(vm))
        write_json_atomic(self.vm_dir(vm) / NEEDS_FULL, {"reason": reason, "since": utc_now_iso()})

    def full_required(self, vm: str) -> str | None:
        """Why the next backup of ``vm`` must be full, or None."""
        path = self.vm_dir(vm) / NEEDS_FULL
        try:
            return str(json.loads(path.read_text(encoding="utf-8")).get("reason", "a dead run"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError):
            return "the marker file is damaged"

    def clear_full_required(self, vm: str) -> None:
        """A full backup was committed: incrementals may follow it again."""
        with contextlib.suppress(FileNotFoundError):
            (self.vm_dir(vm) / NEEDS_FULL).unlink()

    # -- restore -------------------------------------------------------------------------------------

    def restore(
        self,
        vm: str,
        backup_id: str | None,
        to: Path,
        *,
        disks: Sequence[str] = (),
        progress: DiskProgress = _no_progress,
    ) -> tuple[Manifest, list[RestoredDisk]]:
        """Write standalone ``to/<disk>.qcow2`` images of a backup and check each against its sha256.

        Each image is converted from the chain's top (``qemu-img convert``), read back and its chunk digests
        compared with the manifest before it gets its final name; nothing in ``to`` is overwritten.

        :param disks: restore only these disks (default: all)
        :raise NotFoundError: no such VM, backup or disk
        :raise ChainError: a parent of the backup is missing or a backing link points elsewhere
        :raise ChecksumMismatchError: the restored content differs from what was backed up (image removed),
            or a chunk digests file does not match the manifest (before anything is written)
        :raise VmsnapError: ``to/<disk>.qcow2`` exists already
        """
        manifest = self.get(vm, backup_id)
        chain = self.chain(manifest)
        records = [manifest.disk(d) for d in disks] if disks else list(manifest.disks)
        for record in records:
            self._check_links(chain, record.name, raise_first=True)
        make_private_dir(to)
        for record in records:
            if (to / record.file).exists():
                raise VmsnapError(
                    f"{to / record.file} exists already; restore never overwrites",
                    hint="restore into an empty directory, or move that file away",
                )
        expected = {record.name: self.chunk_digests(manifest, record.name) for record in records}
        restored: list[RestoredDisk] = []
        for record in records:
            source = self.backup_dir(vm, manifest.backup_id) / record.file
            final = to / record.file
            partial = to / f".{record.file}.partial-{secrets.token_hex(3)}"
            progress(record.name, 0, record.virtual_size)
            try:
                # -W: out-of-order writes, so the reads of a chain do not serialise the copy (4x faster)
                self.runner.run(
                    [
                        *("qemu-img", "convert", "-q", "-W", "-m", "16", "-O", "qcow2", "-f", "qcow2"),
                        *(str(source), str(partial)),
                    ],
                    timeout=None,
                )
                os.chmod(partial, FILE_MODE)
                # the image goes to disk while it is read back from the page cache and hashed
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as syncer:
                    synced = syncer.submit(fsync_file, partial)
                    got = image_chunks(
                        partial, "qcow2", runner=self.runner, progress=_scaled(progress, record)
                    )
                    synced.result()
                digest = got.root
                if digest != record.sha256:
                    raise ChecksumMismatchError(
                        f"restored {record.name} of {vm}/{manifest.backup_id} has sha256 {digest[:16]}…, "
                        f"the manifest says {record.sha256[:16]}…"
                        + _first_difference(expected[record.name], got),
                        hint="the backup is damaged: run `vmsnap verify` and restore an older backup",
                    )
                os.rename(partial, final)
                fsync_dir(to)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                raise
            progress(record.name, record.virtual_size, record.virtual_size)
            restored.append(RestoredDisk(record.name, final, record.virtual_size, digest))
        return manifest, restored

    # -- verify --------------------------------------------------------------------------------------

    def verify(
        self,
        vm: str | None = None,
        backup_id: str | None = None,
        *,
        reader: Reader = "auto",
        progress: DiskProgress = _no_progress,
    ) -> VerifyReport:
        """Re-read backups and check every checksum and chain link; collect problems, never raise for them.

        :param reader: "qemu" (qemu-img), "libqcow" (pyqcow, an independent qcow2 reader), or "auto"
            (libqcow when the optional ``qcow`` extra is installed)
        :raise NotFoundError: the named VM or backup does not exist
        :raise UsageError: reader "libqcow" without pyqcow installed
        """
        chosen = _choose_reader(reader)
        damaged: list[Damaged] = []
        if backup_id is not None:
            if vm is None:
                raise UsageError("--backup needs --vm", hint="name the VM the backup belongs to")
            targets = [self.get(vm, backup_id)]
        else:
            if vm is not None and not self.vm_dir(vm).is_dir():
                self.get(vm)  # raises NotFoundError naming the VMs there are
            targets = self.backups(vm, damaged=damaged)
        problems: list[VerifyProblem] = [
            VerifyProblem(d.vm, d.backup_id, "", d.error.message) for d in damaged
        ]
        checked: list[tuple[str, str]] = []
        # (vm, backup id, disk) → digests of content verified in this run: an incremental on top of one is
        # read only where its own image holds clusters (elsewhere it reads as its parent, just verified)
        verified: dict[tuple[str, str, str], ChunkDigests] = {}
        for manifest in targets:
            checked.append((manifest.vm, manifest.backup_id))
            try:
                chain = self.chain(manifest)
            except ChainError as err:
                problems.append(VerifyProblem(manifest.vm, manifest.backup_id, "", err.message))
                continue
            for record in manifest.disks:
                link_problems = self._check_links(chain, record.name, raise_first=False)
                problems += [
                    VerifyProblem(manifest.vm, manifest.backup_id, record.name, p) for p in link_problems
                ]
                if link_problems:
                    continue
                image = self.backup_dir(manifest.vm, manifest.backup_id) / record.file
                parent = verified.get((manifest.vm, manifest.parent or "", record.name))
                messages, content = self._verify_disk(manifest, record, image, chosen, progress, parent)
                problems += [VerifyProblem(manifest.vm, manifest.backup_id, record.name, m) for m in messages]
                if not messages and content is not None:
                    verified[(manifest.vm, manifest.backup_id, record.name)] = content
        checked += [(d.vm, d.backup_id) for d in damaged]
        return VerifyReport(chosen, tuple(sorted(checked)), tuple(problems))

    def _verify_disk(
        self,
        manifest: Manifest,
        record: DiskRecord,
        image: Path,
        reader: Literal["qemu", "libqcow"],
        progress: DiskProgress,
        parent: ChunkDigests | None = None,
    ) -> tuple[list[str], ChunkDigests | None]:
        """What is wrong with one disk of a backup (its chunk digests file, its size, its content), and the
        digests of its content as read.

        :param parent: the verified digests of the parent backup's content (incrementals): then only the
            chunks the image's own layer touches are read
        """
        problems: list[str] = []
        stored: ChunkDigests | None = None
        try:
            stored = self.chunk_digests(manifest, record.name)
        except RepositoryError as err:
            problems.append(err.message)
        progress(record.name, 0, record.virtual_size)
        try:
            if parent is not None and parent.size != record.virtual_size:
                parent = None
            if reader == "libqcow":
                content = libqcow_chunks(image, parent=parent)
            else:
                content = image_chunks(
                    image, "qcow2", parent=parent, runner=self.runner, progress=_scaled(progress, record)
                )
        except (VmsnapError, OSError) as err:
            return [*problems, f"unreadable: {err}"], None
        progress(record.name, record.virtual_size, record.virtual_size)
        if content.size != record.virtual_size:
            problems.append(f"virtual size {content.size}, the manifest says {record.virtual_size}")
        elif content.root != record.sha256:
            where = _first_difference(stored, content) if stored is not None else ""
            problems.append(
                f"sha256 {content.root[:16]}… does not match the manifest's {record.sha256[:16]}…{where}"
            )
        return problems, content

    def _check_links(self, chain: Sequence[Manifest], disk: str, *, raise_first: bool) -> list[str]:
        """Check that every image of ``disk`` along ``chain`` exists and links to its parent's image."""
        problems: list[str] = []
        previous: Manifest | None = None
        for manifest in chain:
            directory = self.backup_dir(manifest.vm, manifest.backup_id)
            try:
                record = manifest.disk(disk)
            except NotFoundError:
                problems.append(f"{manifest.backup_id} in its chain has no disk {disk}")
                break
            image = directory / record.file
            if not image.is_file():
                problems.append(f"image {image} is missing")
                break
            try:
                backing = qcow2_backing_file(image)
            except RepositoryError as err:
                problems.append(err.message)
                break
            if previous is None:
                if backing is not None:
                    problems.append(f"{image} is a full backup but has a backing file {backing!r}")
            else:
                expected = self.backup_dir(previous.vm, previous.backup_id) / record.file
                if backing is None:
                    problems.append(f"{image} should be backed by {expected} but has no backing file")
                elif os.path.isabs(backing):
                    problems.append(f"{image} has an absolute backing path {backing!r}; it must be relative")
                elif os.path.normpath(directory / backing) != os.path.normpath(expected):
                    problems.append(f"{image} is backed by {backing!r}, not by its parent's {expected.name}")
            if problems:
                break
            previous = manifest
        if problems and raise_first:
            raise ChainError(
                f"chain of {chain[-1].vm}/{chain[-1].backup_id}, disk {disk}: {problems[0]}",
                hint="restore an older backup, or take a new full backup",
            )
        return problems

    # -- prune ---------------------------------------------------------------------------------------

    def plan_prune(self, vm: str, keep_last: int) -> PruneResult:
        """Which backups of ``vm`` ``prune`` would remove: all but the last ``keep_last`` and their ancestors.

        :raise UsageError: ``keep_last`` below 1
        """
        return plan_retention(vm, self.backups(vm), keep_last)

    def prune(self, vm: str, keep_last: int, *, dry_run: bool = False) -> PruneResult:
        """Remove all but the last ``keep_last`` backups of ``vm``, keeping every parent a kept one needs.

        Each backup is first renamed to ``.deleting-<id>`` (so it is never listed half removed), then deleted.
        """
        with self.lock(vm):
            plan = self.plan_prune(vm, keep_last)
            if dry_run:
                return plan
            vm_dir = self.vm_dir(vm)
            for backup_id in plan.removed:
                doomed = vm_dir / f"{DELETING_PREFIX}{backup_id}"
                os.rename(vm_dir / backup_id, doomed)
                fsync_dir(vm_dir)
                self.discard(doomed)
            return plan


def plan_retention(vm: str, backups: Sequence[Manifest], keep_last: int) -> PruneResult:
    """Keep the newest ``keep_last`` of ``backups`` (oldest first) and the ancestors they need; drop the rest.

    :raise UsageError: ``keep_last`` below 1
    """
    if keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: keep at least one backup")
    by_id = {m.backup_id: m for m in backups}
    kept = [m.backup_id for m in backups[-keep_last:]]
    needed: list[str] = []
    for backup_id in kept:
        parent = by_id[backup_id].parent
        while parent is not None and parent in by_id:
            if parent not in kept and parent not in needed:
                needed.append(parent)
            parent = by_id[parent].parent
    keep = set(kept) | set(needed)
    removed = [m.backup_id for m in backups if m.backup_id not in keep]
    return PruneResult(vm, tuple(removed), tuple(kept), tuple(sorted(needed)))


# -- reading images --------------------------------------------------------------------------------


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except UsageError:
        return False
    return True


def _id_time(backup_id: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(backup_id.split("Z", 1)[0], "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime.now(dt.UTC)


def _scaled(progress: DiskProgress, record: DiskRecord) -> Callable[[int, int], None]:
    """A hashing progress callback (chunks done, chunks to do) reported as bytes of the disk."""

    def report(done: int, total: int) -> None:
        if total and done < total:  # the caller reports the end itself
            progress(record.name, record.virtual_size * done // total, record.virtual_size)

    return report


def _first_difference(expected: ChunkDigests, got: ChunkDigests) -> str:
    """ " (first difference in chunk 3 (offset 12 MiB), 2 chunks differ)", or "" when not comparable."""
    if expected.size != got.size:
        return f" (virtual size {got.size}, expected {expected.size})"
    differing = expected.differing(got)
    if not differing:
        return ""
    return f" (first difference in {chunk_offset_text(differing[0])}, {len(differing)} chunk(s) differ)"


def _choose_reader(reader: Reader) -> Literal["qemu", "libqcow"]:
    if reader == "qemu":
        return "qemu"
    try:
        import pyqcow  # noqa: F401
    except ImportError as err:
        if reader == "libqcow":
            raise UsageError(
                "reader libqcow needs the optional qcow extra (pyqcow)",
                hint="pip install 'vmsnap[qcow]', or use --reader qemu",
            ) from err
        return "qemu"
    return "libqcow"


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
