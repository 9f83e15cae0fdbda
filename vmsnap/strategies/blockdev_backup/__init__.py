"""The ``backup`` strategy: QEMU's own backup job (``blockdev-backup``) with persistent dirty bitmaps."""

from vmsnap.strategies.blockdev_backup.strategy import BlockdevBackupStrategy

__all__ = ["BlockdevBackupStrategy"]
