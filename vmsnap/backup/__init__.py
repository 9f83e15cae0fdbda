"""Backing up a VM: the run (plan → snapshot → export → seal) and the recovery of a run that died."""

import typing

from vmsnap.backup.config import BackupConfig, BackupResult, RecoveryError, RecoveryReport
from vmsnap.backup.recover import recover
from vmsnap.backup.run import DOMAIN_XML, Backup

__all__ = [
    "DOMAIN_XML",
    "Backup",
    "BackupConfig",
    "BackupResult",
    "RecoveryError",
    "RecoveryReport",
    "recover",
]


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
