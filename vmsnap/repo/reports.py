"""What repository operations report: values only (restore, verify, prune, gc, copy, one backup's writes)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs

_CHUNK = re.compile(r"chunk ([0-9a-f]{64})")
PUSH_TRANSPORT = "none"
"""The transport a backup records when the strategy wrote its images itself (push)."""


@attrs.frozen
class LayoutTraits:
    """What the orchestrator must know of a repository's layout before a backup starts.

    :param name: "chunks" or "qcow2"
    :param reads_exports: the layout reads a strategy's export itself (no transport may be chosen)
    :param accepts_push: a strategy may write the backup's images itself (push)
    """

    name: str
    reads_exports: bool
    accepts_push: bool


@attrs.frozen
class WrittenDisk:
    """What writing one disk into a backup did.

    :param bytes_written: bytes the backup wrote for it (chunks: newly stored)
    :param transport: what moved the bytes (a transport's name, "none" when the strategy wrote them, or the
        reader the chunks layout used: "nbd" or "file")
    :param since: the backup id the content is relative to (an incremental), or None (complete)
    :param note: why an incremental was taken as a full read, if it was
    """

    bytes_written: int
    transport: str
    since: str | None
    note: str | None = None


@attrs.frozen
class RestoredDisk:
    """One image ``restore`` wrote: where, its size, and its (checked) sha256 (qcow2: the content digest;
    chunks: the sha256 of the index every chunk was checked against)."""

    name: str
    path: Path
    virtual_size: int
    sha256: str


@attrs.frozen
class VerifyProblem:
    """One thing ``verify`` found wrong (``disk`` is "" when it concerns the whole backup)."""

    vm: str
    backup_id: str
    disk: str
    message: str

    def __str__(self) -> str:
        where = f"{self.vm}/{self.backup_id}" + (f"/{self.disk}" if self.disk else "")
        return f"{where}: {self.message}"


@attrs.frozen
class ChunkRepair:
    """What ``verify`` did about one chunk that was damaged or missing (chunks layout).

    :param chunk: the chunk id (hex)
    :param problem: what was wrong ("missing from the store", or what its check said)
    :param action: what verify did, in words ("moved aside", "stored again from …", …)
    :param healed: the store holds a good copy again: every backup that names it restores again
    :param backups: ``vm/backup/disk`` of every backup disk that names the chunk
    """

    chunk: str
    problem: str
    action: str
    healed: bool
    backups: tuple[str, ...]

    @property
    def still_damaged(self) -> tuple[str, ...]:
        """The backup disks that cannot be restored until the chunk is stored again."""
        return () if self.healed else self.backups

    def __str__(self) -> str:
        state = (
            f"healed: {len(self.backups)} backup disk(s) restore again"
            if self.healed
            else f"still damaged: {', '.join(self.backups) or 'no complete backup uses it'}"
        )
        return f"chunk {self.chunk[:16]}… ({self.problem}): {self.action}; {state}"


@attrs.frozen
class VerifyReport:
    """What ``verify`` checked (``(vm, backup id)`` pairs), with which reader, what it found, and (chunks
    layout) what it did about each damaged or missing chunk."""

    reader: str
    checked: tuple[tuple[str, str], ...]
    problems: tuple[VerifyProblem, ...]
    chunks: tuple[ChunkRepair, ...] = ()

    @property
    def ok(self) -> bool:
        """Nothing was found wrong."""
        return not self.problems

    @property
    def still_damaged(self) -> tuple[str, ...]:
        """``vm/backup/disk`` of the backup disks that still cannot be restored: those with a problem other
        than a chunk, and those that name a chunk that was not healed."""
        healed = {repair.chunk for repair in self.chunks if repair.healed}
        damaged = set()
        for problem in self.problems:
            where = f"{problem.vm}/{problem.backup_id}" + (f"/{problem.disk}" if problem.disk else "")
            chunk = _CHUNK.search(problem.message)
            if chunk is None or chunk.group(1) not in healed:
                damaged.add(where)
        for repair in self.chunks:
            damaged.update(repair.still_damaged)
        return tuple(sorted(damaged))


@attrs.frozen
class PruneResult:
    """What ``prune`` removed and kept (ids, oldest first); ``needed`` are kept only for a chain (qcow2);
    ``reasons`` says for each kept backup which rule kept it ("daily #2", "parent of …"); ``locked`` holds
    the backups the rules would remove that a lock still protects (a locked repository), each with the date
    (UTC ISO 8601) it becomes removable."""

    vm: str
    removed: tuple[str, ...]
    kept: tuple[str, ...]
    needed: tuple[str, ...]
    reasons: dict[str, str] = attrs.field(factory=dict)
    locked: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class GcReport:
    """What ``gc`` did: chunks it kept and freed (count, stored bytes), partial backups it removed. In a
    store that keeps versions: the versions (and delete markers) it deleted for good, of every object
    (``bytes_freed`` is their size), and those a lock kept (count, size, when the first frees up)."""

    chunks_kept: int
    chunks_freed: int
    bytes_freed: int
    partial_backups: tuple[str, ...] = ()
    dry_run: bool = False
    versions_freed: int = 0
    locked_versions: int = 0
    locked_bytes: int = 0
    next_unlock: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["partial_backups"] = list(self.partial_backups)
        return data


@attrs.frozen
class CopiedBackup:
    """One backup ``copy`` made in the target (or found there already)."""

    vm: str
    backup_id: str
    copied: bool
    chunks_sent: int = 0
    bytes_sent: int = 0


@attrs.frozen
class CopyReport:
    """What ``copy`` did, backup by backup (oldest first)."""

    backups: tuple[CopiedBackup, ...]

    @property
    def chunks_sent(self) -> int:
        return sum(b.chunks_sent for b in self.backups)

    @property
    def bytes_sent(self) -> int:
        return sum(b.bytes_sent for b in self.backups)

    def to_json(self) -> dict[str, Any]:
        return {
            "backups": [attrs.asdict(b) for b in self.backups],
            "chunks_sent": self.chunks_sent,
            "bytes_sent": self.bytes_sent,
        }
