"""``copy``: backups from one repository into another, of any layout and on any store (off-site copies,
migration between layouts). A backup keeps its id; one the target has already is skipped.

This module only moves backups: each one is written by the target's layout
(:meth:`~vmsnap.repo.layout.RepositoryLayout.copy_in`), which reads the source through the same interface
and checks every byte. Into ``chunks``: from another chunks repository only the chunks the target lacks are
sent (re-encoded for another key), from any other layout each disk is read through the pipeline, every chunk
checked against the source's digests (:mod:`vmsnap.repo.chunks.copy`). Into ``qcow2``: standalone images (a
full backup each), restored from the source and checked as a restore is.

A copy never serves as the parent of a later incremental in the target (its ``bitmap`` is null): the VM's
dirty bitmap belongs to the source repository's chain.
"""

from __future__ import annotations

import itertools

from vmsnap.errors import UsageError
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.reports import CopiedBackup, CopyReport


def copy_backups(
    source: RepositoryLayout,
    target: RepositoryLayout,
    *,
    vm: str | None = None,
    backup_id: str | None = None,
    progress: DiskProgress = no_progress,
) -> CopyReport:
    """Copy the backups of ``vm`` (all VMs when None; only ``backup_id`` when given) from ``source`` into
    ``target``, oldest first, under a reader lease on the source and each VM's writer lock on the target.

    :raise UsageError: ``backup_id`` without ``vm``, or the same repository twice
    :raise NotFoundError: no such VM or backup
    :raise ChecksumMismatchError: source content that does not check out (nothing of that backup is kept)
    :raise LeaseError: the target's VM is being written, or gc runs on either
    """
    if backup_id is not None and vm is None:
        raise UsageError("--backup needs --vm", hint="name the VM the backup belongs to")
    if source.location == target.location:
        raise UsageError("copy needs two different repositories", hint="check --from and --to")
    copied: list[CopiedBackup] = []
    with source.reading(vm):
        chosen = (
            [source.get(vm, backup_id)] if vm is not None and backup_id is not None else source.backups(vm)
        )
        if vm is not None and not chosen:
            source.get(vm)  # raises NotFoundError naming the VMs there are
        for name, group in itertools.groupby(chosen, key=lambda m: m.vm):
            with target.lock(name):
                have = {m.backup_id for m in target.backups(name)}
                for manifest in group:
                    if manifest.backup_id in have:
                        copied.append(CopiedBackup(manifest.vm, manifest.backup_id, False))
                    else:
                        copied.append(target.copy_in(source, manifest, progress=progress))
    return CopyReport(tuple(copied))
