"""The envelope of an object kept beside a backup (see :meth:`~vmsnap.repo.layout.RepositoryLayout.attach`).

Both layouts store the same plaintext, an envelope that names what it belongs to, so an object copied or moved
from another backup (or stored under another name) is refused when read::

    vmsnap-attachment/1\\n
    {"backup_id": "...", "name": "...", "vm": "..."}\\n      (canonical JSON: sorted keys, no spaces)
    <the object's bytes>

Objects written before the backup is sealed (its machine state) are named with their sha256 in the manifest
(``objects``): :func:`check_unsealed` refuses to replace one, :func:`check_sealed` checks one read back. In an
encrypted repository the manifest is authenticated, so such an object is as trustworthy as the manifest.

How the envelope is protected is the layout's business: the ``chunks`` layout stores it as a chunk blob
preceded by its id (sha256, or the keyed id and AES-GCM in an encrypted repository), the ``qcow2`` layout as
a file whose first line is the envelope's sha256.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from vmsnap.errors import RepositoryError, UsageError
from vmsnap.model import validate_name

if TYPE_CHECKING:
    from vmsnap.repo.manifest import Manifest

MAGIC = b"vmsnap-attachment/1\n"
MAX_SIZE = 4 * 1024 * 1024 - 4096


def check(name: str, data: bytes) -> None:
    """:raise UsageError: ``name`` is no valid object name, or ``data`` is too large to keep."""
    validate_name(name, "attachment name")
    if len(data) > MAX_SIZE:
        raise UsageError(
            f"object {name} of {len(data)} bytes is too large to keep beside a backup",
            hint=f"at most {MAX_SIZE} bytes",
        )


def _header(vm: str, backup_id: str, name: str) -> bytes:
    fields = {"backup_id": backup_id, "name": name, "vm": vm}
    return MAGIC + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def seal(vm: str, backup_id: str, name: str, data: bytes) -> bytes:
    """The envelope of ``data`` kept as object ``name`` of backup ``vm/backup_id``.

    :raise UsageError: see :func:`check`
    """
    check(name, data)
    return _header(vm, backup_id, name) + data


def unseal(envelope: bytes, vm: str, backup_id: str, name: str, *, where: str) -> bytes:
    """The object in ``envelope``, after checking that it was kept as ``name`` of ``vm/backup_id``.

    :raise RepositoryError: it is no envelope, or one of another backup or name
    """
    header = _header(vm, backup_id, name)
    if not envelope.startswith(MAGIC):
        raise RepositoryError(f"{where} is not an object vmsnap kept beside a backup", hint="remove it")
    if not envelope.startswith(header):
        raise RepositoryError(
            f"{where} was kept for another backup or under another name",
            hint="it was moved or copied there: remove it",
        )
    return envelope[len(header) :]


def digest(data: bytes) -> str:
    """The sha256 (hex) a manifest records of an object sealed with its backup."""
    return hashlib.sha256(data).hexdigest()


def check_unsealed(manifest: Manifest, name: str) -> None:
    """:raise UsageError: ``name`` was sealed with the backup by its manifest (it cannot be replaced)."""
    if name in manifest.objects:
        raise UsageError(
            f"object {name} was sealed with backup {manifest.vm}/{manifest.backup_id}; it cannot be replaced",
            hint="objects written after a backup (boot results, verify records) take other names",
        )


def check_sealed(manifest: Manifest, name: str, data: bytes, *, where: str) -> bytes:
    """``data`` read back as object ``name``, after checking it against the sha256 the manifest sealed (when
    the manifest seals objects: then ``name`` must be one of them).

    :raise RepositoryError: the manifest does not name it, or its bytes differ
    """
    if not manifest.objects:
        return data
    expected = manifest.objects.get(name)
    if expected is None:
        raise RepositoryError(
            f"{where} was not sealed with backup {manifest.vm}/{manifest.backup_id}", hint="remove it"
        )
    if digest(data) != expected:
        raise RepositoryError(
            f"{where} is not the object sealed with backup {manifest.vm}/{manifest.backup_id}: "
            "its sha256 differs",
            hint="it was replaced or damaged: restore or boot from another backup",
        )
    return data
