"""Which chunks the store holds, without a request per chunk: the gc generation, the known-chunks epoch, this
host's cache of known chunk ids, and the listing that renews it.

``gc-generation`` (a store object) holds a random token that every ``gc`` replaces *before* it deletes
anything; as long as it is unchanged, no chunk has been collected, so a set of ids that were in the store
stays true (chunks are written once and only gc deletes them). ``known-chunks-epoch`` is replaced when a
chunk was found missing that should not be (deleted behind vmsnap's back: ``verify`` does it), so that every
host drops its cache too — without the gc generation, which would fail the backups running meanwhile.

The cache (``known-chunks`` in the repository's local state directory, see :mod:`vmsnap.repo.state`)::

    b"vmsnap-known-chunks 1 <generation>.<epoch>\\n" + 32-byte chunk ids, appended as chunks are stored

is used only while both tokens are the store's; otherwise it is rebuilt from one listing of ``chunks/``
(:func:`list_chunks`: on a store whose listing is sharded, the 16 prefixes ``chunks/0`` … ``chunks/f``
listed in parallel, 1000 keys a request on S3). Ids are appended (``O_APPEND``) the moment a chunk is stored
or found, so a backup killed half-way leaves them behind for the next run, which then stores none of those
chunks again. A lost or damaged cache only costs a listing.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmsnap.errors import NotFoundError
from vmsnap.files import FILE_MODE, write_atomic
from vmsnap.repo.chunks.blob import ID_SIZE, ChunkId, parse_chunk_key
from vmsnap.repo.stores.base import Data, Retention, Store, StoredObject
from vmsnap.repo.stores.wrapper import StoreWrapper

GENERATION_KEY = "gc-generation"
EPOCH_KEY = "known-chunks-epoch"
LIST_WORKERS = 16
"""Listings of ``chunks/`` run in parallel, one per first hex digit of the id."""
_MAGIC = b"vmsnap-known-chunks 1 "
_TOKEN = re.compile(r"^[0-9a-f]{1,64}$")


def read_generation(store: Store) -> str:
    """The store's gc generation ("0" before the first gc).

    :raise StoreError: the store failed
    """
    try:
        text = store.get(GENERATION_KEY).decode("ascii", errors="replace").strip()
    except NotFoundError:
        return "0"
    return text if _TOKEN.match(text) else "damaged"


def bump_generation(store: Store) -> str:
    """Give the store a new gc generation (gc does this before it deletes anything) and return it."""
    token = secrets.token_hex(16)
    store.put(GENERATION_KEY, token.encode("ascii") + b"\n")
    return token


def read_epoch(store: Store) -> str:
    """The store's known-chunks epoch ("0" before any chunk was found missing)."""
    try:
        text = store.get(EPOCH_KEY).decode("ascii", errors="replace").strip()
    except NotFoundError:
        return "0"
    return text if _TOKEN.match(text) else "damaged"


def drop_known_caches(store: Store) -> None:
    """Make every host's cache of known chunks stale (a chunk is missing that a cache may name)."""
    store.put(EPOCH_KEY, secrets.token_hex(16).encode("ascii") + b"\n")


def list_chunks(store: Store, *, workers: int = LIST_WORKERS) -> list[tuple[StoredObject, ChunkId]]:
    """Every chunk blob in ``store`` with its id (other keys under ``chunks/`` are ignored). Where the store's
    listing is sharded (bound by round trips: 1000 keys each on S3), the prefixes ``chunks/0`` … ``chunks/f``
    are listed on ``workers`` threads; otherwise (a local directory) it is walked once.

    :raise StoreError: a listing failed
    """
    if not store.capabilities.sharded_listing:
        return [(s, c) for s in store.list("chunks/") if (c := parse_chunk_key(s.key)) is not None]

    def one(digit: str) -> list[tuple[StoredObject, ChunkId]]:
        found = []
        for stored in store.list(f"chunks/{digit}"):
            chunk_id = parse_chunk_key(stored.key)
            if chunk_id is not None:
                found.append((stored, chunk_id))
        return found

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmsnap-list") as pool:
        return [entry for part in pool.map(one, "0123456789abcdef") for entry in part]


