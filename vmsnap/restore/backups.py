"""Which bytes a restore serves: a backup in a repository, resolved into one source per disk (and the libvirt
definition saved with it), so ``vmsnap mount`` and ``vmsnap instant-restore`` name a backup as every other
command does (``--repo``, ``--vm``, ``--backup``, ``--disk``).

The repository answers, not this module: a layout that can be served without copying provides
:class:`ServesBackupDisks` — ``disk_source(manifest, disk)`` gives an
:class:`~vmsnap.image.sources.ImageSource` (``qcow2`` layout: QEMU follows each incremental's relative
backing links) or a :class:`~vmsnap.image.sources.ReaderSource` (``chunks`` layout: a reader factory that
nbdkit's Python plugin builds from string options), and ``definition(manifest)`` the saved libvirt XML.
Format-1 repositories, which predate that method, are answered by :class:`Qcow2DiskSources`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from vmsnap.errors import NotFoundError
from vmsnap.image.sources import BackupSource, ImageSource
from vmsnap.model import validate_name
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.repository import Repository

DOMAIN_XML = "domain.xml"
"""The libvirt definition a backup of a domain keeps (written by the backup run)."""


@runtime_checkable
class ServesBackupDisks(Protocol):
    """What a repository provides for mount and instant restore (see the module docstring)."""

    def disk_source(self, manifest: Manifest, disk: str) -> BackupSource:
        """The backup's disk ``disk`` as something a server can read in place.

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: what the disk needs (a parent, an index) is missing or damaged
        """
        ...

    def definition(self, manifest: Manifest) -> str | None:
        """The libvirt definition kept with the backup, or None."""
        ...


@attrs.frozen
class Qcow2DiskSources:
    """:class:`ServesBackupDisks` for a format-1 (``qcow2`` layout) repository: each disk is the top of a
    qcow2 chain in the backup's directory, checked for missing parents before QEMU would meet them."""

    repository: Repository

    def disk_source(self, manifest: Manifest, disk: str) -> BackupSource:
        record = next((d for d in manifest.disks if d.name == disk), None)
        if record is None:
            raise NotFoundError(f"backup {manifest.backup_id} of {manifest.vm} has no disk {disk!r}")
        self.repository.chain(manifest)  # a missing parent fails here, not later inside QEMU
        root = os.path.realpath(self.repository.root)
        identity = f"qcow2:{root}/{manifest.vm}/{manifest.backup_id}/{record.name}"
        directory = self.repository.backup_dir(manifest.vm, manifest.backup_id)
        return ImageSource(directory / record.file, "qcow2", identity)

    def definition(self, manifest: Manifest) -> str | None:
        saved = self.repository.backup_dir(manifest.vm, manifest.backup_id) / DOMAIN_XML
        return saved.read_text(encoding="utf-8") if saved.is_file() else None


@attrs.frozen
class ResolvedBackup:
    """A backup's disks as sources, and what else a restore needs from it.

    :param vm: the VM's name in the repository
    :param backup_id: the backup's id (the latest when none was asked for)
    :param sources: disk name → source, in the manifest's order
    :param domain_xml: the saved libvirt definition, or None (not a libvirt domain)
    """

    vm: str
    backup_id: str
    sources: dict[str, BackupSource]
    domain_xml: str | None = None


def open_repository(location: Path | str, key_file: Path | None = None) -> Repository:
    """The repository at ``location`` (a directory; an ``s3://`` URL once that store exists).

    :param key_file: an encrypted repository's key file; a ``qcow2``-layout repository is never encrypted
        and needs none
    :raise RepositoryError: nothing vmsnap reads is there
    """
    del key_file  # read by the chunks layout's Repository.open(location, key_file=…)
    return Repository.open(Path(location))


def disk_sources(repository: Repository) -> ServesBackupDisks:
    """What answers for ``repository``'s disks: the repository itself when its layout provides
    :class:`ServesBackupDisks`, else the format-1 answer."""
    if isinstance(repository, ServesBackupDisks):
        return repository
    return Qcow2DiskSources(repository)


def resolve(
    repo: Path | str,
    vm: str,
    backup_id: str | None = None,
    disks: Sequence[str] = (),
    *,
    key_file: Path | None = None,
) -> ResolvedBackup:
    """Resolve a backup (the latest of ``vm`` by default) into sources.

    :param repo: the repository (a directory, or a URL where the layout supports one)
    :param disks: only these disks (default: all)
    :param key_file: the key file of an encrypted repository
    :raise RepositoryError: ``repo`` is not a repository vmsnap reads
    :raise NotFoundError: no such VM, backup or disk (the message lists what exists)
    :raise ChainError: a parent the backup needs is missing
    """
    repository = open_repository(repo, key_file)
    manifest = repository.get(vm, backup_id)
    names = [d.name for d in manifest.disks]
    for disk in disks:
        validate_name(disk, "disk name")
        if disk not in names:
            raise NotFoundError(
                f"backup {manifest.backup_id} of {vm} has no disk {disk!r}",
                hint=f"its disks: {', '.join(names)}",
            )
    answer = disk_sources(repository)
    sources = {name: answer.disk_source(manifest, name) for name in names if not disks or name in disks}
    return ResolvedBackup(manifest.vm, manifest.backup_id, sources, answer.definition(manifest))
