"""Backing up a VM: the run (plan → snapshot → export → seal) and the recovery of a run that died."""

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