def list_chunk_ids(store: Store) -> set[ChunkId]:
    """The ids of every chunk blob in ``store`` (see :func:`list_chunks`)."""
    return {chunk_id for _, chunk_id in list_chunks(store)}


class KnownChunks:
    """The chunk ids this host knows to be in the store (see the module docstring); thread-safe.

    :param store: the repository's store
    :param cache: the cache file, or None (then every :meth:`load` lists the store)
    """

    def __init__(self, store: Store, cache: Path | None) -> None:
        self.store = store
        self.cache = cache
        self._lock = threading.Lock()
        self._fd = -1
        self.listed = False

    def load(self, generation: str, *, list_if_stale: bool = True) -> set[ChunkId]:
        """The known ids for the store at ``generation`` (and its current epoch): the cache's, or a fresh
        listing (saved as the new cache) — or, without ``list_if_stale``, nothing when the cache is stale
        (an incremental backup, which knows its parent's chunks, need not list the whole store)."""
        token = f"{generation}.{read_epoch(self.store)}"
        ids = self._read_cache(token)
        if ids is None:
            if not list_if_stale:
                return set()  # the stale cache stays as it is: the next full backup lists and renews it
            ids = list_chunk_ids(self.store)
            self.listed = True
            self._write_cache(token, ids)
        self._open_for_append()
        return ids

    def _read_cache(self, generation: str) -> set[ChunkId] | None:
        if self.cache is None:
            return None
        try:
            raw = self.cache.read_bytes()
        except OSError:
            return None
        header, _, body = raw.partition(b"\n")
        if not header.startswith(_MAGIC) or header[len(_MAGIC) :].decode("ascii", "replace") != generation:
            return None
        usable = len(body) - len(body) % ID_SIZE  # a torn last append is dropped
        return {ChunkId(body[i : i + ID_SIZE]) for i in range(0, usable, ID_SIZE)}

    def _write_cache(self, generation: str, ids: Iterable[bytes]) -> None:
        if self.cache is None:
            return
        write_atomic(self.cache, _MAGIC + generation.encode("ascii") + b"\n" + b"".join(sorted(ids)))

    def _open_for_append(self) -> None:
        if self.cache is not None and self._fd < 0:
            try:
                self._fd = os.open(self.cache, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
            except FileNotFoundError:
                self._fd = -1  # removed meanwhile: nothing is remembered this time

    def add(self, chunk_id: bytes) -> None:
        """Remember that the store holds ``chunk_id`` (appended to the cache at once)."""
        if self._fd >= 0:
            with self._lock:
                os.write(self._fd, chunk_id)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class RecordingStore(StoreWrapper):
    """A store that tells :class:`KnownChunks` of every chunk it stored or found there (``put`` of a chunk
    key) — of one ``put(durable=False)`` only once :meth:`sync` made it durable; everything else passes
    through; :attr:`written` holds the chunks its puts wrote (not found there)."""

    def __init__(self, store: Store, known: KnownChunks) -> None:
        super().__init__(store)
        self._known = known
        self._lock = threading.Lock()
        self._unsynced: list[ChunkId] = []
        self.puts = 0
        self.written: dict[ChunkId, int] = {}
        """Every chunk this store wrote (a put that returned True), with its blob's size."""

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        written = super().put(key, data, if_absent=if_absent, durable=durable, retention=retention)
        chunk_id = parse_chunk_key(key)
        with self._lock:
            self.puts += 1
            if chunk_id is not None and written:
                self.written[chunk_id] = len(data)
            if chunk_id is not None and written and not durable:
                self._unsynced.append(chunk_id)  # not in the store until sync(): not known yet
                chunk_id = None
        if chunk_id is not None:
            self._known.add(chunk_id)
        return written

    def sync(self) -> None:
        with self._lock:
            unsynced, self._unsynced = self._unsynced, []
        self._store.sync()
        for chunk_id in unsynced:
            self._known.add(chunk_id)
