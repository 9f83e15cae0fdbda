"""vmsnap: consistent backups of QEMU/KVM virtual machines.

The public API is :data:`__all__`, described in docs/api.md: what a backup needs (machines, the backup run,
repositories), restoring (whole images, mounts, instant restores), the plugins' registries (strategies,
transports), command runners, jobs, and the errors and values they share. Every name in it imports from
``vmsnap`` itself and from the module docs/api.md names; the heavier ones (boto3, libvirt) only when used.
Names that older releases had elsewhere still import from there, with a DeprecationWarning naming their new
home (:mod:`vmsnap.moved`). The CLI in :mod:`vmsnap.cli` is a thin layer over this API.
"""

import importlib
import typing

from vmsnap.errors import (
    AgentError,
    AgentNotRespondingError,
    BlockJobError,
    ChainError,
    ChecksumMismatchError,
    CommandError,
    CommandTimeoutError,
    DamagedChunkError,
    FreezeError,
    KeyFileError,
    LeaseError,
    LibvirtError,
    NotFoundError,
    PluginError,
    QMPCommandError,
    QMPConnectionError,
    RepositoryError,
    SnapshotError,
    StoreError,
    TransferError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, TransferStats

if typing.TYPE_CHECKING:
    from vmsnap.backup import Backup, BackupConfig, BackupResult
    from vmsnap.backup.recover import recover
    from vmsnap.image.digest import guest_sha256, image_chunks
    from vmsnap.jobs.default import run_job_file
    from vmsnap.repo.repository import Repository
    from vmsnap.restore.commands import (
        BackupRef,
        InstantConfig,
        MountConfig,
        instant_restore,
        mount_backup,
        recover_restores,
        umount_backup,
    )
    from vmsnap.restore.images import restore_images
    from vmsnap.runner import LocalRunner, Runner, SshRunner
    from vmsnap.strategies import strategy_class, strategy_names
    from vmsnap.transports import transport_class, transport_names
    from vmsnap.vm.agent import GuestAgent
    from vmsnap.vm.freeze import frozen
    from vmsnap.vm.libvirt.machine import LibvirtMachine
    from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine

__version__ = "0.1.0"

LAZY: dict[str, str] = {
    "Backup": "vmsnap.backup",
    "BackupConfig": "vmsnap.backup",
    "BackupResult": "vmsnap.backup",
    "recover": "vmsnap.backup.recover",
    "Machine": "vmsnap.vm.machine",
    "QemuMachine": "vmsnap.vm.machine",
    "OfflineMachine": "vmsnap.vm.machine",
    "LibvirtMachine": "vmsnap.vm.libvirt.machine",
    "GuestAgent": "vmsnap.vm.agent",
    "frozen": "vmsnap.vm.freeze",
    "Repository": "vmsnap.repo.repository",
    "restore_images": "vmsnap.restore.images",
    "BackupRef": "vmsnap.restore.commands",
    "MountConfig": "vmsnap.restore.commands",
    "InstantConfig": "vmsnap.restore.commands",
    "mount_backup": "vmsnap.restore.commands",
    "umount_backup": "vmsnap.restore.commands",
    "instant_restore": "vmsnap.restore.commands",
    "recover_restores": "vmsnap.restore.commands",
    "strategy_class": "vmsnap.strategies",
    "strategy_names": "vmsnap.strategies",
    "transport_class": "vmsnap.transports",
    "transport_names": "vmsnap.transports",
    "Runner": "vmsnap.runner",
    "LocalRunner": "vmsnap.runner",
    "SshRunner": "vmsnap.runner",
    "run_job_file": "vmsnap.jobs.default",
    "image_chunks": "vmsnap.image.digest",
    "guest_sha256": "vmsnap.image.digest",
}
"""Public names imported when first used, and the module each lives in."""

__all__ = [
    "AgentError",
    "AgentNotRespondingError",
    "Backup",
    "BackupConfig",
    "BackupRef",
    "BackupResult",
    "BlockJobError",
    "ChainError",
    "ChecksumMismatchError",
    "CommandError",
    "CommandTimeoutError",
    "DamagedChunkError",
    "Disk",
    "ExportSource",
    "FreezeError",
    "GuestAgent",
    "InstantConfig",
    "KeyFileError",
    "LeaseError",
    "LibvirtError",
    "LibvirtMachine",
    "LocalRunner",
    "Machine",
    "MountConfig",
    "NotFoundError",
    "OfflineMachine",
    "PluginError",
    "QMPCommandError",
    "QMPConnectionError",
    "QemuMachine",
    "Repository",
    "RepositoryError",
    "Runner",
    "SnapshotError",
    "SnapshotRef",
    "SshRunner",
    "StoreError",
    "Traits",
    "TransferError",
    "TransferStats",
    "UnsupportedError",
    "UsageError",
    "VmsnapError",
    "__version__",
    "frozen",
    "guest_sha256",
    "image_chunks",
    "instant_restore",
    "mount_backup",
    "recover",
    "recover_restores",
    "restore_images",
    "run_job_file",
    "strategy_class",
    "strategy_names",
    "transport_class",
    "transport_names",
    "umount_backup",
]

if not typing.TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        home = LAZY.get(name)
        if home is None:
            raise AttributeError(f"module 'vmsnap' has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value
