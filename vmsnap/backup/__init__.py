"""Backing up a VM: the run (plan → snapshot → export → seal) and the recovery of a run that died."""

from vmsnap.backup.run import Backup, BackupConfig, BackupResult, RecoveryReport, recover

__all__ = ["Backup", "BackupConfig", "BackupResult", "RecoveryReport", "recover"]
