"""vmsnap: consistent backups of QEMU/KVM virtual machines.

The public API: machines (where disks live), strategies (how a snapshot is taken), transports (how it is
copied out), and the errors they raise. The CLI in :mod:`vmsnap.cli` is a thin layer over these.
"""

from vmsnap.errors import (
    AgentError,
    AgentNotRespondingError,
    CommandError,
    FreezeError,
    NotFoundError,
    PluginError,
    QMPCommandError,
    QMPConnectionError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.model import Disk, ExportSource, SnapshotRef, Traits, TransferStats

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentNotRespondingError",
    "CommandError",
    "Disk",
    "ExportSource",
    "FreezeError",
    "NotFoundError",
    "PluginError",
    "QMPCommandError",
    "QMPConnectionError",
    "SnapshotRef",
    "Traits",
    "TransferStats",
    "UnsupportedError",
    "UsageError",
    "VmsnapError",
    "__version__",
]
