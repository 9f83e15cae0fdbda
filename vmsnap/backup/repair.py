"""``verify --repair``: verify a ``chunks`` repository, move aside what is damaged or missing, and store it
again at once from wherever it can be read — other repositories (an off-site copy), then the live VM.

The VM is read by taking a backup of it (an incremental when it can: the chunks the parent named that were
moved aside are read again, with every changed one); that backup stores each moved-aside chunk whose data
the VM's disks still hold, which heals every backup that names it. The result says per chunk what was done
and which backup disks are still damaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from vmsnap.backup.config import BackupConfig
from vmsnap.backup.run import Backup
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.reports import VerifyReport
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import Machine


@attrs.frozen
class RepairResult:
    """What ``verify --repair`` found and did.

    :param report: the verify report; its ``chunks`` say per chunk what was done, healed or not
    :param backup_id: the backup taken of the VM to read the chunks again (None: none was needed or asked)
    """

    report: VerifyReport
    backup_id: str | None = None


def repair(
    repo: RepositoryLayout,
    *,
    vm: str | None = None,
    backup_id: str | None = None,
    machine: Machine | None = None,
    sources: Sequence[Path | str] = (),
    key_file: Path | None = None,
    fast: bool = False,
    progress: DiskProgress = no_progress,
    note: Callable[[str], None] = lambda _: None,
) -> RepairResult:
    """Verify ``repo`` (see :meth:`ChunksRepository.verify`), repair from ``sources`` (opened with
    ``key_file``), then — when chunks are still missing and a ``machine`` is given — back it up and say which
    chunks that stored again.

    :raise UsageError: a source is not of the chunks layout
    :raise VmsnapError: a source cannot be opened, or the backup failed
    """
    opened = [Repository.open(source, key_file=key_file) for source in sources]
    report = repo.verify(vm, backup_id, fast=fast, progress=progress, repair_from=opened)
    waiting = [repair for repair in report.chunks if not repair.healed]
    if machine is None or not waiting:
        return RepairResult(report)
    config = BackupConfig(repo=repo.location, incremental=True, key_file=key_file)
    result = Backup(machine, config, progress=progress, note=note).run()
    again = repo.verify(vm, backup_id, fast=True)  # one listing: which are still missing
    missing = {chunk.chunk for chunk in again.chunks}
    repairs = []
    for chunk in report.chunks:
        if not chunk.healed:
            first = chunk.action.split("; ")[0]
            if chunk.chunk not in missing:
                action = f"{first}, then stored again by backup {result.backup_id} of {result.vm}"
                chunk = attrs.evolve(chunk, action=action, healed=True)
            else:
                action = f"{first}; backup {result.backup_id} of {result.vm} did not produce it again"
                chunk = attrs.evolve(chunk, action=action)
        repairs.append(chunk)
    return RepairResult(attrs.evolve(report, chunks=tuple(repairs)), result.backup_id)
