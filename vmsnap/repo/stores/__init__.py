"""Stores: where a repository's bytes live, registered by URL scheme under the ``vmsnap.stores`` entry point
(like strategies): ``s3://BUCKET/PREFIX`` opens the store registered as ``s3``
(:class:`~vmsnap.repo.stores.s3.S3Store`, boto3 imported only then), and a location without a scheme — a
directory path — the one registered as :data:`PATH_SCHEME` (:class:`~vmsnap.repo.stores.local.LocalStore`).
A store from another distribution registered there opens its own URLs; what it does differently is said by
its :attr:`~vmsnap.repo.stores.base.Store.capabilities`."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import cast

from vmsnap.errors import PluginError, UsageError
from vmsnap.registry import STORE_GROUP, load, names
from vmsnap.repo.stores.base import (
    LOCK_MODES,
    BucketLocking,
    LockMode,
    ObjectVersion,
    Retention,
    Store,
    StoreBase,
    StoreCapabilities,
    StoreClass,
    StoredObject,
    check_key,
    check_prefix,
)

__all__ = [
    "LOCK_MODES",
    "PATH_SCHEME",
    "BucketLocking",
    "LockMode",
    "ObjectVersion",
    "Retention",
    "Store",
    "StoreBase",
    "StoreCapabilities",
    "StoreClass",
    "StoredObject",
    "check_key",
    "check_prefix",
    "is_url",
    "known_url",
    "normalize_location",
    "open_store",
    "scheme_of",
    "store_class",
    "store_schemes",
    "url_forms",
    "url_schemes",
]

PATH_SCHEME = "directory"
"""The scheme a location without one (a directory path) is opened with."""

_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://")
_MANGLED = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*):/(?!/)")
_REQUIRED = ("scheme", "open_location", "capabilities")


def store_schemes() -> list[str]:
    """The registered store schemes, sorted."""
    return names(STORE_GROUP)


def store_class(scheme: str) -> type[StoreClass]:
    """The store class registered for ``scheme``.

    :raise PluginError: unknown scheme (with close matches), the module failed to import (the package it
        needs is named), or the class lacks part of :class:`~vmsnap.repo.stores.base.StoreClass`
    """
    cls = load(STORE_GROUP, scheme)
    missing = [attr for attr in _REQUIRED if not hasattr(cls, attr)]
    if missing:
        raise PluginError(
            f"store {scheme!r} ({cls!r}) lacks {', '.join(missing)}",
            hint="its package must implement vmsnap.repo.stores.base.Store (StoreBase has defaults)",
        )
    return cast(type[StoreClass], cls)


def normalize_location(location: str | Path) -> str | Path:
    """``location`` as a store location: a URL of a registered scheme that went through
    :class:`~pathlib.Path` (which makes ``s3://bucket/prefix`` ``s3:/bucket/prefix``, e.g. an argparse
    option of ``type=Path``) is a URL again; anything else is returned as it is."""
    text = str(location)
    found = _MANGLED.match(text)
    if (
        found is not None
        and found.group("scheme") != PATH_SCHEME
        and found.group("scheme") in store_schemes()
    ):
        return f"{found.group('scheme')}://" + text[found.end() :]
    return location


def scheme_of(location: str | Path) -> str:
    """The scheme of ``location``: its URL's, or :data:`PATH_SCHEME` for a path."""
    found = _URL.match(str(normalize_location(location)))
    return found.group("scheme") if found is not None else PATH_SCHEME


def is_url(location: str | Path) -> bool:
    """True when ``location`` is a URL (``scheme://…``: an object store) rather than a directory path."""
    return _URL.match(str(normalize_location(location))) is not None


def open_store(location: str | Path, *, create: bool = False) -> Store:
    """The store at ``location``: a directory path or a URL of a registered scheme (``s3://BUCKET/PREFIX``).

    :param create: make a missing local directory (0700); an S3 bucket must exist already
    :raise UsageError: an unknown URL scheme (a directory is written as a path, not a ``file://`` URL)
    :raise PluginError: the store's package is missing (it is named)
    :raise StoreError: the store cannot be reached
    """
    text = str(normalize_location(location))
    scheme = scheme_of(text)
    if is_url(text) and not known_url(text):
        close = difflib.get_close_matches(scheme, url_schemes(), n=1)
        guess = f"did you mean {close[0]}://? " if close else ""
        raise UsageError(
            f"unknown repository URL {text!r}", hint=f"{guess}use a directory path or {url_forms()}"
        )
    return store_class(scheme).open_location(text, create=create)


def url_schemes() -> list[str]:
    """The registered schemes a URL may have (every one but :data:`PATH_SCHEME`), sorted."""
    return [s for s in store_schemes() if s != PATH_SCHEME]


def url_forms() -> str:
    """The URLs a repository may have, for hints: ``s3://…``."""
    return " or ".join(f"{s}://…" for s in url_schemes()) or "no URL (no object store is installed)"


def known_url(location: str | Path) -> bool:
    """True when ``location`` is a URL of a registered store scheme with something after ``://``."""
    text = str(normalize_location(location))
    found = _URL.match(text)
    return found is not None and found.group("scheme") in url_schemes() and len(text) > found.end()
