"""Whole-image restore: a backup's disks as standalone, verified qcow2 images in a directory, and, for a
backup of a libvirt domain, a new domain defined on them from the definition saved with the backup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.files import write_atomic
from vmsnap.model import validate_name
from vmsnap.repo.layout import RepositoryLayout, RestoreFormat
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.reports import RestoredDisk
from vmsnap.repo.repository import Repository
from vmsnap.restore.backups import read_machine_state
from vmsnap.vm.machine_state import NVRAM


@attrs.frozen
class RestoreResult:
    """What :func:`restore_images` wrote: one checked image per disk, and the domain it defined, if any."""

    vm: str
    backup_id: str
    kind: str
    disks: tuple[RestoredDisk, ...]
    defined: str | None = None
    firmware_variables: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap restore`` (``defined`` only when a domain was defined,
        ``firmware_variables`` only when the backup's UEFI variables were written beside the images)."""
        payload: dict[str, Any] = {
            "vm": self.vm,
            "backup_id": self.backup_id,
            "kind": self.kind,
            "disks": [
                {"name": d.name, "file": str(d.path), "virtual_size": d.virtual_size, "sha256": d.sha256}
                for d in self.disks
            ],
        }
        if self.defined is not None:
            payload["defined"] = self.defined
        if self.firmware_variables is not None:
            payload["firmware_variables"] = str(self.firmware_variables)
        return payload


def restore_images(
    repo_path: Path | str,
    vm: str,
    backup_id: str | None,
    to: Path,
    *,
    disks: Sequence[str] = (),
    define: str | None = None,
    connect: str | None = None,
    progress: DiskProgress = no_progress,
    format: RestoreFormat = "qcow2",
    devices: Mapping[str, Path] | None = None,
    key_file: Path | None = None,
) -> RestoreResult:
    """Write standalone, verified ``to/<disk>.qcow2`` images of a backup; with ``define``, also define (not
    start) a libvirt domain of that name on them, with the UEFI variables (``to/<define>_VARS.fd``) and TPM
    state kept with the backup. Without ``define``, UEFI variables kept with the backup are written to
    ``to/<vm>_VARS.fd`` (unless that file exists) for the VM's writable pflash.

    Everything that can be checked is checked before anything is written: the backup exists and, with
    ``define``, it holds a saved domain definition that shares no host resource with the original
    (:func:`~vmsnap.vm.libvirt.definition.host_resource`) and no libvirt domain has that name yet; the
    machine state kept with it is read and checked.

    :param repo_path: the repository (a directory or an ``s3://`` URL)
    :param format: "qcow2" or "raw" (sparse) images in ``to``
    :param devices: disk name → a block device to write that disk onto instead of a file
    :param key_file: the key of an encrypted repository
    :param backup_id: the backup (default: the VM's latest)
    :param disks: restore only these disks (default: all; ``define`` needs all of them)
    :param define: the new domain's name
    :param connect: the libvirt URI for ``define`` (default ``qemu:///system``)
    :param progress: called with (disk, bytes done, bytes total)
    :raise NotFoundError: no such VM, backup or disk, or ``define`` and the backup has no saved definition
    :raise UsageError: ``define`` is not a valid name, a domain of that name exists, or a disk is left out
    :raise UnsupportedError: ``define`` and the saved definition uses its host's resources
    :raise RepositoryError: the machine state kept with the backup is damaged
    :raise ChainError: a parent of the backup is missing or a backing link points elsewhere
    :raise ChecksumMismatchError: a restored image differs from what was backed up
    :raise LibvirtError: libvirtd cannot be reached, or it refused the definition
    :raise VmsnapError: an image exists already in ``to`` (restore never overwrites)
    """
    repo = Repository.open(repo_path, key_file=key_file)
    manifest = repo.get(vm, backup_id)
    definition = None
    if define is not None:
        chosen = disks or tuple(d.name for d in manifest.disks)
        definition = _definition_to_redefine(repo, manifest, define, connect, chosen)
    state = read_machine_state(
        repo, manifest
    )  # UEFI variables and TPM state, checked before a byte is written
    manifest, restored = repo.restore(
        vm, manifest.backup_id, to, disks=disks, progress=progress, format=format, devices=devices
    )
    defined = None
    variables = None
    if define is not None and definition is not None:
        from vmsnap.vm.libvirt.definition import define_restored_domain

        images = {d.name: d.path for d in restored}
        defined = define_restored_domain(
            connect, definition, name=define, images=images, state=state, nvram_dir=Path(to)
        )
    elif state is not None and NVRAM in state.files:
        # a bare QEMU's (or an undefined domain's) firmware variables, for its -drive if=pflash,unit=1
        variables = Path(to) / f"{manifest.vm}_VARS.fd"
        if not variables.exists():
            write_atomic(variables, state.files[NVRAM])
    return RestoreResult(manifest.vm, manifest.backup_id, manifest.kind, tuple(restored), defined, variables)


def _definition_to_redefine(
    repo: RepositoryLayout, manifest: Manifest, name: str, connect: str | None, disks: Sequence[str]
) -> str:
    """The libvirt definition saved with ``manifest``'s backup, once it is known to be whole, to have an
    image among ``disks`` for each of its disks, and ``name`` to be a valid name that no domain has.

    :raise NotFoundError: the backup was not taken of a libvirt domain
    :raise RepositoryError: the saved definition is damaged
    :raise UsageError: ``name`` is invalid or taken, or a disk of the definition is not restored
    """
    validate_name(name, "domain name")
    saved = repo.definition(manifest)
    if saved is None:
        raise NotFoundError(
            f"backup {manifest.backup_id} of {manifest.vm} has no saved libvirt definition",
            hint="--define needs a backup taken with --domain; restore without it and define the VM yourself",
        )
    # only a restore that defines needs libvirt
    from vmsnap.vm.libvirt.definition import definition_problem, restored_domain_xml
    from vmsnap.vm.libvirt.machine import open_connection

    # what defining it would find wrong after the images are written, found before a byte is
    problem = definition_problem(saved)
    if problem is not None:
        raise RepositoryError(
            f"the libvirt definition saved with backup {manifest.backup_id} of {manifest.vm} {problem}",
            hint="restore without --define and define the VM yourself",
        )
    restored_domain_xml(saved, name=name, images={disk: Path(f"/{disk}") for disk in disks})

    conn = open_connection(connect)
    try:
        taken = name in {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()
    if taken:
        raise UsageError(f"a libvirt domain {name!r} exists already", hint="choose another --define name")
    return saved
