"""What ``verify`` does about the chunks it found damaged or missing: move them aside (quarantine), make every
host forget them, and — with sources to repair from — store them again at once.

For each such chunk: a damaged one is moved aside (:func:`vmsnap.repo.chunks.quarantine.quarantine`), a
missing one is recorded; then the known-chunks epoch is replaced, once. The next backup that produces the
content stores it again (see :mod:`vmsnap.repo.chunks.quarantine`). A **source** is another ``chunks``
repository (an off-site copy): for every backup disk that names the chunk, the same backup's index in the
source names the chunk at that place; its blob there is decoded with the source's key, and stored here when
its content has this repository's id (so it works across keys). The report says, per chunk, what was done
and which backup disks still cannot be restored.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

from vmsnap.errors import DamagedChunkError, NotFoundError, RepositoryError, StoreError, VmsnapError
from vmsnap.repo.chunks.blob import ChunkCodec, ChunkId, chunk_key
from vmsnap.repo.chunks.check import Findings, Users
from vmsnap.repo.chunks.index import ChunkIndex
from vmsnap.repo.chunks.known import drop_known_caches, list_chunk_ids
from vmsnap.repo.chunks.quarantine import MISSING, clear, quarantine, quarantined_ids, read_record
from vmsnap.repo.manifest import Damaged, Manifest
from vmsnap.repo.reports import ChunkRepair
from vmsnap.repo.stores.base import Store


class HealRepository(Protocol):
    """What healing needs of the repository being verified."""

    @property
    def store(self) -> Store: ...

    @property
    def codec(self) -> ChunkCodec: ...

    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...


class ChunkSource(Protocol):
    """Another ``chunks`` repository a chunk can be read from."""

    @property
    def location(self) -> str: ...

    @property
    def codec(self) -> ChunkCodec: ...

    def load(self, vm: str, backup_id: str) -> Manifest: ...

    def index(self, manifest: Manifest, disk: str) -> ChunkIndex: ...

    def chunk_blob(self, chunk_id: bytes) -> bytes: ...


def users_of(repo: HealRepository, chunk_ids: Iterable[ChunkId]) -> Users:
    """Every backup disk (of every complete backup) that names one of ``chunk_ids``: one pass over the
    indexes (those that cannot be read are skipped)."""
    wanted = set(chunk_ids)
    users: Users = {chunk_id: [] for chunk_id in wanted}
    if not wanted:
        return users
    for manifest in repo.backups(damaged=[]):
        for record in manifest.disks:
            try:
                index = repo.index(manifest, record.name)
            except VmsnapError:
                continue
            for number, chunk_id in index.data_chunks():
                if chunk_id in wanted:
                    users[chunk_id].append((manifest.vm, manifest.backup_id, record.name, number))
    return users


_CHUNK_HEX = re.compile(r"chunk ([0-9a-f]{64})")


def damaged_chunk_error(repo: HealRepository, err: DamagedChunkError) -> DamagedChunkError:
    """``err`` (about a chunk a restore or copy could not use) with the backup disks that use the chunk, and
    a hint that says how it gets stored again: verify set it aside already (back the VM up again), or has
    yet to (run verify)."""
    found = _CHUNK_HEX.search(err.message)
    if found is None:
        return err
    chunk_id = ChunkId(bytes.fromhex(found.group(1)))
    users = sorted({f"{vm}/{backup}/{disk}" for vm, backup, disk, _ in users_of(repo, [chunk_id])[chunk_id]})
    vms = " and ".join(sorted({user.split("/")[0] for user in users})) or "the VM"
    message = f"{err.message}; used by {', '.join(users) or 'no complete backup'}"
    with contextlib.suppress(StoreError):
        record = read_record(repo.store, chunk_id)
        if record is not None:
            return DamagedChunkError(
                f"{message}; verify moved it aside on {record.found[:10]} ({record.problem})",
                hint=f"back up {vms} again: the next backup stores the chunk again if the disk still holds "
                "that data (`vmsnap verify --repair` tries at once); meanwhile restore a backup that does "
                "not use it",
            )
    return DamagedChunkError(
        message,
        hint=f"run `vmsnap verify`: it moves the chunk aside, and then the next backup of {vms} stores it "
        "again if the disk still holds that data; meanwhile restore a backup that does not use it",
    )


def clear_healed(store: Store, found: Findings) -> None:
    """Remove the quarantine records of chunks the store holds again (healed; what this verify checked had
    no problem) — one listing of the records and, only when there are records, of the chunks. Nothing in a
    read-only view (a repository read ``--as-of`` a time)."""
    if not store.capabilities.writable:
        return
    records = quarantined_ids(store)
    if records:
        problems = set(found.damaged) | set(found.missing)
        present = list_chunk_ids(store)
        clear(store, sorted(c for c in records if c in present and c not in problems))


def _set_aside(store: Store, chunk_id: ChunkId, problem: str) -> str:
    """Quarantine one chunk; what was done, in words."""
    record = read_record(store, chunk_id)
    if problem == MISSING:
        if record is not None:
            return f"moved aside by verify on {record.found[:19]} ({record.problem})"
        quarantine(store, chunk_id, MISSING, None)
        return "recorded as missing"
    try:
        blob = store.get(chunk_key(chunk_id))
    except NotFoundError:
        blob = None
    if blob is not None and quarantine(store, chunk_id, problem, blob):
        return "moved aside"
    return "recorded (the store no longer held what verify read)"


def _from_source(repo: HealRepository, source: ChunkSource, chunk_id: ChunkId, users: Users) -> bool:
    """Store ``chunk_id`` again from ``source``: the blob its copy of a backup names at the same place,
    decoded with its key, when that content has this repository's id."""
    tried: set[bytes] = set()
    for vm, backup_id, disk, number in users.get(chunk_id, []):
        try:
            index = source.index(source.load(vm, backup_id), disk)
            theirs = index.chunk_id(number) if number < len(index) else None
            if theirs is None or theirs in tried or not any(theirs):
                continue
            tried.add(theirs)
            data = source.codec.decode(source.chunk_blob(theirs), theirs, length=index.length(number))
        except (VmsnapError, ValueError):
            continue  # not there, or damaged there too: the next place
        if repo.codec.chunk_id(data) == chunk_id:
            repo.store.put(chunk_key(chunk_id), repo.codec.encode(data, chunk_id), if_absent=True)
            return True
    return False


