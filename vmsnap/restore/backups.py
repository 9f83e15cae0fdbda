"""Which bytes a restore serves: a backup in a repository, resolved into one source per disk (and the libvirt
definition saved with it), so ``vmsnap mount`` and ``vmsnap instant-restore`` name a backup as every other
command does (``--repo``, ``--vm``, ``--backup``, ``--disk``, ``--key-file``).

The repository answers, not this module: ``disk_source(manifest, disk)`` gives an
:class:`~vmsnap.image.sources.ImageSource` (``qcow2`` layout: QEMU follows each incremental's relative
backing links) or a :class:`~vmsnap.image.sources.ReaderSource` (``chunks`` layout, local or S3: a reader
that nbdkit's Python plugin builds, checking every chunk it serves), and ``definition(manifest)`` the saved
libvirt XML.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path

import attrs

from vmsnap.errors import NotFoundError, RepositoryError
from vmsnap.image.sources import BackupSource
from vmsnap.model import validate_name
from vmsnap.repo.attachments import check_sealed
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine_state import RECORD, MachineState


@attrs.frozen
class ResolvedBackup:
    """A backup's disks as sources, and what else a restore needs from it.

    :param vm: the VM's name in the repository
    :param backup_id: the backup's id (the latest when none was asked for)
    :param sources: disk name → source, in the manifest's order
    :param domain_xml: the saved libvirt definition, or None (not a libvirt domain)
    :param machine: the machine state kept with it (firmware variables, TPM state, QEMU command line), or
        None (a backup of vmsnap before 0.3, or of disk images)
    """

    vm: str
    backup_id: str
    sources: dict[str, BackupSource]
    domain_xml: str | None = None
    machine: MachineState | None = None


def read_machine_state(repo: RepositoryLayout, manifest: Manifest) -> MachineState | None:
    """The machine state kept beside a backup (:mod:`vmsnap.vm.machine_state`), its files read and checked
    (against the sha256 the manifest sealed, when it seals them: every backup since vmsnap sealed machine
    state); None when none was kept.

    :raise RepositoryError: it is damaged, or is not what the backup sealed
    """
    names = repo.attachments(manifest)
    sealed = set(manifest.objects)
    if RECORD not in names:
        if RECORD in sealed:
            raise RepositoryError(
                f"the machine state of {manifest.vm}/{manifest.backup_id} is missing: its manifest seals it",
                hint="restore without --define, or from another backup",
            )
        return None
    where = f"the machine state of {manifest.vm}/{manifest.backup_id}"

    def read(name: str) -> bytes:
        return check_sealed(manifest, name, repo.attachment(manifest, name), where=f"{where} ({name})")

    try:
        record = json.loads(read(RECORD))
    except ValueError as err:
        raise RepositoryError(f"{where} is damaged: {err}") from err
    wanted = record.get("files", []) if isinstance(record, dict) else []
    missing = [name for name in wanted if name not in names]
    if missing:
        raise RepositoryError(
            f"{where} lacks {', '.join(missing)}", hint="restore without --define, or from another backup"
        )
    return MachineState.from_json(record, {name: read(name) for name in wanted})


def resolve(
    repo: Path | str,
    vm: str,
    backup_id: str | None = None,
    disks: Sequence[str] = (),
    *,
    key_file: Path | None = None,
) -> ResolvedBackup:
    """Resolve a backup (the latest of ``vm`` by default) into sources.

    :param repo: the repository (a directory or an ``s3://`` URL)
    :param disks: only these disks (default: all)
    :param key_file: the key file of an encrypted repository
    :raise RepositoryError: ``repo`` is not a repository vmsnap reads (:class:`KeyFileError`: a wrong key)
    :raise NotFoundError: no such VM, backup or disk (the message lists what exists)
    :raise ChainError: a parent the backup needs is missing
    """
    repository = Repository.open(repo, key_file=key_file)
    manifest = repository.get(vm, backup_id)
    names = [d.name for d in manifest.disks]
    for disk in disks:
        validate_name(disk, "disk name")
        if disk not in names:
            raise NotFoundError(
                f"backup {manifest.backup_id} of {manifest.vm} has no disk {disk!r}",
                hint=f"its disks: {', '.join(names)}",
            )
    chosen = [n for n in names if not disks or n in disks]
    sources = {name: repository.disk_source(manifest, name) for name in chosen}
    definition = repository.definition(manifest)
    machine = read_machine_state(repository, manifest)
    return ResolvedBackup(manifest.vm, manifest.backup_id, sources, definition, machine)


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
