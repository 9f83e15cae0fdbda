"""The repository marker ``vmsnap-repo.json``: which layout a repository has and how its chunks are stored.

Format 2 (what vmsnap writes now)::

    {"format": 2, "layout": "<a registered layout>", "id": "<32 hex: names its local state directory>",
     "chunk_size": 4194304 | null, "compression": "zstd" | "none" | null,
     "encryption": null | {"cipher": "aes-256-gcm", "chunk_id": "hmac-sha256", "key_id": "<32 hex>"}}

``chunk_size`` and ``compression`` are null in a layout that cuts nothing into chunks (``qcow2``), and
``encryption`` in one that cannot be encrypted: what each layout needs of its marker is the layout's own
rule (:meth:`~vmsnap.repo.layout.RepositoryLayout.accept_marker`); this module parses and writes the format.
Format 1 (``{"format": 1}``, vmsnap 0.1) is a repository of layout :data:`FORMAT1_LAYOUT` and is read as one
(its marker is never rewritten).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import attrs

from vmsnap.errors import RepositoryError, UsageError
from vmsnap.image.geometry import CHUNK_SIZE

MARKER = "vmsnap-repo.json"
FORMAT = 2
FORMAT1_LAYOUT = "qcow2"
"""The layout of a repository whose marker is vmsnap 0.1's ``{"format": 1}``."""
DEFAULT_LAYOUT = "chunks"
"""The layout of a repository made by ``backup`` in a new or empty directory (and by ``init``)."""
COMPRESSIONS = ("zstd", "none")
CIPHER = "aes-256-gcm"
CHUNK_ID = "hmac-sha256"

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_LAYOUT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,63}$")


@attrs.frozen
class RepoMarker:
    """What ``vmsnap-repo.json`` says (see the module docstring).

    :param format: 1 (vmsnap 0.1, layout qcow2) or 2
    :param layout: the layout's registered name
    :param id: a random id naming the repository's local state directory ("" in format 1)
    :param compression: "zstd" or "none" (a layout that cuts chunks), else None
    :param key_id: the fingerprint of the key of an encrypted repository, else None
    :param chunk_size: the chunk size of a layout that cuts chunks, else None
    """

    format: int
    layout: str
    id: str = ""
    compression: str | None = None
    key_id: str | None = None
    chunk_size: int | None = None

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
    ) -> RepoMarker:
        """The marker of a new repository, with a fresh id; a layout's rules are
        :meth:`~vmsnap.repo.layout.RepositoryLayout.new_marker`'s.

        :raise UsageError: a malformed layout name or an unknown compression
        """
        if not _LAYOUT_NAME.match(layout):
            raise UsageError(f"unknown repository layout {layout!r}")
        if compression is not None and compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r}", hint=f"use {' or '.join(COMPRESSIONS)}")
        return cls(FORMAT, layout, secrets.token_hex(16), compression, key_id, chunk_size)

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object (format 2)."""
        encryption = None
        if self.key_id is not None:
            encryption = {"cipher": CIPHER, "chunk_id": CHUNK_ID, "key_id": self.key_id}
        return {
            "format": FORMAT,
            "layout": self.layout,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "compression": self.compression,
            "encryption": encryption,
        }

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
        if version != FORMAT:
            raise RepositoryError(
                f"repository {where} has format {version!r}; this vmsnap reads formats 1 and {FORMAT}",
                hint="use the vmsnap version that wrote it",
            )
        try:
            return cls._parse_v2(data)
        except (KeyError, TypeError, ValueError, UsageError) as err:
            raise RepositoryError(
                f"{where} is damaged: {err}", hint="restore the marker from a copy of the repository"
            ) from err

    @classmethod
    def _parse_v2(cls, data: dict[str, Any]) -> RepoMarker:
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
        encryption = data.get("encryption")
        key_id = None
        if encryption is not None:
            if encryption.get("cipher") != CIPHER or encryption.get("chunk_id") != CHUNK_ID:
                raise ValueError(f"encryption {encryption!r}")
            key_id = str(encryption["key_id"])
            if not _HEX32.match(key_id):
                raise ValueError(f"key id {key_id!r}")
        return cls(FORMAT, layout, repo_id, compression, key_id, chunk_size)