def heal(
    repo: HealRepository, found: Findings, *, sources: Sequence[ChunkSource] = ()
) -> tuple[ChunkRepair, ...]:
    """Move aside what ``found`` names, then try ``sources`` (see the module docstring); nothing in a
    read-only view (a repository read ``--as-of`` a time: the report says what was found).

    :raise StoreError: the store refused (read-only credentials: then nothing is moved, the report says so)
    """
    problems: dict[ChunkId, str] = {c: MISSING for c in found.missing} | dict(found.damaged)
    if not problems or not repo.store.capabilities.writable:
        return ()
    checked = {(vm, backup_id) for vm, backup_id in found.report.checked}
    every = {(m.vm, m.backup_id) for m in repo.backups(damaged=[])}
    users = found.users if every <= checked else users_of(repo, problems)
    actions = {
        chunk_id: _set_aside(repo.store, chunk_id, problem) for chunk_id, problem in sorted(problems.items())
    }
    drop_known_caches(repo.store)
    repairs = []
    for chunk_id, problem in sorted(problems.items()):
        action, healed = actions[chunk_id], False
        for source in sources:
            try:
                healed = _from_source(repo, source, chunk_id, users)
            except (StoreError, RepositoryError):
                healed = False
            if healed:
                action += f", then stored again from {source.location}"
                break
        if not healed:
            action += "; the next backup stores it again if the disk still holds that data"
        names = tuple(
            sorted({f"{vm}/{backup_id}/{disk}" for vm, backup_id, disk, _ in users.get(chunk_id, [])})
        )
        repairs.append(ChunkRepair(chunk_id.hex(), problem, action, healed, names))
    return tuple(repairs)
