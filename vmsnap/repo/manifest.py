"""What a repository records about one backup: the manifest, its disks, and backup ids.

``manifest.json`` (one per backup, written last) is the JSON object of :meth:`Manifest.to_json`: format, vm,
backup_id, kind (``full`` | ``incremental``), parent, strategy, transport, created (UTC ISO 8601 with ``Z``),
quiesced, bitmap, digest (``sha256-4MiB-chunks``) and disks[] with name, file (always ``<name>.qcow2``),
virtual_size, bytes_written and sha256. :meth:`Manifest.from_json` refuses another format or digest, names
that could become paths (``/``, ``..``, a leading dot), files other than ``<name>.qcow2`` and an incremental
without a parent. Backup ids are ``YYYYMMDDTHHMMSS.ffffffZ-xxxx`` (UTC, microseconds, random hex suffix):
they sort by time.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.image.digest import ALGORITHM
from vmsnap.model import validate_name

REPO_FORMAT = 1
"""The repository format a manifest records (the marker's ``format`` of the repositories it is in)."""
MANIFEST = "manifest.json"
CHUNKS_SUFFIX = ".chunks"

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
class DiskRecord:
    """One disk of a backup, as the manifest lists it.

    :param name: the disk's name (a valid path component)
    :param file: its image in the backup directory, always ``<name>.qcow2``
    :param virtual_size: guest-visible size in bytes
    :param bytes_written: what the transport (or QEMU) wrote for this backup
    :param sha256: the ``sha256-4MiB-chunks`` digest of the guest-visible content (the whole chain read
        through), hex; equal to the sha256 of the ``<name>.chunks`` file
    """

    name: str
    file: str
    virtual_size: int
    bytes_written: int
    sha256: str

    @property
    def chunks(self) -> str:
        """The file of its chunk digests in the backup directory, ``<name>.chunks``."""
        return f"{self.name}{CHUNKS_SUFFIX}"

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object for this disk."""
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> DiskRecord:
        """Parse one entry of a manifest's ``disks``.

        :raise ValueError: it names a file other than ``<name>.qcow2``
        :raise UsageError: its name is not a valid path component
        :raise KeyError: a field is missing
        """
        name = validate_name(str(data["name"]), "disk name")
        if data["file"] != f"{name}.qcow2":
            raise ValueError(f"disk {name} names file {data['file']!r}, not {name}.qcow2")
        return cls(
            name, data["file"], int(data["virtual_size"]), int(data["bytes_written"]), str(data["sha256"])
        )


@attrs.frozen
class Manifest:
    """Everything recorded about one backup (``manifest.json``)."""

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
    format: int = REPO_FORMAT
    digest: str = ALGORITHM

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``."""
        data = attrs.asdict(self, recurse=False)
        data["disks"] = [d.to_json() for d in self.disks]
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: Path) -> Manifest:
        """Parse and check a manifest read from ``where``.

        :raise RepositoryError: malformed, of another format, or naming files outside its directory
        """
        try:
            _check_versions(data, where)
            disks = tuple(DiskRecord.from_json(d) for d in data["disks"])
            kind = data["kind"]
            if kind not in ("full", "incremental"):
                raise ValueError(f"kind {kind!r}")
            parent = data.get("parent")
            if kind == "incremental" and not parent:
                raise ValueError("an incremental backup without a parent")
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
            )
        except RepositoryError:
            raise
        except (KeyError, TypeError, ValueError, UsageError) as err:
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
        """Bytes written for this backup, all disks."""
        return sum(d.bytes_written for d in self.disks)


def _check_versions(data: Any, where: Path) -> None:
    """Refuse a manifest that is no JSON object, or of a format or digest this vmsnap does not read.

    :raise TypeError: not a JSON object
    :raise RepositoryError: another format or digest
    """
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    if data.get("format") != REPO_FORMAT:
        raise RepositoryError(
            f"{where} has manifest format {data.get('format')!r}; this vmsnap reads {REPO_FORMAT}",
            hint="use the vmsnap version that wrote this repository",
        )
    if data.get("digest") != ALGORITHM:
        raise RepositoryError(
            f"{where} has digest {data.get('digest')!r}; this vmsnap knows {ALGORITHM}",
            hint="use the vmsnap version that wrote this repository",
        )


def read_manifest(path: Path, vm: str, backup_id: str) -> Manifest:
    """Read and check the manifest at ``path``, which must describe backup ``backup_id`` of ``vm``.

    :raise RepositoryError: unreadable, damaged (see :meth:`Manifest.from_json`), or about another backup
        (a directory renamed or copied by hand)
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RepositoryError(
            f"manifest {path} is unreadable: {err}", hint="run `vmsnap verify`; restore another backup"
        ) from err
    manifest = Manifest.from_json(data, where=path)
    if manifest.vm != vm or manifest.backup_id != backup_id:
        raise RepositoryError(
            f"manifest {path} says {manifest.vm}/{manifest.backup_id}, not {vm}/{backup_id}",
            hint="a backup directory was renamed or copied by hand; move it back",
        )
    return manifest


@attrs.frozen
class Damaged:
    """A backup directory whose manifest cannot be used, and why."""

    vm: str
    backup_id: str
    error: RepositoryError
