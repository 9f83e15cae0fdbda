"""The journal of one backup run: each step it has taken, made durable before the next step starts.

``vmsnap recover`` (and the start of the next backup of the VM) reads it to undo what a killed run left:
it holds the serialised :class:`~vmsnap.model.SnapshotRef` values, so the strategy's ``delete`` can run later.
It lives at ``REPO/<vm>/.journal.json``, guarded by the VM's repository lock.

Format 2 (what vmsnap writes): JSON lines, ``{"header": {...}}`` first, then one ``{"step", "at", "data"}``
per step, each appended and made durable with one ``fdatasync`` (the file is created, 0600, and its
directory fsync'd once, at the start). Format 1 rewrote one JSON document per step (temp file, fsync,
rename, fsync of the directory: two flushes a step; an incremental backup records about 13 steps) and is
still read. A last line cut short by a crash is the record of a step that had not started (a step starts
only once its record is durable) and is ignored; any other damage is an error.
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
from vmsnap.files import FILE_MODE, fsync_dir
from vmsnap.model import Disk, SnapshotRef
from vmsnap.repo.manifest import utc_now_iso

JOURNAL_FORMAT = 2
READ_FORMATS = (1, 2)

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


def _write_line(fd: int, value: Mapping[str, Any]) -> None:
    line = (json.dumps(value, sort_keys=True) + "\n").encode()
    view = memoryview(line)
    while view:
        view = view[os.write(fd, view) :]


def _parse(text: str) -> Mapping[str, Any]:
    """``{"header", "steps"}`` of a journal's text, format 1 (one document) or 2 (lines).

    :raise ValueError: damaged (anything but a last line cut short)
    """
    lines = text.split("\n")
    try:
        first = json.loads(lines[0])
    except ValueError:
        return dict(json.loads(text))  # format 1: an indented document over many lines
    if "steps" in first:
        return dict(first)  # format 1 on one line
    steps: list[Any] = []
    body = lines[1:]
    for number, line in enumerate(body):
        if not line:
            if any(body[number + 1 :]):
                raise ValueError(f"an empty line {number + 2} inside the journal")
            continue
        try:
            steps.append(json.loads(line))
        except ValueError:
            if number == len(body) - 1:
                break  # the last line, cut short: a step that never started
            raise
    return {"header": first["header"], "steps": steps}


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
    """What one backup run has done so far, kept durable in a JSON-lines file (see the module docstring).

    Every :meth:`record` appends its line and ``fdatasync``s the file before it returns, so after a
    ``kill -9`` the file shows every step that had started.

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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # exactly 0600, whatever the umask
            _write_line(fd, {"header": journal.header})
        finally:
            os.close(fd)
        fsync_dir(path.parent)  # the file's name, once; its lines are made durable by record()
        journal.record("started")
        return journal

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        """The journal at ``path``, or None when there is none.

        :raise RepositoryError: it is damaged or of another format
        """
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RepositoryError(
                f"journal {path} is unreadable: {err}",
                hint="inspect the VM (query-block) by hand, then remove the journal file",
            ) from err
        try:
            data = _parse(text)
            header = dict(data["header"])
            if header.get("format") not in READ_FORMATS:
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
        entry = JournalEntry(step, utc_now_iso(), data)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            _write_line(fd, {"step": entry.step, "at": entry.at, "data": dict(entry.data)})
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.entries.append(entry)

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
