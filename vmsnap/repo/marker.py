"""The repository marker ``vmsnap-repo.json``: which layout a repository has and how its chunks are stored.

Format 2::

    {"format": 2, "layout": "<a registered layout>", "id": "<32 hex: names its local state directory>",
     "chunk_size": 4194304 | null, "compression": "zstd" | "none" | null,
     "encryption": null | {"cipher": "aes-256-gcm", "chunk_id": "hmac-sha256", "key_id": "<32 hex>"},
     "lock": {"mode": "compliance" | "governance", "days": N, "extend_days": M}}   (a locked repository only)

``chunk_size`` and ``compression`` are null in a layout that cuts nothing into chunks (``qcow2``), and
``encryption`` in one that cannot be encrypted: what each layout needs of its marker is the layout's own
rule (:meth:`~vmsnap.repo.layout.RepositoryLayout.accept_marker`); this module parses and writes the format.
Format 1 (``{"format": 1}``, vmsnap 0.1) is a repository of layout :data:`FORMAT1_LAYOUT` and is read as one
(its marker is never rewritten).

Format 3 is format 2 naming the function that gives chunks their ids: a ``chunk_id`` beside ``layout`` and,
when encrypted, the keyed function as the encryption's ``chunk_id`` (which names may stand there is the
layout's rule; ``chunks`` writes ``"blake3"`` and ``"blake3-keyed"``)::

    {"format": 3, …, "chunk_id": "blake3",
     "encryption": null | {"cipher": "aes-256-gcm", "chunk_id": "blake3-keyed", "key_id": "<32 hex>"}}

A marker that names no id function is written as format 2 (chunk ids sha256, HMAC-SHA256 when encrypted), so
a vmsnap that reads only formats 1 and 2 still reads it, and refuses a format-3 one by its number (rather
than finding every chunk damaged).

Format 4 is an encrypted repository whose metadata is sealed too (what ``init --encrypt`` makes: see
:mod:`vmsnap.repo.chunks.sealed`): format 3's fields when it names its chunk id function, else format 2's,
and the encryption says how its metadata is sealed::

    {"format": 4, …, "chunk_id": "blake3",
     "encryption": {"cipher": "aes-256-gcm", "chunk_id": "blake3-keyed", "key_id": "<32 hex>",
                    "metadata": "sealed-1"}}

An encrypted repository whose metadata is plain (made before: format 2, or 3) keeps its format and opens as it
did; a vmsnap that reads only formats 1 to 3 refuses a format-4 one by its number rather than finding no
backups in it. The format is the highest of what the marker needs: 4 when sealed, else 3 when it names its
chunk id function, else 2.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import attrs

from vmsnap.errors import RepositoryError, UsageError
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.repo.locking import LockPolicy

MARKER = "vmsnap-repo.json"
FORMAT = 2
FORMAT_CHUNK_ID = 3
"""The format of a marker that names its chunk id function (format 2 plus ``chunk_id``)."""
FORMAT_SEALED = 4
"""The format of an encrypted repository whose metadata is sealed (2 or 3 plus ``encryption.metadata``)."""
SEALED = "sealed-1"
"""``encryption.metadata`` of a format-4 marker: keys and objects sealed as :mod:`vmsnap.repo.chunks.sealed`
says."""
FORMAT1_LAYOUT = "qcow2"
"""The layout of a repository whose marker is vmsnap 0.1's ``{"format": 1}``."""
DEFAULT_LAYOUT = "chunks"
"""The layout of a repository made by ``backup`` in a new or empty directory (and by ``init``)."""
COMPRESSIONS = ("zstd", "none")
CIPHER = "aes-256-gcm"
CHUNK_ID = "hmac-sha256"

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_LAYOUT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,63}$")
_FUNCTION_NAME = _LAYOUT_NAME
"""What a chunk id function's name in a format-3 marker may look like (the layout knows which it uses)."""


