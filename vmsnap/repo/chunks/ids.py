"""Which hash names the chunks of a ``chunks`` repository, and how its marker says so: the layout's marker
rules (:class:`ChunkIdRules`, a base of :class:`~vmsnap.repo.chunks.repository.ChunksRepository`).

=========  =====================================  ============================================================
id hash    marker                                 ids (:mod:`vmsnap.repo.chunks.blob`)
=========  =====================================  ============================================================
blake3     format 3, ``"chunk_id": "blake3"``;    BLAKE3; keyed BLAKE3 with its own subkey when encrypted
           encrypted: ``"blake3-keyed"``
sha256     format 2 (names no id hash);           sha256; HMAC-SHA256 when encrypted
           encrypted: ``"hmac-sha256"``
=========  =====================================  ============================================================

New repositories use BLAKE3 unless ``init --chunk-id sha256`` says otherwise; an unencrypted sha256
repository keeps format 2, so a vmsnap that reads only formats 1 and 2 still reads it. A new encrypted
repository of either hash is format 4 (its metadata sealed: :mod:`vmsnap.repo.marker`), naming its id hash
as format 3 does when it is BLAKE3.
"""

from __future__ import annotations

from typing import ClassVar

from vmsnap.repo.chunks.blob import ID_HASHES
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.marker import RepoMarker

_MARKED: dict[str, tuple[str | None, str | None]] = {
    "blake3": ("blake3", "blake3-keyed"),
    "sha256": (None, None),  # format 2: the marker names neither (its keyed function is hmac-sha256)
}
"""Id hash → what the marker names: its ``chunk_id``, and its encryption's ``chunk_id`` (format 3 only)."""


def id_hash_of(marker: RepoMarker) -> str:
    """The chunk id hash of the repository ``marker`` describes.

    :raise ValueError: it names an id hash (or a keyed one) this vmsnap does not compute
    """
    for id_hash, (named, keyed) in _MARKED.items():
        if marker.chunk_id == named:
            if marker.encrypted and marker.keyed_chunk_id != keyed:
                raise ValueError(f"keyed chunk id {marker.keyed_chunk_id!r} with chunk id {named!r}")
            return id_hash
    raise ValueError(f"chunk id {marker.chunk_id!r} (this vmsnap computes {' and '.join(ID_HASHES)})")


class ChunkIdRules(RepositoryLayout):
    """The ``chunks`` layout's marker rules about its chunk id hash (see the module docstring).

    :cvar chunk_ids: the id hashes a new repository may use, the default (BLAKE3) first
    """

    chunk_ids: ClassVar[tuple[str, ...]] = ID_HASHES

    @classmethod
    def new_marker(
        cls,
        *,
        compression: str = "zstd",
        key_id: str | None = None,
        chunk_id: str | None = None,
        lock: LockPolicy | None = None,
    ) -> RepoMarker:
        """The layout's marker (:meth:`RepositoryLayout.new_marker`) naming its id hash where it is not
        sha256 (format 3; 4 when its metadata is sealed)."""
        marker = super().new_marker(compression=compression, key_id=key_id, chunk_id=chunk_id, lock=lock)
        named, keyed = _MARKED[chunk_id if chunk_id is not None else cls.chunk_ids[0]]
        if named is None or keyed is None:
            return marker
        return marker.naming_chunk_ids(named, keyed)

    @classmethod
    def accept_marker(cls, marker: RepoMarker) -> RepoMarker:
        """:meth:`RepositoryLayout.accept_marker`, and an id hash this vmsnap computes.

        :raise ValueError: the marker names another (the caller says it is damaged)
        """
        accepted = super().accept_marker(marker)
        id_hash_of(accepted)
        return accepted
