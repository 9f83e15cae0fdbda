"""The repository marker ``vmsnap-repo.json``: which layout a repository has and how its chunks are stored.

Format 2 (what vmsnap writes now)::

    {"format": 2, "layout": "chunks" | "qcow2", "id": "<32 hex: names its local state directory>",
     "chunk_size": 4194304 | null, "compression": "zstd" | "none" | null,
     "encryption": null | {"cipher": "aes-256-gcm", "chunk_id": "hmac-sha256", "key_id": "<32 hex>"}}

``chunk_size``, ``compression`` and ``encryption`` are null in the qcow2 layout. Format 1 (``{"format": 1}``,
vmsnap 0.1) is a ``qcow2`` repository and is read as one (its marker is never rewritten).
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
LAYOUTS = ("chunks", "qcow2")
DEFAULT_LAYOUT = "chunks"
"""The layout of a repository made by ``backup`` in a new or empty directory (and by ``init``)."""
COMPRESSIONS = ("zstd", "none")
CHUNK_SIZE = 4 * 1024 * 1024
CIPHER = "aes-256-gcm"
CHUNK_ID = "hmac-sha256"

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
    """

    format: int
    layout: Layout
    id: str = ""
    compression: str | None = None
    key_id: str | None = None

    @property
    def encrypted(self) -> bool:
        return self.key_id is not None

    @classmethod
    def new(cls, layout: str, *, compression: str = "zstd", key_id: str | None = None) -> RepoMarker:
        """The marker of a new repository.

        :raise UsageError: an unknown layout or compression, or encryption/compression in the qcow2 layout
        """
        checked = check_layout(layout)
        if compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r}", hint="use zstd or none")
        if checked == "qcow2":
            if key_id is not None:
                raise UsageError(
                    "the qcow2 layout cannot be encrypted (its images are plain qcow2 files)",
                    hint="use --layout chunks with --encrypt",
                )
            return cls(FORMAT, checked, secrets.token_hex(16))
        return cls(FORMAT, checked, secrets.token_hex(16), compression, key_id)

    def to_json(self) -> dict[str, Any]:
        """The marker's JSON object (format 2)."""
        chunks = self.layout == "chunks"
        encryption = None
        if self.key_id is not None:
            encryption = {"cipher": CIPHER, "chunk_id": CHUNK_ID, "key_id": self.key_id}
        return {
            "format": FORMAT,
            "layout": self.layout,
            "id": self.id,
            "chunk_size": CHUNK_SIZE if chunks else None,
            "compression": self.compression if chunks else None,
            "encryption": encryption,
        }

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
        layout = check_layout(str(data["layout"]))
        repo_id = str(data["id"])
        if not _HEX32.match(repo_id):
            raise ValueError(f"repository id {repo_id!r}")
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
            if encryption.get("cipher") != CIPHER or encryption.get("chunk_id") != CHUNK_ID:
                raise ValueError(f"encryption {encryption!r}")
            key_id = str(encryption["key_id"])
            if not _HEX32.match(key_id):
                raise ValueError(f"key id {key_id!r}")
        return cls(FORMAT, layout, repo_id, compression, key_id)