@attrs.frozen
class RepoMarker:
    """What ``vmsnap-repo.json`` says (see the module docstring).

    :param format: 1 (vmsnap 0.1, layout qcow2), 2, 3 (names the chunk id function) or 4 (sealed metadata)
    :param layout: the layout's registered name
    :param id: a random id naming the repository's local state directory ("" in format 1)
    :param compression: "zstd" or "none" (a layout that cuts chunks), else None
    :param key_id: the fingerprint of the key of an encrypted repository, else None
    :param chunk_size: the chunk size of a layout that cuts chunks, else None
    :param chunk_id: the chunk id function a format-3 marker names, else None (format 1 or 2)
    :param keyed_chunk_id: the keyed chunk id function an encrypted format-3 marker names, else None
        (format 2's ``hmac-sha256``, or no encryption)
    :param sealed: the repository's metadata is sealed (format 4; encrypted only)
    :param lock: how a locked repository locks what its backups write (S3 Object Lock), else None
    """

    format: int
    layout: str
    id: str = ""
    compression: str | None = None
    key_id: str | None = None
    chunk_size: int | None = None
    chunk_id: str | None = None
    keyed_chunk_id: str | None = None
    sealed: bool = False
    lock: LockPolicy | None = None

    @property
    def encrypted(self) -> bool:
        return self.key_id is not None

    @classmethod
    def new(
        cls,
        layout: str,
        *,
        chunk_size: int | None = None,
        compression: str | None = None,
        key_id: str | None = None,
        sealed: bool | None = None,
        lock: LockPolicy | None = None,
    ) -> RepoMarker:
        """The marker of a new repository, with a fresh id; a layout's rules are
        :meth:`~vmsnap.repo.layout.RepositoryLayout.new_marker`'s.

        :param sealed: seal the metadata (default: when encrypted and not locked; format 4)
        :raise UsageError: a malformed layout name, an unknown compression, or sealed without a key
        """
        if not _LAYOUT_NAME.match(layout):
            raise UsageError(f"unknown repository layout {layout!r}")
        if compression is not None and compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r}", hint=f"use {' or '.join(COMPRESSIONS)}")
        sealed = key_id is not None and lock is None if sealed is None else sealed
        if sealed and key_id is None:
            raise UsageError("only an encrypted repository can seal its metadata", hint="a bug in the caller")
        if sealed and lock is not None:
            raise UsageError("a locked repository's metadata is not sealed", hint="a bug in the caller")
        version = FORMAT_SEALED if sealed else FORMAT
        return cls(
            version, layout, secrets.token_hex(16), compression, key_id, chunk_size, sealed=sealed, lock=lock
        )

    def naming_chunk_ids(self, chunk_id: str, keyed_chunk_id: str) -> RepoMarker:
        """This marker naming its chunk id functions (format 3, or 4 when sealed): ``chunk_id``, and
        ``keyed_chunk_id`` when it is encrypted.

        :raise UsageError: a malformed name
        """
        for name in (chunk_id, keyed_chunk_id):
            if not _FUNCTION_NAME.match(name):
                raise UsageError(f"unknown chunk id function {name!r}")
        keyed = keyed_chunk_id if self.key_id is not None else None
        version = FORMAT_SEALED if self.sealed else FORMAT_CHUNK_ID
        return attrs.evolve(self, format=version, chunk_id=chunk_id, keyed_chunk_id=keyed)

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object (format 2, 3 when it names its chunk id functions, 4 when sealed)."""
        encryption: dict[str, str] | None = None
        if self.key_id is not None:
            keyed = self.keyed_chunk_id if self.keyed_chunk_id is not None else CHUNK_ID
            encryption = {"cipher": CIPHER, "chunk_id": keyed, "key_id": self.key_id}
            if self.sealed:
                encryption["metadata"] = SEALED
        version = FORMAT_SEALED if self.sealed else FORMAT if self.chunk_id is None else FORMAT_CHUNK_ID
        data: dict[str, Any] = {
            "format": version,
            "layout": self.layout,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "compression": self.compression,
            "encryption": encryption,
        }
        if self.chunk_id is not None:
            data["chunk_id"] = self.chunk_id
        if self.lock is not None:
            data["lock"] = self.lock.to_json()
        return data

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> RepoMarker:
        """Parse a marker (the layout's own rules are checked by the layout when it opens).

        :raise RepositoryError: damaged, or of a format this vmsnap does not read
        """
        try:
            data = json.loads(raw)
            version = data["format"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise RepositoryError(
                f"{where} is unreadable or damaged: {err}", hint="check the path and its permissions"
            ) from err
        if version == 1:
            return cls(1, FORMAT1_LAYOUT)
        if version not in (FORMAT, FORMAT_CHUNK_ID, FORMAT_SEALED):
            raise RepositoryError(
                f"repository {where} has format {version!r}; this vmsnap reads formats 1 to {FORMAT_SEALED}",
                hint="use the vmsnap version that wrote it",
            )
        try:
            return cls._parse_v2(data, version)
        except (KeyError, TypeError, ValueError, UsageError) as err:
            raise RepositoryError(
                f"{where} is damaged: {err}", hint="restore the marker from a copy of the repository"
            ) from err

    @classmethod
    def _parse_v2(cls, data: dict[str, Any], version: int) -> RepoMarker:
        """Formats 2, 3 and 4 (see the module docstring)."""
        layout = str(data["layout"])
        if not _LAYOUT_NAME.match(layout):
            raise ValueError(f"layout {layout!r}")
        repo_id = str(data["id"])
        if not _HEX32.match(repo_id):
            raise ValueError(f"repository id {repo_id!r}")
        chunk_size = data.get("chunk_size")
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size != CHUNK_SIZE):
            raise ValueError(f"chunk size {chunk_size!r} (this vmsnap uses {CHUNK_SIZE})")
        compression = data.get("compression")
        if compression is not None and compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}")
        chunk_id = None
        if version == FORMAT_CHUNK_ID or (version == FORMAT_SEALED and "chunk_id" in data):
            chunk_id = data["chunk_id"]
            if not isinstance(chunk_id, str) or not _FUNCTION_NAME.match(chunk_id):
                raise ValueError(f"chunk id {chunk_id!r}")
        encryption = data.get("encryption")
        key_id = keyed = None
        if encryption is not None:
            keyed = encryption.get("chunk_id")
            if chunk_id is None:
                ok = keyed == CHUNK_ID
                keyed = None  # format 2's, which it does not name
            else:
                ok = isinstance(keyed, str) and _FUNCTION_NAME.match(keyed) is not None
            if encryption.get("cipher") != CIPHER or not ok:
                raise ValueError(f"encryption {encryption!r}")
            key_id = str(encryption["key_id"])
            if not _HEX32.match(key_id):
                raise ValueError(f"key id {key_id!r}")
            if encryption.get("metadata") != (SEALED if version == FORMAT_SEALED else None):
                raise ValueError(f"metadata {encryption.get('metadata')!r} in format {version}")
        elif version == FORMAT_SEALED:
            raise ValueError("format 4 without encryption")
        sealed = version == FORMAT_SEALED
        lock = data.get("lock")
        if sealed and lock is not None:
            raise ValueError("a lock in format 4 (a locked repository's metadata is not sealed)")
        policy = LockPolicy.from_json(lock) if lock is not None else None
        return cls(version, layout, repo_id, compression, key_id, chunk_size, chunk_id, keyed, sealed, policy)
