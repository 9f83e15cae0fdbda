"""Chunks ``verify`` found damaged or missing, moved aside so that the next backup stores them again (the rule
of Proxmox Backup Server's ``.bad`` files).

Store keys::

    quarantine/<id[0:4]>/<id>    one record per chunk: a JSON line (chunk, problem, found, host), then the
                                 damaged blob exactly as it was found (nothing after the line when the
                                 chunk was missing)

Quarantining a damaged chunk writes its record first, then deletes the chunk — only when the store still
holds the very bytes verify found damaged (a chunk stored again meanwhile is left alone). Then the caller
replaces the known-chunks epoch (:func:`vmsnap.repo.chunks.known.drop_known_caches`), so that no host's
cache says the chunk is there. A writer forgets every quarantined chunk the store lacks (it stores it again
when the disk produces that content) and reads again, in an incremental, every chunk whose parent id is
one of them; once it is stored again, every old backup that names the id restores again. ``verify`` and
``gc`` remove the record of a chunk that is back (healed) or that no backup names any more.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable

import attrs

from vmsnap.errors import NotFoundError
from vmsnap.repo.chunks.blob import ID_SIZE, ChunkId, chunk_key
from vmsnap.repo.manifest import utc_now_iso
from vmsnap.repo.stores.base import Store

QUARANTINE = "quarantine/"
_MAGIC = b"vmsnap-quarantine 1 "


def quarantine_key(chunk_id: bytes) -> str:
    """``quarantine/<hex[0:4]>/<hex>``."""
    text = chunk_id.hex()
    return f"{QUARANTINE}{text[:4]}/{text}"


def _parse_key(key: str) -> ChunkId | None:
    parts = key.split("/")
    if len(parts) != 3 or parts[0] + "/" != QUARANTINE or len(parts[2]) != 2 * ID_SIZE:
        return None
    try:
        chunk_id = bytes.fromhex(parts[2])
    except ValueError:
        return None
    return ChunkId(chunk_id) if parts[1] == parts[2][:4] else None


@attrs.frozen
class QuarantineRecord:
    """Why a chunk was moved aside, and when.

    :param chunk: the chunk id (hex)
    :param problem: what verify found ("missing from the store", or what its check said)
    :param found: when (ISO 8601, UTC)
    :param host: the host that ran verify
    :param blob_size: bytes of the damaged blob kept with the record (0: the chunk was missing)
    """

    chunk: str
    problem: str
    found: str
    host: str
    blob_size: int = 0

    @property
    def missing(self) -> bool:
        return self.problem == MISSING


MISSING = "missing from the store"


def encode_record(record: QuarantineRecord, blob: bytes | None) -> bytes:
    """The object of a record: its JSON line, then the damaged blob (if any)."""
    return _MAGIC + json.dumps(attrs.asdict(record), sort_keys=True).encode() + b"\n" + (blob or b"")


def decode_record(raw: bytes) -> tuple[QuarantineRecord, bytes] | None:
    """(record, damaged blob) of a record object, or None when it is not one."""
    line, _, blob = raw.partition(b"\n")
    if not line.startswith(_MAGIC):
        return None
    try:
        data = json.loads(line[len(_MAGIC) :])
        record = QuarantineRecord(
            str(data["chunk"]),
            str(data["problem"]),
            str(data["found"]),
            str(data["host"]),
            int(data["blob_size"]),
        )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return record, blob


def read_record(store: Store, chunk_id: bytes) -> QuarantineRecord | None:
    """The record of ``chunk_id`` (None: it was never quarantined)."""
    try:
        decoded = decode_record(store.get(quarantine_key(chunk_id)))
    except NotFoundError:
        return None
    return decoded[0] if decoded is not None else None


def quarantined_ids(store: Store) -> set[ChunkId]:
    """The ids of every chunk with a record (one listing of ``quarantine/``)."""
    found = set()
    for stored in store.list(QUARANTINE):
        chunk_id = _parse_key(stored.key)
        if chunk_id is not None:
            found.add(chunk_id)
    return found


def absent_quarantined(store: Store) -> set[ChunkId]:
    """The quarantined chunks the store lacks: what a writer must not believe exists (one listing, and one
    request per quarantined chunk)."""
    return {chunk_id for chunk_id in quarantined_ids(store) if not store.exists(chunk_key(chunk_id))}


def quarantine(store: Store, chunk_id: ChunkId, problem: str, blob: bytes | None) -> bool:
    """Record ``chunk_id`` (keeping a record that is there already) and, when ``blob`` is the damaged blob
    verify read, delete the chunk if the store still holds exactly that.

    :return: True when the chunk was deleted (moved aside)
    :raise StoreError: the store failed
    """
    record = QuarantineRecord(chunk_id.hex(), problem, utc_now_iso(), socket.gethostname(), len(blob or b""))
    store.put(quarantine_key(chunk_id), encode_record(record, blob), if_absent=True)
    if blob is None:
        return False
    try:
        current = store.get(chunk_key(chunk_id))
    except NotFoundError:
        return False
    if current != blob:
        return False  # stored again meanwhile (or changed again): not what verify found
    store.delete(chunk_key(chunk_id))
    return True


def clear(store: Store, chunk_ids: Iterable[bytes]) -> None:
    """Remove the records of ``chunk_ids`` (healed, or named by no backup any more)."""
    for chunk_id in chunk_ids:
        store.delete(quarantine_key(chunk_id))
