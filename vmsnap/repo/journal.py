"""The journal of one backup run: each step it has taken, rewritten durably before the next step starts.

``vmsnap recover`` (and the start of the next backup of the VM) reads it to undo what a killed run left:
it holds the serialised :class:`~vmsnap.model.SnapshotRef` values, so the strategy's ``delete`` can run later.
It lives at ``REPO/<vm>/.journal.json``, guarded by the VM's repository lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import RepositoryError
from vmsnap.files import write_json_atomic
from vmsnap.model import Disk, SnapshotRef
from vmsnap.repo.manifest import utc_now_iso

JOURNAL_FORMAT = 1

STEPS = (
    "started",  # staging exists; the journal names it
    "freezing",  # about to freeze the guest (data: vm_status, the VM's run state before)
    "frozen",
    "creating",  # about to create snapshots (data: name)
    "created",  # data: snapshots
    "create-failed",  # the strategy raised: it promises to have left nothing behind
    "thawed",
    "exporting",  # data: disk
    "serving",  # data: disk, kind, location (the ExportSource a transport reads)
    "exported",  # data: disk, bytes_written, transport
    "deleting",  # data: disk
    "deleted",  # data: disk
    "sealing",  # checksums taken; manifest about to be written
    "committed",  # the backup is in place
)


def disk_to_json(disk: Disk) -> dict[str, Any]:
    """A :class:`Disk` as plain JSON (paths as strings)."""
    return {
        "name": disk.name,
        "node_name": disk.node_name,
        "file": str(disk.file),
        "format": disk.format,
        "virtual_size": disk.virtual_size,
        "backing_chain": [str(p) for p in disk.backing_chain],
        "qdev": disk.qdev,
        "file_node": disk.file_node,
        "read_only": disk.read_only,
    }


def disk_from_json(data: Mapping[str, Any]) -> Disk:
    """The inverse of :func:`disk_to_json`."""
    return Disk(
        name=str(data["name"]),
        node_name=str(data["node_name"]),
        file=Path(data["file"]),
        format=str(data["format"]),
        virtual_size=int(data["virtual_size"]),
        backing_chain=tuple(Path(p) for p in data.get("backing_chain", [])),
        qdev=data.get("qdev"),
        file_node=str(data.get("file_node", "")),
        read_only=bool(data.get("read_only", False)),
    )


def snapshot_to_json(snap: SnapshotRef) -> dict[str, Any]:
    """A :class:`SnapshotRef` as plain JSON."""
    return {
        "strategy": snap.strategy,
        "name": snap.name,
        "disk": disk_to_json(snap.disk),
        "location": snap.location,
        "details": dict(snap.details),
    }


def snapshot_from_json(data: Mapping[str, Any]) -> SnapshotRef:
    """The inverse of :func:`snapshot_to_json`."""
    return SnapshotRef(
        strategy=str(data["strategy"]),
        name=str(data["name"]),
        disk=disk_from_json(data["disk"]),
        location=str(data.get("location", "")),
        details={str(k): str(v) for k, v in dict(data.get("details", {})).items()},
    )


@attrs.frozen
class JournalEntry:
    """One step: its name, when (UTC ISO 8601) and what it recorded."""

    step: str
    at: str
    data: Mapping[str, Any] = attrs.Factory(dict)


class Journal:
    """What one backup run has done so far, kept durable in a JSON file.

    Every :meth:`record` rewrites the file atomically (temp file, fsync, rename, fsync directory) before it
    returns, so after a ``kill -9`` the file shows every step that had started.

    :param path: the journal file
    :param header: what the run is (vm, backup_id, repo, staging, strategy and its options, transport, pid)
    """

    def __init__(self, path: Path, header: Mapping[str, Any], entries: Sequence[JournalEntry] = ()) -> None:
        self.path = Path(path)
        self.header = dict(header)
        self.entries: list[JournalEntry] = list(entries)

    @classmethod
    def start(cls, path: Path, **header: Any) -> Journal:
        """Begin a journal at ``path`` with step "started".

        :raise RepositoryError: a journal is there already (a dead run must be recovered first)
        """
        if path.exists():
            raise RepositoryError(
                f"{path} exists: a previous run has not been recovered",
                hint="run `vmsnap recover` for this VM and repository",
            )
        journal = cls(path, {"format": JOURNAL_FORMAT, "pid": os.getpid(), **header})
        journal.record("started")
        return journal

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        """The journal at ``path``, or None when there is none.

        :raise RepositoryError: it is damaged or of another format
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RepositoryError(
                f"journal {path} is unreadable: {err}",
                hint="inspect the VM (query-block) by hand, then remove the journal file",
            ) from err
        try:
            header = dict(data["header"])
            if header.get("format") != JOURNAL_FORMAT:
                raise ValueError(f"format {header.get('format')!r}")
            entries = [
                JournalEntry(str(e["step"]), str(e["at"]), dict(e.get("data", {}))) for e in data["steps"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise RepositoryError(
                f"journal {path} is damaged: {err}",
                hint="inspect the VM (query-block) by hand, then remove the journal file",
            ) from err
        return cls(path, header, entries)

    def record(self, step: str, **data: Any) -> None:
        """Append ``step`` and make it durable before returning."""
        if step not in STEPS:
            raise ValueError(f"unknown journal step {step!r}")
        self.entries.append(JournalEntry(step, utc_now_iso(), data))
        payload = {
            "header": self.header,
            "steps": [{"step": e.step, "at": e.at, "data": dict(e.data)} for e in self.entries],
        }
        write_json_atomic(self.path, payload)

    def has(self, step: str) -> bool:
        """True when ``step`` was recorded."""
        return any(e.step == step for e in self.entries)

    def data(self, step: str) -> list[Mapping[str, Any]]:
        """The data of every entry of ``step``, in order."""
        return [e.data for e in self.entries if e.step == step]

    def snapshots(self) -> list[SnapshotRef]:
        """The snapshots the run created (empty when it died before "created" was recorded)."""
        refs: list[SnapshotRef] = []
        for data in self.data("created"):
            refs += [snapshot_from_json(s) for s in data.get("snapshots", [])]
        return refs

    def deleted_disks(self) -> set[str]:
        """Disks whose snapshot the run already deleted."""
        return {str(d["disk"]) for d in self.data("deleted")}

    @property
    def last_step(self) -> str:
        return self.entries[-1].step if self.entries else ""

    def remove(self) -> None:
        """Delete the journal file (the run is finished or recovered)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
