"""The repository marker ``vmsnap-repo.json``: which layout a repository has and how its chunks are stored.

Format 2::

    {"format": 2, "layout": "chunks" | "qcow2", "id": "<32 hex: names its local state directory>",
     "chunk_size": 4194304 | null, "compression": "zstd" | "none" | null,
     "encryption": null | {"cipher": "aes-256-gcm", "chunk_id": "hmac-sha256", "key_id": "<32 hex>"}}

``chunk_size``, ``compression`` and ``encryption`` are null in the qcow2 layout. Chunk ids are sha256
(HMAC-SHA256 when encrypted). Format 3 is format 2 plus the chunk id hash of a ``chunks`` repository whose
ids are BLAKE3 (what ``init`` makes unless told ``--chunk-id sha256``; see :mod:`vmsnap.repo.chunks.blob`)::

    {"format": 3, …, "chunk_id": "blake3",
     "encryption": null | {"cipher": "aes-256-gcm", "chunk_id": "blake3-keyed", "key_id": "<32 hex>"}}

A repository with sha256 ids is still written as format 2, so a vmsnap that reads only formats 1 and 2 reads
it, and refuses a format-3 one by its format number (rather than finding every chunk damaged). Format 1
(``{"format": 1}``, vmsnap 0.1) is a ``qcow2`` repository and is read as one (its marker is never rewritten).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

import attrs

from vmsnap.errors import RepositoryError, UsageError

MARKER = "vmsnap-repo.json"
FORMAT = 2
FORMAT_BLAKE3 = 3
"""The format of a marker whose chunk ids are BLAKE3 (format 2 with ``chunk_id``)."""
LAYOUTS = ("chunks", "qcow2")
DEFAULT_LAYOUT = "chunks"
"""The layout of a repository made by ``backup`` in a new or empty directory (and by ``init``)."""
COMPRESSIONS = ("zstd", "none")
CHUNK_SIZE = 4 * 1024 * 1024
CIPHER = "aes-256-gcm"
CHUNK_ID = "hmac-sha256"
CHUNK_IDS = ("blake3", "sha256")
"""Chunk id hashes, by the name ``init --chunk-id`` takes; the first is what new repositories use."""
_KEYED_CHUNK_ID = {"sha256": CHUNK_ID, "blake3": "blake3-keyed"}

Layout = Literal["chunks", "qcow2"]
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def check_layout(layout: str) -> Layout:
    """:raise UsageError: ``layout`` is not one this vmsnap writes."""
    if layout == "chunks":
        return "chunks"
    if layout == "qcow2":
        return "qcow2"
    raise UsageError(f"unknown repository layout {layout!r}", hint="use chunks or qcow2")


@attrs.frozen
class RepoMarker:
    """What ``vmsnap-repo.json`` says (see the module docstring).

    :param format: 1 (vmsnap 0.1, layout qcow2) or 2
    :param layout: "chunks" or "qcow2"
    :param id: a random id naming the repository's local state directory ("" in format 1)
    :param compression: "zstd" or "none" (chunks)
    :param key_id: the fingerprint of the key of an encrypted repository, else None
    :param chunk_id: the chunk id hash, "blake3" or "sha256" (chunks; "sha256" in the qcow2 layout, which
        has no chunk ids)
    """

    format: int
    layout: Layout
    id: str = ""
    compression: str | None = None
    key_id: str | None = None
    chunk_id: str = "sha256"

    @property
    def encrypted(self) -> bool:
        return self.key_id is not None

    @classmethod
    def new(
        cls,
        layout: str,
        *,
        compression: str = "zstd",
        key_id: str | None = None,
        chunk_id: str = CHUNK_IDS[0],
    ) -> RepoMarker:
        """The marker of a new repository.

        :raise UsageError: an unknown layout, compression or chunk id hash, or encryption in the qcow2
            layout
        """
        checked = check_layout(layout)
        if compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r}", hint="use zstd or none")
        if chunk_id not in CHUNK_IDS:
            raise UsageError(f"unknown chunk id hash {chunk_id!r}", hint=f"use {' or '.join(CHUNK_IDS)}")
        if checked == "qcow2":
            if key_id is not None:
                raise UsageError(
                    "the qcow2 layout cannot be encrypted (its images are plain qcow2 files)",
                    hint="use --layout chunks with --encrypt",
                )
            return cls(FORMAT, checked, secrets.token_hex(16))
        version = FORMAT_BLAKE3 if chunk_id == "blake3" else FORMAT
        return cls(version, checked, secrets.token_hex(16), compression, key_id, chunk_id)

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object (format 2, or 3 for BLAKE3 chunk ids)."""
        chunks = self.layout == "chunks"
        encryption = None
        if self.key_id is not None:
            encryption = {"cipher": CIPHER, "chunk_id": _KEYED_CHUNK_ID[self.chunk_id], "key_id": self.key_id}
        data: dict[str, Any] = {
            "format": FORMAT,
            "layout": self.layout,
            "id": self.id,
            "chunk_size": CHUNK_SIZE if chunks else None,
            "compression": self.compression if chunks else None,
            "encryption": encryption,
        }
        if chunks and self.chunk_id != "sha256":
            data["format"] = FORMAT_BLAKE3
            data["chunk_id"] = self.chunk_id
        return data

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> RepoMarker:
        """Parse a marker.

        :raise RepositoryError: damaged, or of a format or layout this vmsnap does not read
        """
        try:
            data = json.loads(raw)
            version = data["format"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise RepositoryError(
                f"{where} is unreadable or damaged: {err}", hint="check the path and its permissions"
            ) from err
        if version == 1:
            return cls(1, "qcow2")
        if version not in (FORMAT, FORMAT_BLAKE3):
            raise RepositoryError(
                f"repository {where} has format {version!r}; this vmsnap reads formats 1 to {FORMAT_BLAKE3}",
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
        layout = check_layout(str(data["layout"]))
        repo_id = str(data["id"])
        if not _HEX32.match(repo_id):
            raise ValueError(f"repository id {repo_id!r}")
        chunk_id = "sha256"
        if version == FORMAT_BLAKE3:
            chunk_id = str(data["chunk_id"])
            if chunk_id != "blake3" or layout != "chunks":
                raise ValueError(f"chunk id {chunk_id!r} in a format-{version} {layout} repository")
        if layout == "qcow2":
            return cls(FORMAT, layout, repo_id)
        if data["chunk_size"] != CHUNK_SIZE:
            raise ValueError(f"chunk size {data['chunk_size']!r} (this vmsnap uses {CHUNK_SIZE})")
        compression = str(data["compression"])
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}")
        encryption = data.get("encryption")
        key_id = None
        if encryption is not None:
            keyed = _KEYED_CHUNK_ID[chunk_id]
            if encryption.get("cipher") != CIPHER or encryption.get("chunk_id") != keyed:
                raise ValueError(f"encryption {encryption!r}")
            key_id = str(encryption["key_id"])
            if not _HEX32.match(key_id):
                raise ValueError(f"key id {key_id!r}")
        return cls(version, layout, repo_id, compression, key_id, chunk_id)
