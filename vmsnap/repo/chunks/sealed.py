r"""Sealed metadata: how an encrypted ``chunks`` repository of marker format 4 hides its names and metadata.

The layout's code names its objects in plain keys (``vms/<vm>/<backup-id>/manifest.json``,
``locks/writers/<vm>/<seq>``, … see :mod:`vmsnap.repo.chunks.records` and :mod:`vmsnap.repo.chunks.leases`);
:class:`SealedStore` stands between that code and the store and turns every such key and object into one
that says nothing without the key. What passes through unchanged:

    vmsnap-repo.json                the marker (read before the repository opens)
    chunks/…                        chunk blobs: named by keyed ids, encrypted (vmsnap.repo.chunks.blob)
    gc-generation                   random tokens (vmsnap.repo.chunks.known)
    known-chunks-epoch

**Keys.** Every other key — backups (``vms/``), leases (``locks/``), the records of chunks verify moved
aside (``quarantine/``) and whatever a later vmsnap adds — is sealed part by part. Its first part, when it is
``vms``, ``locks`` or ``quarantine``, becomes ``v``, ``l`` or ``q`` (a constant says nothing); every other
part ``p`` whose plain parent is ``P`` (the parts before it joined with '/', with a trailing '/') becomes::

    base64url(AES-SIV(name_key, ad = ["vmsnap name v1", P], len(p) || p || zero bytes to 144)), no padding

214 characters whatever the name: AES-SIV (RFC 5297, 512-bit key: ``name_key`` of
:mod:`vmsnap.repo.chunks.keys`) is deterministic, so a plain key always has the same sealed key (``get``,
``put(if_absent)`` and prefix listings work as on plain keys), and authenticated, so a listed key that was not
made with this key, or was moved under another parent, does not decrypt and is not listed. Names are at most
128 characters (:func:`vmsnap.model.validate_name`); a part is at most 143 bytes. A listing of a plain prefix
lists the sealed prefix of its directory and decrypts what it finds: ``list("vms/<vm>/")`` lists one VM.

**Objects.** The bytes stored under a sealed key (all integers big-endian)::

    offset  size  field
    0       4     magic  b"VMSM"
    4       1     version  1
    5       3     reserved, 0
    8       12    nonce (random)
    20      …     AES-256-GCM(seal_key, nonce, length (8 bytes) || object || zero bytes,
                              associated data = bytes 0-7 || the plain key, UTF-8) || tag (16 bytes)

The whole object is padded to :func:`size_class` of its length: 4 KiB, or the next power of two above it, so
a manifest, a lease or a small disk's index all have the same size, and a larger index says its disk's size
only to within a factor of two. The plain key is authenticated with the object: an object copied or moved
under another key (another backup's manifest, another disk's index, an attachment of another backup) fails
its check, as does a truncated or altered one: :class:`~vmsnap.errors.ChecksumMismatchError`, one line
naming the plain key.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from vmsnap.errors import ChecksumMismatchError, StoreError, UsageError
from vmsnap.repo.chunks.keys import RepositoryKey
from vmsnap.repo.marker import MARKER
from vmsnap.repo.stores.base import Data, Retention, Store, StoreBase, StoreCapabilities, StoredObject

PLAIN_PREFIXES = ("chunks/",)
"""Keys under these prefixes pass through unchanged (see the module docstring)."""
PLAIN_KEYS = frozenset({MARKER, "gc-generation", "known-chunks-epoch"})
TOP_ALIASES = {"vms": "v", "locks": "l", "quarantine": "q"}
"""First key parts stored as a constant letter (every other first part is sealed like the rest)."""
NAME_PAD = 144
"""Bytes every sealed name part is padded to (a length byte, the name, zero bytes)."""
SEALED_PART = len(base64.urlsafe_b64encode(bytes(16 + NAME_PAD)).rstrip(b"="))
MAGIC = b"VMSM"
VERSION = 1
HEADER = struct.Struct(">4sB3x")
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = HEADER.size + NONCE_SIZE + 8 + TAG_SIZE
MIN_SIZE = 4096
_NAME_AD = b"vmsnap name v1"
_ALIASES_BACK = {alias: top for top, alias in TOP_ALIASES.items()}
_CACHE_LIMIT = 1 << 16
_HINT = "run `vmsnap verify`; restore another backup (nothing of the object was used)"


def size_class(length: int) -> int:
    """The stored size of an object of ``length`` bytes (object, header, length, nonce and tag):
    :data:`MIN_SIZE`, or the next power of two."""
    needed = length + OVERHEAD
    return MIN_SIZE if needed <= MIN_SIZE else 1 << (needed - 1).bit_length()


def is_plain(key: str) -> bool:
    """True when ``key`` (a plain key or prefix) passes through unchanged."""
    return key in PLAIN_KEYS or key.startswith(PLAIN_PREFIXES)


class SealedStore(StoreBase):
    """A :class:`~vmsnap.repo.stores.base.Store` that seals keys and objects into ``store`` (see the module
    docstring); what it lists and returns is plain. It keeps no versions and no locks of its own: a sealed
    repository is never a locked one, and ``--as-of`` does not read it (the versions' keys are sealed).

    :param store: the repository's store
    :param key: returns the repository key when first needed (raising
        :class:`~vmsnap.errors.KeyFileError` when there is none)
    """

    def __init__(self, store: Store, key: Callable[[], RepositoryKey | None]) -> None:
        self._store = store
        self._key = key
        self._siv: AESSIV | None = None
        self._gcm: AESGCM | None = None
        self._sealed: dict[tuple[str, str], str | None] = {}
        self._opened: dict[tuple[str, str], str | None] = {}
        self._lock = threading.Lock()

    # -- the Store protocol --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._store.url

    @property
    def capabilities(self) -> StoreCapabilities:  # type: ignore[override]
        return attrs.evolve(self._store.capabilities, versions=False, retention_locks=False)

    @property
    def inner(self) -> Store:
        """The store underneath (what an observer sees)."""
        return self._store

    def get(self, key: str) -> bytes:
        if is_plain(key):
            return self._store.get(key)
        return self.open_object(key, self._store.get(self.seal_key(key)))

    def get_into(self, key: str, buffer: memoryview) -> int:
        if is_plain(key):  # a chunk blob: read as the store reads it (no copy where it can)
            return self._store.get_into(key, buffer)
        data = self.get(key)
        if len(data) > len(buffer):
            raise StoreError(f"store {self.url}: object {key} has {len(data)} bytes, more than expected")
        buffer[: len(data)] = data
        return len(data)

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        if retention is not None:
            raise UsageError("a sealed repository locks nothing", hint="a bug in the caller")
        if is_plain(key):
            return self._store.put(key, data, if_absent=if_absent, durable=durable)
        sealed = self.seal_object(key, data)
        return self._store.put(self.seal_key(key), sealed, if_absent=if_absent, durable=durable)

    def sync(self) -> None:
        self._store.sync()

    def exists(self, key: str) -> bool:
        return self._store.exists(key if is_plain(key) else self.seal_key(key))

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        if is_plain(prefix) and prefix:
            yield from self._store.list(prefix)
            return
        directory = prefix[: prefix.rfind("/") + 1]
        if not directory:  # a part of a first key part: everything, filtered
            for stored in self._store.list(""):
                plain = self.open_key(stored.key)
                if plain is not None and plain.startswith(prefix):
                    yield StoredObject(key=plain, size=stored.size)
            return
        sealed_directory = self.seal_key(directory[:-1]) + "/"
        for stored in self._store.list(sealed_directory):
            plain = self._open_below(directory, stored.key[len(sealed_directory) :])
            if plain is not None and plain.startswith(prefix):
                yield StoredObject(key=plain, size=stored.size)

    def delete(self, key: str) -> None:
        self._store.delete(key if is_plain(key) else self.seal_key(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        self._store.delete_many([key if is_plain(key) else self.seal_key(key) for key in keys])

    def check_conditional_writes(self) -> None:
        self._store.check_conditional_writes()

    def close(self) -> None:
        self._store.close()

    # -- keys ----------------------------------------------------------------------------------------

    def _ciphers(self) -> tuple[AESSIV, AESGCM]:
        if self._siv is None or self._gcm is None:
            key = self._key()
            if key is None:
                raise UsageError("a sealed store without a key", hint="a bug: the repository is encrypted")
            self._siv, self._gcm = AESSIV(key.name_key), AESGCM(key.seal_key)
        return self._siv, self._gcm

    def _seal_part(self, parent: str, part: str) -> str:
        found = self._sealed.get((parent, part))
        if found is not None:
            return found
        raw = part.encode("utf-8")
        if not raw or len(raw) >= NAME_PAD:
            raise UsageError(f"the key part {part!r} is too long to seal", hint="a bug: names are validated")
        padded = bytes([len(raw)]) + raw + bytes(NAME_PAD - 1 - len(raw))
        siv, _ = self._ciphers()
        sealed = base64.urlsafe_b64encode(siv.encrypt(padded, [_NAME_AD, parent.encode("utf-8")]))
        found = sealed.rstrip(b"=").decode("ascii")
        self._remember(self._sealed, (parent, part), found)
        return found

    def _open_part(self, parent: str, sealed: str) -> str | None:
        if (parent, sealed) in self._opened:
            return self._opened[(parent, sealed)]
        found: str | None = None
        if len(sealed) == SEALED_PART:
            try:
                raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
                siv, _ = self._ciphers()
                padded = siv.decrypt(raw, [_NAME_AD, parent.encode("utf-8")])
                length = padded[0]
                if 0 < length < NAME_PAD and not any(padded[1 + length :]):
                    found = padded[1 : 1 + length].decode("utf-8")
            except (binascii.Error, ValueError, InvalidTag, UnicodeDecodeError):
                found = None
        self._remember(self._opened, (parent, sealed), found)
        return found

    def _remember(
        self, cache: dict[tuple[str, str], str | None], key: tuple[str, str], value: str | None
    ) -> None:
        with self._lock:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[key] = value

    def seal_key(self, key: str) -> str:
        """The sealed store key of the plain key ``key`` (see the module docstring)."""
        parts = key.split("/")
        first = parts[0]
        out = [TOP_ALIASES.get(first) or self._seal_part("", first)]
        parent = first + "/"
        for part in parts[1:]:
            out.append(self._seal_part(parent, part))
            parent += part + "/"
        return "/".join(out)

    def open_key(self, stored: str) -> str | None:
        """The plain key of a stored key: itself when it passes through, None when it is not one this key
        sealed (another key's, or foreign)."""
        if is_plain(stored):
            return stored
        first, _, rest = stored.partition("/")
        top = _ALIASES_BACK.get(first) or self._open_part("", first)
        if top is None:
            return None
        return top if not rest else self._open_below(top + "/", rest)

    def _open_below(self, parent: str, rest: str) -> str | None:
        plain = parent
        for part in rest.split("/"):
            opened = self._open_part(plain, part)
            if opened is None:
                return None
            plain += opened + "/"
        return plain[:-1]

    # -- objects -------------------------------------------------------------------------------------

    def seal_object(self, key: str, data: Data) -> bytes:
        """The stored bytes of ``data`` under the plain key ``key``."""
        _, gcm = self._ciphers()
        header = HEADER.pack(MAGIC, VERSION)
        nonce = secrets.token_bytes(NONCE_SIZE)
        padding = size_class(len(data)) - len(data) - OVERHEAD
        body = struct.pack(">Q", len(data)) + bytes(data) + bytes(padding)
        return header + nonce + gcm.encrypt(nonce, body, header + key.encode("utf-8"))

    def open_object(self, key: str, raw: bytes) -> bytes:
        """The object stored as ``raw`` under the plain key ``key``, after its check.

        :raise ChecksumMismatchError: not sealed with this key for this key: altered, truncated, moved from
            another key, or written with another key
        """
        _, gcm = self._ciphers()
        where = f"{self._store.url}: {key}"
        if len(raw) < OVERHEAD or raw[:4] != MAGIC:
            raise ChecksumMismatchError(
                f"{where} is damaged: not a sealed object ({len(raw)} bytes)", hint=_HINT
            )
        if raw[4] != VERSION:
            raise ChecksumMismatchError(f"{where} is sealed in version {raw[4]}", hint="use a newer vmsnap")
        header = raw[: HEADER.size]
        nonce = raw[HEADER.size : HEADER.size + NONCE_SIZE]
        try:
            body = gcm.decrypt(nonce, raw[HEADER.size + NONCE_SIZE :], header + key.encode("utf-8"))
        except InvalidTag:
            raise ChecksumMismatchError(
                f"{where} fails its authentication check: altered, truncated, moved from another key, or "
                "written with another key",
                hint=_HINT,
            ) from None
        (length,) = struct.unpack_from(">Q", body)
        if length > len(body) - 8:
            raise ChecksumMismatchError(f"{where} is damaged: it claims {length} bytes", hint=_HINT)
        return body[8 : 8 + length]
