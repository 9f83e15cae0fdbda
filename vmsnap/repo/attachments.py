"""The envelope of an object kept beside a backup (see :meth:`~vmsnap.repo.layout.RepositoryLayout.attach`).

Both layouts store the same plaintext, an envelope that names what it belongs to, so an object copied or moved
from another backup (or stored under another name) is refused when read::

    vmsnap-attachment/1\\n
    {"backup_id": "...", "name": "...", "vm": "..."}\\n      (canonical JSON: sorted keys, no spaces)
    <the object's bytes>

How the envelope is protected is the layout's business: the ``chunks`` layout stores it as a chunk blob
preceded by its id (sha256, or the keyed id and AES-GCM in an encrypted repository), the ``qcow2`` layout as
a file whose first line is the envelope's sha256.
"""

from __future__ import annotations

import json

from vmsnap.errors import RepositoryError, UsageError
from vmsnap.model import validate_name

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
