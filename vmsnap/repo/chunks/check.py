"""``verify`` of a ``chunks`` repository: every manifest, every index it names, and every chunk those name.

Per backup the manifest (and its MAC) and each index (against the manifest's sha256 and its own trailer) are
checked; then the store is listed once and every referenced chunk that is missing is reported for each
backup disk that uses it. Without ``fast`` every referenced chunk is also fetched, decoded and checked
against its id (on parallel workers, each chunk once however many backups share it); a damaged one is
reported, like a missing one, for every backup disk that uses it. Both are returned, so that the repository
can move them aside (:mod:`vmsnap.repo.chunks.heal`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import attrs

from vmsnap.errors import DamagedChunkError, NotFoundError, RepositoryError
from vmsnap.repo.chunks.blob import ChunkCodec, ChunkId, chunk_key
from vmsnap.repo.chunks.index import ChunkIndex
from vmsnap.repo.chunks.known import list_chunk_ids
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.pipeline import DEFAULT_WORKERS
from vmsnap.repo.manifest import Damaged, Manifest
from vmsnap.repo.progress import DiskProgress
from vmsnap.repo.reports import VerifyProblem, VerifyReport
from vmsnap.repo.stores.base import Store

Users = dict[ChunkId, list[tuple[str, str, str, int]]]  # id → (vm, backup, disk, chunk number)


@attrs.frozen
class Findings:
    """What :func:`verify_chunks` found: the report, the damaged chunks (id → what their check said), the
    missing ones, and which backup disks use each chunk it checked."""

    report: VerifyReport
    damaged: dict[ChunkId, str]
    missing: frozenset[ChunkId]
    users: Users


class CheckRepository(Protocol):
    """What verify needs of a ``chunks`` repository."""

    @property
    def store(self) -> Store: ...

    @property
    def codec(self) -> ChunkCodec: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...


def _indexes(
    repo: CheckRepository, targets: Sequence[Manifest], problems: list[VerifyProblem]
) -> tuple[Users, dict[ChunkId, int]]:
    """Who uses which chunk (from every index that checks out), and each chunk's length."""
    users: Users = {}
    lengths: dict[ChunkId, int] = {}
    for manifest in targets:
        for record in manifest.disks:
            try:
                index = repo.index(manifest, record.name)
            except RepositoryError as err:
                problems.append(VerifyProblem(manifest.vm, manifest.backup_id, record.name, err.message))
                continue
            for number, chunk_id in index.data_chunks():
                users.setdefault(chunk_id, []).append((manifest.vm, manifest.backup_id, record.name, number))
                lengths[chunk_id] = index.length(number)
    return users, lengths


def _report(users: Users, chunk_id: ChunkId, what: str, problems: list[VerifyProblem]) -> None:
    for vm, backup_id, disk, number in users[chunk_id]:
        problems.append(VerifyProblem(vm, backup_id, disk, f"chunk {number}: chunk {chunk_id.hex()} {what}"))


def verify_chunks(
    repo: CheckRepository,
    targets: Sequence[Manifest],
    damaged: Sequence[Damaged],
    *,
    fast: bool,
    progress: DiskProgress,
    workers: int = DEFAULT_WORKERS,
) -> Findings:
    """Check ``targets`` (see the module docstring); ``damaged`` count as checked, each with a problem."""
    problems = [VerifyProblem(d.vm, d.backup_id, "", d.error.message) for d in damaged]
    checked = [(m.vm, m.backup_id) for m in targets] + [(d.vm, d.backup_id) for d in damaged]
    users, lengths = _indexes(repo, targets, problems)
    present = list_chunk_ids(repo.store)
    gone = [chunk_id for chunk_id in sorted(users) if chunk_id not in present]
    bad: dict[ChunkId, str] = {}
    if not fast:
        found = _check_contents(repo, [c for c in sorted(users) if c in present], lengths, progress, workers)
        for chunk_id, what in found.items():
            if what == "missing":
                gone.append(chunk_id)
            else:
                bad[chunk_id] = what
                _report(users, chunk_id, f"is damaged: {what}", problems)
    for chunk_id in gone:
        _report(users, chunk_id, "is missing from the store", problems)
    problems.sort(key=lambda p: (p.vm, p.backup_id, p.disk, p.message))
    report = VerifyReport("chunks-fast" if fast else "chunks", tuple(sorted(checked)), tuple(problems))
    return Findings(report, bad, frozenset(gone), users)


def _check_contents(
    repo: CheckRepository,
    chunk_ids: Sequence[ChunkId],
    lengths: dict[ChunkId, int],
    progress: DiskProgress,
    workers: int,
) -> dict[ChunkId, str]:
    """Fetch, decode and check each chunk once: id → what is wrong with those that fail ("missing" for those
    that went missing meanwhile)."""
    codec = repo.codec
    total = sum(lengths[c] for c in chunk_ids)
    lock = threading.Lock()
    state = {"done": 0}
    bad: dict[ChunkId, str] = {}

    def check(chunk_id: ChunkId) -> None:
        try:
            codec.decode(repo.store.get(chunk_key(chunk_id)), chunk_id, length=lengths[chunk_id])
        except NotFoundError:
            with lock:
                bad[chunk_id] = "missing"
        except DamagedChunkError as err:
            with lock:
                bad[chunk_id] = err.message.split(": ", 1)[-1]
        with lock:
            state["done"] += lengths[chunk_id]

    def tick() -> None:
        with lock:
            done = state["done"]
        progress("chunks", done, total)

    BoundedPool(check, workers=workers, depth=2 * workers, tick=tick).run(chunk_ids)
    return dict(sorted(bad.items()))
