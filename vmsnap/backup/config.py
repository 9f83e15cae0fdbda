"""What a backup run is asked (:class:`BackupConfig`) and what it reports (:class:`BackupResult`,
:class:`RecoveryReport`), plus the test-only crash points that stop a run at an exact step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import UsageError, VmsnapError
from vmsnap.model import validate_name
from vmsnap.processes import CRASH_ENV, crash_point
from vmsnap.repo.manifest import DiskRecord, Kind
from vmsnap.repo.reports import PUSH_TRANSPORT

__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "EARLY_CRASH_POINTS",
    "PUSH",
    "BackupConfig",
    "BackupResult",
    "RecoveryError",
    "RecoveryReport",
    "crash_point",
]

Quiesce = Literal["auto", "on", "off"]
PUSH = PUSH_TRANSPORT
"""The transport name recorded when the strategy wrote the backup itself (push)."""

CRASH_POINTS = (
    "after-start",
    "after-freeze",
    "after-create",
    "after-thaw",
    "mid-export",
    "after-export",
    "after-delete",
    "before-manifest",
)

EARLY_CRASH_POINTS = ("before-repository", "before-marker", "store-put-unnamed")
"""Steps of a backup into a new (local) repository before its marker exists: the machine opened and the
options checked, nothing written; the directory made, the marker not yet written; the marker written into
its temporary file, not yet under its name (the first put of a new repository's local store)."""


@attrs.frozen
class BackupConfig:
    """What to back up and how (the CLI builds it from its options).

    :param repo: the repository: a directory (a new or empty one becomes a ``chunks`` repository) or an
        ``s3://BUCKET/PREFIX`` URL of an existing one
    :param strategy: a strategy name, or "auto": the registered strategy that can take incremental backups
        of this machine (running or not) — QEMU's backup job, or qemu-img for images
    :param transport: a transport name, "none" (a strategy that writes the images itself does: push), or
        "auto": push when the strategy can, else the first transport (by preference) that reads the source;
        naming a transport with a strategy that can push makes it export instead (pull mode)
    :param incremental: only what changed since the VM's latest backup (strategies that track changes);
        falls back to full (and says why) when there is no usable parent
    :param quiesce: "auto" freezes when a guest agent answers, "on" requires it, "off" never freezes
    :param disks: back up only these disks (default: all)
    :param bitmap: the name changes are tracked under (a persistent dirty bitmap)
    :param freeze_timeout: seconds the guest agent gets to freeze
    :param key_file: the key file of an encrypted repository (default: ``$VMSNAP_KEY_FILE``)
    """

    repo: Path | str
    strategy: str = "auto"
    transport: str = "auto"
    incremental: bool = False
    quiesce: Quiesce = "auto"
    disks: tuple[str, ...] = ()
    bitmap: str = "vmsnap"
    freeze_timeout: float = 60.0
    key_file: Path | None = None

    def __attrs_post_init__(self) -> None:
        if self.quiesce not in ("auto", "on", "off"):
            raise UsageError(f"--quiesce {self.quiesce!r}", hint="use auto, on or off")
        for disk in self.disks:
            validate_name(disk, "disk name")
        validate_name(self.bitmap, "bitmap name")


@attrs.frozen
class BackupResult:
    """What a backup made (the CLI prints it; ``--json`` as in DESIGN.md)."""

    vm: str
    backup_id: str
    kind: Kind
    parent: str | None
    strategy: str
    transport: str
    quiesced: bool
    disks: tuple[DiskRecord, ...]
    seconds: float
    path: Path | str
    notes: tuple[str, ...] = ()
    freeze_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap backup``."""
        return {
            "vm": self.vm,
            "backup_id": self.backup_id,
            "kind": self.kind,
            "strategy": self.strategy,
            "transport": self.transport,
            "disks": [d.to_json() for d in self.disks],
            "seconds": round(self.seconds, 3),
            "freeze_ms": None if self.freeze_ms is None else round(self.freeze_ms, 1),
        }


@attrs.frozen
class RecoveryReport:
    """What :func:`recover` undid (each action one line), what it found that needed nothing (each one line),
    and whether there was anything to do."""

    vm: str
    actions: tuple[str, ...]
    found: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.actions


class RecoveryError(VmsnapError):
    """Undoing a dead run failed part-way; the journal is kept so that ``vmsnap recover`` can try again."""
