"""Which bytes a restore serves: a backup in a repository, resolved into one source per disk (and the libvirt
definition saved with it), so ``vmsnap mount`` and ``vmsnap instant-restore`` name a backup as every other
command does (``--repo``, ``--vm``, ``--backup``, ``--disk``).

Format-1 repositories (``qcow2`` layout) give :class:`~vmsnap.restore.source.ImageSource` values (QEMU follows
each incremental's relative backing links); the ``chunks`` layout will give
:class:`~vmsnap.restore.source.ReaderSource` values built on its chunk reader — one branch here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from vmsnap.errors import NotFoundError, UnsupportedError
from vmsnap.model import validate_name
from vmsnap.repo.qcow2_repo import Qcow2Repository
from vmsnap.repo.repository import Repository
from vmsnap.restore.source import BackupSource, ImageSource

DOMAIN_XML = "domain.xml"
"""The libvirt definition a backup of a domain keeps (written by the backup run)."""


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


def resolve(repo: Path, vm: str, backup_id: str | None = None, disks: Sequence[str] = ()) -> ResolvedBackup:
    """Resolve a backup (the latest of ``vm`` by default) into sources.

    :param disks: only these disks (default: all)
    :raise RepositoryError: ``repo`` is not a repository vmsnap reads
    :raise NotFoundError: no such VM, backup or disk (the message lists what exists)
    :raise ChainError: a parent the backup needs is missing
    """
    repository = Repository.open(repo)
    if not isinstance(repository, Qcow2Repository):
        raise UnsupportedError(
            f"{repo} is a {repository.name} repository: mount and instant restore read qcow2 ones only",
            hint="restore the backup (`vmsnap restore`) and use its images, or copy it to a qcow2 repository",
        )
    manifest = repository.get(vm, backup_id)
    repository.chain(manifest)  # a missing parent fails here, not later inside QEMU
    directory = repository.backup_dir(manifest.vm, manifest.backup_id)
    names = [d.name for d in manifest.disks]
    for disk in disks:
        validate_name(disk, "disk name")
        if disk not in names:
            raise NotFoundError(
                f"backup {manifest.backup_id} of {vm} has no disk {disk!r}",
                hint=f"its disks: {', '.join(names)}",
            )
    root = os.path.realpath(repository.root)
    sources: dict[str, BackupSource] = {}
    for record in manifest.disks:
        if disks and record.name not in disks:
            continue
        identity = f"qcow2:{root}/{manifest.vm}/{manifest.backup_id}/{record.name}"
        sources[record.name] = ImageSource(directory / record.file, "qcow2", identity)
    saved = directory / DOMAIN_XML
    xml = saved.read_text(encoding="utf-8") if saved.is_file() else None
    return ResolvedBackup(manifest.vm, manifest.backup_id, sources, xml)
