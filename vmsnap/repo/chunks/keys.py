"""The key of an encrypted ``chunks`` repository: one random 256-bit master key in a private key file, and the
subkeys derived from it (chunk ids, chunk encryption, index/manifest authentication, sealed metadata, the
key's fingerprint).

Key file (UTF-8 JSON, mode 0600, never on a command line)::

    {"vmsnap-key": 1, "key": "<base64 of 32 random bytes>"}

Derivation: every subkey is HKDF-SHA256 (RFC 5869) of the master key, no salt, 32 bytes, with ``info``:

    =================  ==============================  ==================================================
    subkey             info                            used for
    =================  ==============================  ==================================================
    ``id_key``         ``vmsnap chunk-id v1``          chunk id = HMAC-SHA256(id_key, plaintext chunk)
    ``blake3_id_key``  ``vmsnap chunk-id blake3 v1``   chunk id = BLAKE3-keyed(blake3_id_key, plaintext
                                                       chunk), in a repository whose chunk id is blake3
    ``encryption_key`` ``vmsnap aes-256-gcm v1``       AES-256-GCM of chunk blobs
    ``mac_key``        ``vmsnap metadata-mac v1``      HMAC-SHA256 over indexes and manifests
    ``name_key`` (64)  ``vmsnap metadata-names v1``    AES-SIV of the names in sealed store keys (64 bytes)
    ``seal_key``       ``vmsnap metadata-seal v1``     AES-256-GCM of sealed metadata objects
    ``key_id`` (16 B)  ``vmsnap key-id v1``            hex fingerprint stored in the repository marker
    =================  ==============================  ==================================================

The key id tells a wrong key from the right one before anything is decrypted; being an HKDF output it reveals
nothing about the other subkeys. Nothing here logs, prints or puts key material in a message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vmsnap.errors import KeyFileError

KEY_FILE_VERSION = 1
MASTER_KEY_SIZE = 32
KEY_ID_SIZE = 16
_CHMOD_HINT = "make it private with `chmod 600 {path}` (and owned by the user running vmsnap)"


def _derive(master: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


@attrs.frozen(repr=False)
class RepositoryKey:
    """The master key of an encrypted repository and its derived subkeys (see the module docstring).

    Build it with :func:`read_key_file`, :func:`create_key_file` or :meth:`from_master`; its repr shows only
    the key id.

    :param id_key: HMAC-SHA256 key for chunk ids
    :param encryption_key: AES-256-GCM key for chunk blobs
    :param mac_key: HMAC-SHA256 key for indexes and manifests
    :param key_id: hex fingerprint, safe to store in the repository marker
    :param blake3_id_key: BLAKE3 key for chunk ids (a repository whose chunk id hash is blake3)
    :param name_key: AES-SIV key (64 bytes) for the names in sealed keys (:mod:`vmsnap.repo.chunks.sealed`)
    :param seal_key: AES-256-GCM key for the content of sealed metadata
    """

    id_key: bytes
    encryption_key: bytes
    mac_key: bytes
    key_id: str
    blake3_id_key: bytes
    name_key: bytes
    seal_key: bytes

    @classmethod
    def from_master(cls, master: bytes) -> RepositoryKey:
        """Derive every subkey from a 32-byte master key.

        :raise KeyFileError: the master key does not have 32 bytes
        """
        if len(master) != MASTER_KEY_SIZE:
            raise KeyFileError(
                f"the repository key has {len(master)} bytes, not {MASTER_KEY_SIZE}",
                hint="the key file is damaged: use the key file this repository was created with",
            )
        return cls(
            id_key=_derive(master, b"vmsnap chunk-id v1"),
            encryption_key=_derive(master, b"vmsnap aes-256-gcm v1"),
            mac_key=_derive(master, b"vmsnap metadata-mac v1"),
            key_id=_derive(master, b"vmsnap key-id v1", KEY_ID_SIZE).hex(),
            blake3_id_key=_derive(master, b"vmsnap chunk-id blake3 v1"),
            name_key=_derive(master, b"vmsnap metadata-names v1", 64),
            seal_key=_derive(master, b"vmsnap metadata-seal v1"),
        )

    def mac(self, data: bytes | memoryview) -> bytes:
        """HMAC-SHA256 of ``data`` with the metadata key (32 bytes): authenticates indexes and manifests."""
        return hmac.digest(self.mac_key, data, "sha256")

    def check_mac(self, data: bytes | memoryview, tag: bytes | memoryview) -> bool:
        """True when ``tag`` is :meth:`mac` of ``data`` (compared in constant time)."""
        return hmac.compare_digest(self.mac(data), bytes(tag))

    def check_key_id(self, expected: str, *, path: Path | str | None = None) -> None:
        """Check that this key is the one a repository was created with (its marker's key id).

        :param expected: the key id the repository marker records
        :param path: the key file, for the message
        :raise KeyFileError: it is another key
        """
        if not hmac.compare_digest(self.key_id.encode(), expected.encode()):
            where = f" {path}" if path is not None else ""
            raise KeyFileError(
                f"the key file{where} is not this repository's key (key id {self.key_id}, "
                f"the repository expects {expected})",
                hint="pass the key file the repository was created with (--key-file or VMSNAP_KEY_FILE)",
            )

    def __repr__(self) -> str:
        return f"RepositoryKey(key_id={self.key_id!r})"


def generate_master_key() -> bytes:
    """32 bytes from the operating system's CSPRNG (:mod:`secrets`)."""
    return secrets.token_bytes(MASTER_KEY_SIZE)


def create_key_file(path: Path | str) -> RepositoryKey:
    """Create a new key file at ``path`` (0600, fsync'd; never overwrites) with a fresh random master key.

    :param path: where the key file goes; its directory must exist
    :return: the new key
    :raise KeyFileError: ``path`` exists already, or cannot be written
    """
    path = Path(path)
    master = generate_master_key()
    text = json.dumps({"vmsnap-key": KEY_FILE_VERSION, "key": base64.b64encode(master).decode("ascii")})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError as err:
        raise KeyFileError(
            f"key file {path} exists already; not overwriting it",
            hint="choose another path, or use the existing key file with its repository",
        ) from err
    except OSError as err:
        raise KeyFileError(
            f"cannot create key file {path}: {err.strerror or err}",
            hint="check that its directory exists and is writable",
        ) from err
    try:
        os.fchmod(fd, 0o600)  # a umask cannot widen it, but make the mode explicit
        os.write(fd, text.encode("ascii") + b"\n")
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise KeyFileError(
            f"cannot write key file {path}: {err.strerror or err}",
            hint="free space there or choose another path",
        ) from err
    os.close(fd)
    with contextlib.suppress(OSError):  # the directory entry's durability; best effort on odd filesystems
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return RepositoryKey.from_master(master)


def read_key_file(path: Path | str, *, expected_key_id: str | None = None) -> RepositoryKey:
    """Read a key file, refusing one that group or others may read.

    :param path: the key file
    :param expected_key_id: the repository marker's key id; when given, a different key is refused
    :raise KeyFileError: missing, unreadable, not a regular file, readable by others, malformed, or another
        repository's key
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise KeyFileError(
            f"key file {path} does not exist",
            hint="pass the repository's key file with --key-file or VMSNAP_KEY_FILE",
        ) from err
    except OSError as err:
        raise KeyFileError(
            f"cannot open key file {path}: {err.strerror or err}",
            hint="run vmsnap as the key file's owner, or fix its permissions (chmod 600)",
        ) from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file", hint="pass the key file itself")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o})",
                hint=_CHMOD_HINT.format(path=path),
            )
        raw = os.read(fd, 4096)
    except OSError as err:
        raise KeyFileError(f"cannot read key file {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    key = RepositoryKey.from_master(_parse(raw, path))
    if expected_key_id is not None:
        key.check_key_id(expected_key_id, path=path)
    return key


def _parse(raw: bytes, path: Path) -> bytes:
    damaged = KeyFileError(
        f"key file {path} is not a vmsnap key file",
        hint="pass the key file this repository was created with; it is JSON with a 'key' field",
    )
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged from None  # no cause: the decoder's message may quote key material
    if not isinstance(document, dict) or not isinstance(document.get("key"), str):
        raise damaged
    version = document.get("vmsnap-key")
    if version != KEY_FILE_VERSION:
        raise KeyFileError(
            f"key file {path} has version {version!r}; this vmsnap reads version {KEY_FILE_VERSION}",
            hint="use a vmsnap that knows this key file version",
        )
    try:
        return base64.b64decode(document["key"], validate=True)
    except (binascii.Error, ValueError):
        raise damaged from None


def open_key(
    key_id: str | None, key_file: Path | None, location: Path | str
) -> tuple[RepositoryKey | None, KeyFileError | None]:
    """The key of a repository whose marker names ``key_id`` (None: not encrypted), read from ``key_file``
    and checked against it now; without a key file, the error to raise once something must be decrypted
    or authenticated.

    :raise KeyFileError: the key file is not this repository's key, or cannot be read
    """
    if key_id is None:
        return None, None
    if key_file is None:
        return None, KeyFileError(
            f"repository {location} is encrypted and no key file was given",
            hint="pass its key file with --key-file or VMSNAP_KEY_FILE",
        )
    return read_key_file(key_file, expected_key_id=key_id), None
