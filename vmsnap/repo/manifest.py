"""What a repository records about one backup: the manifest, its disks, and backup ids.

``manifest.json`` (one per backup, written last) is the JSON object of :meth:`Manifest.to_json`. Two formats:

- **format 1** (layout ``qcow2``): format, vm, backup_id, kind (``full`` | ``incremental``), parent, strategy,
  transport, created (UTC ISO 8601 with ``Z``), quiesced, bitmap, digest (``sha256-4MiB-chunks``) and
  disks[] with name, file (always ``<name>.qcow2``), virtual_size, bytes_written and sha256 (the content
  digest of :mod:`vmsnap.image.digest`).
- **format 2** (layout ``chunks``): the same keys, plus layout (``"chunks"``), chunk_size (4194304) and
  definition (the chunk id of the saved ``domain.xml`` blob, or null); digest is ``sha256-index``: each
  disk's file is ``<name>.index`` and its sha256 is that of the index's bytes; bytes_written is what the
  backup newly stored; and each disk has ``chunks``: logical_size (bytes that are not holes), bytes_read
  (from the export), new_chunks and new_bytes (blobs this backup stored, their stored size), reused_chunks
  (data chunks it did not store: the store had them, or an incremental took them from its parent),
  zero_chunks (holes in the index) and unchanged_chunks (taken from the parent unread, holes included). In
  an encrypted repository the object also holds ``mac`` (see :mod:`vmsnap.repo.chunks.records`); in a
  locked one ``chunk_lock`` (UTC ISO 8601): every chunk the backup names is locked until at least then
  (see :mod:`vmsnap.repo.chunks.retain`).
- both formats, when the backup kept machine state: objects, the name and sha256 of each object sealed with
  the backup (:mod:`vmsnap.vm.machine_state`'s ``machine.json``, ``nvram.fd``, ``tpm-state.tar``); such an
  object is checked against it when read and cannot be replaced (:mod:`vmsnap.repo.attachments`).

:meth:`Manifest.from_json` refuses another format or digest, names that could become paths (``/``, ``..``, a
leading dot), files other than ``<name>.qcow2`` (``<name>.index``) and an incremental without a parent.
Backup ids are ``YYYYMMDDTHHMMSS.ffffffZ-xxxx`` (UTC, microseconds, random hex suffix): they sort by time.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.image.digest import ALGORITHM
from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.model import validate_name

QCOW2_FORMAT = 1
"""The manifest format of the ``qcow2`` layout (and the marker's ``format`` in vmsnap 0.1)."""
CHUNKS_FORMAT = 2
"""The manifest format of the ``chunks`` layout."""
REPO_FORMAT = QCOW2_FORMAT
"""Kept for callers of vmsnap 0.1: the format of a ``qcow2`` layout's manifests."""
FORMAT_LAYOUTS = {QCOW2_FORMAT: "qcow2", CHUNKS_FORMAT: "chunks"}
"""The layout whose manifests have each format (what a manifest's ``layout`` says)."""
INDEX_DIGEST = "sha256-index"
"""The ``digest`` of a format-2 manifest: each disk's sha256 is that of its index file."""
INDEX_CHUNK_SIZE = CHUNK_SIZE
"""The chunk size a format-2 manifest says (:data:`vmsnap.image.geometry.CHUNK_SIZE`)."""
MANIFEST = "manifest.json"
CHUNKS_SUFFIX = ".chunks"
INDEX_SUFFIX = ".index"

Kind = Literal["full", "incremental"]


# -- backup ids and times -------------------------------------------------------------------------------


def new_backup_id(now: dt.datetime | None = None) -> str:
    """A backup id that sorts by time: ``20261127T120812.123456Z-3f9a`` (UTC)."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"{moment:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(2)}"


def next_backup_id(existing: Iterable[str]) -> str:
    """A new backup id that sorts after every id in ``existing`` (names that are no ids are ignored), even
    when the clock went back since the newest of them was made."""
    newest = max((e for e in existing if e[:1].isdigit()), default="")
    moment = dt.datetime.now(dt.UTC)
    candidate = new_backup_id(moment)
    while candidate <= newest:  # a clock that went back: step past the newest id
        moment += dt.timedelta(microseconds=1)
        candidate = new_backup_id(max(moment, _id_time(newest) + dt.timedelta(microseconds=1)))
    return candidate


def _id_time(backup_id: str) -> dt.datetime:
    """When ``backup_id`` was made (now, for a name that is no id)."""
    try:
        return dt.datetime.strptime(backup_id.split("Z", 1)[0], "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime.now(dt.UTC)


def utc_now_iso() -> str:
    """The current UTC time in ISO 8601 with a ``Z``."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- the manifest ---------------------------------------------------------------------------------------


@attrs.frozen
class ChunkStats:
    """What a ``chunks`` backup did for one disk (format-2 manifests; see the module docstring)."""

    logical_size: int
    bytes_read: int
    new_chunks: int
    new_bytes: int
    reused_chunks: int
    zero_chunks: int
    unchanged_chunks: int

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ChunkStats:
        """:raise KeyError, TypeError, ValueError: malformed"""
        values = {f.name: int(data[f.name]) for f in attrs.fields(cls)}
        if any(v < 0 for v in values.values()):
            raise ValueError("negative chunk statistics")
        return cls(**values)


@attrs.frozen
class DiskRecord:
    """One disk of a backup, as the manifest lists it.

    :param name: the disk's name (a valid path component)
    :param file: its image (``<name>.qcow2``, layout qcow2) or index (``<name>.index``, layout chunks)
    :param virtual_size: guest-visible size in bytes
    :param bytes_written: what the transport (or QEMU) wrote for this backup; chunks: bytes newly stored
    :param sha256: qcow2: the ``sha256-4MiB-chunks`` digest of the guest-visible content (the whole chain
        read through), equal to the sha256 of the ``<name>.chunks`` file; chunks: the sha256 of the index
    :param chunks: what a ``chunks`` backup did (None in the qcow2 layout)
    """

    name: str
    file: str
    virtual_size: int
    bytes_written: int
    sha256: str
    chunks: ChunkStats | None = None

    @property
    def chunks_file(self) -> str:
        """The file of its chunk digests in a qcow2 backup directory, ``<name>.chunks``."""
        return f"{self.name}{CHUNKS_SUFFIX}"

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object for this disk."""
        data = attrs.asdict(self, recurse=False)
        if self.chunks is None:
            del data["chunks"]
        else:
            data["chunks"] = self.chunks.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, *, suffix: str = ".qcow2") -> DiskRecord:
        """Parse one entry of a manifest's ``disks``.

        :param suffix: the file each disk must name (``.qcow2``; ``.index`` in format 2)
        :raise ValueError: it names a file other than ``<name><suffix>``
        :raise UsageError: its name is not a valid path component
        :raise KeyError: a field is missing
        """
        name = validate_name(str(data["name"]), "disk name")
        if data["file"] != f"{name}{suffix}":
            raise ValueError(f"disk {name} names file {data['file']!r}, not {name}{suffix}")
        sha256 = str(data["sha256"])
        if suffix == INDEX_SUFFIX and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
            raise ValueError(f"disk {name} has sha256 {sha256!r}")
        stats = ChunkStats.from_json(data["chunks"]) if suffix == INDEX_SUFFIX else None
        return cls(name, data["file"], int(data["virtual_size"]), int(data["bytes_written"]), sha256, stats)


@attrs.frozen
class Manifest:
    """Everything recorded about one backup (``manifest.json``; the module docstring has both formats)."""

    vm: str
    backup_id: str
    kind: Kind
    parent: str | None
    strategy: str
    transport: str
    created: str
    quiesced: bool
    bitmap: str | None
    disks: tuple[DiskRecord, ...]
    format: int = QCOW2_FORMAT
    digest: str = ALGORITHM
    definition: str | None = None
    chunk_lock: str | None = None
    objects: Mapping[str, str] = attrs.field(factory=dict)
    """The objects sealed with the backup (its machine state): name → sha256 of the object's bytes."""

    @property
    def layout(self) -> str:
        """ "qcow2" (format 1) or "chunks" (format 2)."""
        return FORMAT_LAYOUTS[self.format]

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``."""
        data = attrs.asdict(self, recurse=False)
        data["disks"] = [d.to_json() for d in self.disks]
        if self.chunk_lock is None:
            del data["chunk_lock"]  # only a locked repository's manifests have it
        if self.objects:
            data["objects"] = dict(sorted(self.objects.items()))
        else:
            del data["objects"]  # a backup without machine state keeps the keys it always had
        if self.format == QCOW2_FORMAT:
            del data["definition"]  # format 1 keeps its keys
        else:
            data["layout"] = self.layout
            data["chunk_size"] = INDEX_CHUNK_SIZE
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: Path | str) -> Manifest:
        """Parse and check a manifest read from ``where``.

        :raise RepositoryError: malformed, of another format, or naming files outside its directory
        """
        try:
            version = _check_versions(data, where)
            suffix = INDEX_SUFFIX if version == CHUNKS_FORMAT else ".qcow2"
            disks = tuple(DiskRecord.from_json(d, suffix=suffix) for d in data["disks"])
            kind = data["kind"]
            if kind not in ("full", "incremental"):
                raise ValueError(f"kind {kind!r}")
            parent = data.get("parent")
            if kind == "incremental" and not parent:
                raise ValueError("an incremental backup without a parent")
            definition = data.get("definition") if version == CHUNKS_FORMAT else None
            chunk_lock = data.get("chunk_lock") if version == CHUNKS_FORMAT else None
            objects = data.get("objects") or {}
            if not isinstance(objects, dict) or not all(
                isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in objects.values()
            ):
                raise ValueError(f"objects {objects!r} is no map of names to sha256 digests")
            return cls(
                vm=validate_name(str(data["vm"]), "VM name"),
                backup_id=validate_name(str(data["backup_id"]), "backup id"),
                kind=kind,
                parent=validate_name(str(parent), "backup id") if parent else None,
                strategy=str(data["strategy"]),
                transport=str(data["transport"]),
                created=str(data["created"]),
                quiesced=bool(data["quiesced"]),
                bitmap=data.get("bitmap"),
                disks=disks,
                format=version,
                digest=str(data["digest"]),
                definition=str(definition) if definition is not None else None,
                chunk_lock=str(chunk_lock) if chunk_lock is not None else None,
                objects={validate_name(str(k), "object name"): str(v) for k, v in objects.items()},
            )
        except RepositoryError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, UsageError) as err:
            raise RepositoryError(
                f"manifest {where} is damaged: {err}",
                hint="run `vmsnap verify`; restore from another backup",
            ) from err

    def disk(self, name: str) -> DiskRecord:
        """The record of disk ``name``.

        :raise NotFoundError: listing the disks it has
        """
        for record in self.disks:
            if record.name == name:
                return record
        raise NotFoundError(
            f"backup {self.backup_id} has no disk {name!r}",
            hint=f"its disks: {', '.join(d.name for d in self.disks)}",
        )

    @property
    def size(self) -> int:
        """Bytes written for this backup, all disks (chunks: bytes newly stored)."""
        return sum(d.bytes_written for d in self.disks)

    def summary(self) -> dict[str, int | None]:
        """What ``list`` shows of a backup's cost: logical_size (bytes of the disks that are not holes; None
        in the qcow2 layout, which does not record it), new_bytes (stored by this backup), reused_chunks
        (data chunks the store had already, or that an incremental took from its parent) and virtual_size."""
        stats = [d.chunks for d in self.disks if d.chunks is not None]
        return {
            "virtual_size": sum(d.virtual_size for d in self.disks),
            "logical_size": sum(s.logical_size for s in stats) if stats else None,
            "new_bytes": self.size,
            "reused_chunks": sum(s.reused_chunks for s in stats) if stats else None,
        }


def _check_versions(data: Any, where: Path | str) -> int:
    """The manifest's format, after refusing one that is no JSON object, or of a format or digest this
    vmsnap does not read.

    :raise TypeError: not a JSON object
    :raise RepositoryError: another format or digest
    """
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    version = data.get("format")
    if version not in (QCOW2_FORMAT, CHUNKS_FORMAT):
        raise RepositoryError(
            f"{where} has manifest format {version!r}; this vmsnap reads {QCOW2_FORMAT} and {CHUNKS_FORMAT}",
            hint="use the vmsnap version that wrote this repository",
        )
    expected = ALGORITHM if version == QCOW2_FORMAT else INDEX_DIGEST
    if data.get("digest") != expected:
        raise RepositoryError(
            f"{where} has digest {data.get('digest')!r}; this vmsnap knows {expected}",
            hint="use the vmsnap version that wrote this repository",
        )
    if version == CHUNKS_FORMAT and (
        data.get("layout") != FORMAT_LAYOUTS[CHUNKS_FORMAT] or data.get("chunk_size") != INDEX_CHUNK_SIZE
    ):
        raise RepositoryError(
            f"{where} has layout {data.get('layout')!r} and chunk size {data.get('chunk_size')!r}",
            hint="use the vmsnap version that wrote this repository",
        )
    return int(version)


def parse_manifest(raw: bytes, vm: str, backup_id: str, *, where: Path | str) -> tuple[Manifest, Any]:
    """The manifest in ``raw`` (JSON) and the decoded JSON object, which must describe ``vm``/``backup_id``.

    :raise RepositoryError: not JSON, damaged, or about another backup
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise RepositoryError(
            f"manifest {where} is unreadable: {err}", hint="run `vmsnap verify`; restore another backup"
        ) from err
    manifest = Manifest.from_json(data, where=where)
    if manifest.vm != vm or manifest.backup_id != backup_id:
        raise RepositoryError(
            f"manifest {where} says {manifest.vm}/{manifest.backup_id}, not {vm}/{backup_id}",
            hint="a backup was renamed or copied by hand; move it back",
        )
    return manifest, data


def read_manifest(path: Path, vm: str, backup_id: str) -> Manifest:
    """Read and check the manifest at ``path``, which must describe backup ``backup_id`` of ``vm``.

    :raise RepositoryError: unreadable, damaged (see :meth:`Manifest.from_json`), or about another backup
        (a directory renamed or copied by hand)
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RepositoryError(
            f"manifest {path} is unreadable: {err}", hint="run `vmsnap verify`; restore another backup"
        ) from err
    manifest, _ = parse_manifest(raw, vm, backup_id, where=path)
    return manifest


@attrs.frozen
class Damaged:
    """A backup directory whose manifest cannot be used, and why."""

    vm: str
    backup_id: str
    error: RepositoryError
