r"""Where a ``chunks`` repository keeps each backup in its store, and how its manifests are authenticated.

Store keys (``<vm>``, ``<backup-id>`` and ``<disk>`` are validated names)::

    vmsnap-repo.json                        the marker (see vmsnap.repo.marker)
    chunks/<id[0:4]>/<id>                   one chunk blob (see vmsnap.repo.chunks.blob)
    vms/<vm>/<backup-id>/<disk>.index       one disk's index (see vmsnap.repo.chunks.index)
    vms/<vm>/<backup-id>/domain.xml         the machine's definition, as a chunk blob (encrypted with the
                                            repository), when the machine has one
    vms/<vm>/<backup-id>/writer.json        written first by the backup's writer (its lease token, host
                                            and pid), removed once it sealed: gc fences the directory
    vms/<vm>/<backup-id>/manifest.json      written last, put(if_absent): the backup exists once it does —
                                            or a tombstone (see below) that gc put there first
    vms/<vm>/<backup-id>/attached.<name>    an object kept beside the backup (vmsnap.repo.attachments):
                                            its 32-byte id, then its envelope as a chunk blob; before the
                                            manifest (machine state) or after it (proof), never rewriting it
    vms/<vm>/needs-full                     the next backup of the VM must be full (JSON: reason, since)
    locks/…                                 leases (see vmsnap.repo.chunks.leases)
    gc-generation                           replaced by every gc before it deletes (vmsnap.repo.chunks.known)

A backup directory without ``manifest.json`` is a run that died (or is running: it holds the VM's writer
lease); ``recover`` and ``gc`` remove those of dead runs. gc first puts a **tombstone** at the manifest's key
with ``put(if_absent)`` (a small JSON object ``{"vmsnap": "abandoned backup", "why": …, "at": …}``), so that
a writer stopped past its lease can never seal the backup afterwards; the tombstone stays (the backup id is
never used again) and is no backup: reading it raises :class:`~vmsnap.errors.NotFoundError`.

The manifest is the format-2 JSON of :mod:`vmsnap.repo.manifest`. In an encrypted repository it also holds
``"mac"``: the hex HMAC-SHA256 (the key's metadata subkey) of the canonical JSON of every other field
(``json.dumps(obj, sort_keys=True, separators=(",", ":"))``, UTF-8); a manifest without a valid MAC is
refused there, and one with a MAC is refused in an unencrypted repository. Each disk's ``sha256`` is that of
its index's bytes, so the manifest covers the indexes and they cover the chunks: nothing stored is trusted
before it is checked.
"""

from __future__ import annotations

import binascii
import json
from typing import Any

from vmsnap.errors import ChecksumMismatchError, NotFoundError, RepositoryError
from vmsnap.model import validate_name
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.manifest import INDEX_SUFFIX, MANIFEST, Manifest, parse_manifest, utc_now_iso
from vmsnap.repo.stores.base import Store

VMS = "vms/"
NEEDS_FULL = "needs-full"
DEFINITION = "domain.xml"
WRITER = "writer.json"
TOMBSTONE = "abandoned backup"
_DAMAGED_HINT = "run `vmsnap verify`; restore another backup"


def vm_prefix(vm: str) -> str:
    """``vms/<vm>/``."""
    return f"{VMS}{validate_name(vm, 'VM name')}/"


def backup_prefix(vm: str, backup_id: str) -> str:
    """``vms/<vm>/<backup-id>/``."""
    return f"{vm_prefix(vm)}{validate_name(backup_id, 'backup id')}/"


def manifest_key(vm: str, backup_id: str) -> str:
    return backup_prefix(vm, backup_id) + MANIFEST


def index_key(vm: str, backup_id: str, disk: str) -> str:
    return backup_prefix(vm, backup_id) + validate_name(disk, "disk name") + INDEX_SUFFIX


def definition_key(vm: str, backup_id: str) -> str:
    return backup_prefix(vm, backup_id) + DEFINITION


ATTACHED = "attached."


def attachment_key(vm: str, backup_id: str, name: str) -> str:
    return backup_prefix(vm, backup_id) + ATTACHED + validate_name(name, "attachment name")


def needs_full_key(vm: str) -> str:
    return vm_prefix(vm) + NEEDS_FULL


def needs_full_reason(store: Store, vm: str) -> str | None:
    """Why the next backup of ``vm`` must be full (the object at :func:`needs_full_key`), else None."""
    try:
        return str(json.loads(store.get(needs_full_key(vm))).get("reason", "a dead run"))
    except NotFoundError:
        return None
    except (ChecksumMismatchError, ValueError, AttributeError):
        return "the marker object is damaged"


def writer_marker_key(vm: str, backup_id: str) -> str:
    """``vms/<vm>/<backup-id>/writer.json``: the backup's writer is at work (see the module docstring)."""
    return backup_prefix(vm, backup_id) + WRITER


def encode_tombstone(why: str) -> bytes:
    """The tombstone gc puts at the manifest key of a backup it fenced."""
    data = {"vmsnap": TOMBSTONE, "why": why, "at": utc_now_iso()}
    return (json.dumps(data, sort_keys=True) + "\n").encode()


def is_tombstone(raw: bytes) -> bool:
    """True when ``raw`` (what a manifest key holds) is a tombstone, not a manifest."""
    if len(raw) > 4096 or TOMBSTONE.encode() not in raw:
        return False
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("vmsnap") == TOMBSTONE


def tombstone_reason(raw: bytes) -> str:
    """Why a tombstone was put (see :func:`is_tombstone`)."""
    try:
        return str(json.loads(raw).get("why", "abandoned"))
    except (UnicodeDecodeError, ValueError, AttributeError):
        return "abandoned"


def split_backup_key(key: str) -> tuple[str, str, str] | None:
    """(vm, backup id, name) of a key inside a backup directory, or None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "vms" or not parts[2][:1].isdigit():
        return None
    return parts[1], parts[2], parts[3]


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in data.items() if k != "mac"}, sort_keys=True, separators=(",", ":")
    ).encode()


def encode_manifest(manifest: Manifest, key: RepositoryKey | None) -> bytes:
    """The bytes of ``manifest.json`` (with its MAC in an encrypted repository)."""
    data = manifest.to_json()
    if key is not None:
        data["mac"] = key.mac(_canonical(data)).hex()
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def decode_manifest(
    raw: bytes, vm: str, backup_id: str, key: RepositoryKey | None, *, where: str
) -> Manifest:
    """The manifest in ``raw``, after checking it is about ``vm``/``backup_id`` and (encrypted) its MAC.

    :raise RepositoryError: damaged, foreign, of another layout, or not authenticated where it must be
    :raise ChecksumMismatchError: its MAC does not match (altered, or another key)
    """
    manifest, data = parse_manifest(raw, vm, backup_id, where=where)
    if manifest.layout != "chunks":
        raise RepositoryError(f"manifest {where} is not of the chunks layout", hint=_DAMAGED_HINT)
    mac = data.get("mac")
    if key is None:
        if mac is not None:
            raise RepositoryError(
                f"manifest {where} is authenticated, but this repository is not encrypted",
                hint="the repository marker or the backup was altered; " + _DAMAGED_HINT,
            )
        return manifest
    try:
        tag = binascii.unhexlify(mac) if isinstance(mac, str) else b""
    except (binascii.Error, ValueError):
        tag = b""
    if not tag or not key.check_mac(_canonical(data), tag):
        raise ChecksumMismatchError(
            f"manifest {where} fails its authentication check: altered, or written with another key",
            hint=_DAMAGED_HINT,
        )
    return manifest
