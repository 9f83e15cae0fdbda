"""Stores: where a repository's bytes live. A path is a :class:`~vmsnap.repo.stores.local.LocalStore`, an
``s3://BUCKET/PREFIX`` URL an :class:`~vmsnap.repo.stores.s3.S3Store` (boto3, imported only then)."""

from __future__ import annotations

from pathlib import Path

from vmsnap.repo.stores.base import Store, StoredObject, check_key, check_prefix

__all__ = ["Store", "StoredObject", "check_key", "check_prefix", "is_url", "normalize_location", "open_store"]


def normalize_location(location: str | Path) -> str | Path:
    """``location`` as a store location: an ``s3://`` URL that went through :class:`~pathlib.Path` (which
    makes it ``s3:/bucket/prefix``, e.g. an argparse option of ``type=Path``) is an URL again; anything else
    is returned as it is."""
    text = str(location)
    if text.startswith("s3:/") and not text.startswith("s3://"):
        return "s3://" + text.removeprefix("s3:/")
    return location


def is_url(location: str | Path) -> bool:
    """True when ``location`` names an object store (``s3://…``) rather than a directory."""
    return str(normalize_location(location)).startswith("s3://")


def open_store(location: str | Path, *, create: bool = False) -> Store:
    """The store at ``location``: a directory path or an ``s3://BUCKET/PREFIX`` URL.

    :param create: make a missing local directory (0700); an S3 bucket must exist already
    :raise UsageError: an unknown URL scheme
    :raise StoreError: the store cannot be reached
    """
    text = str(normalize_location(location))
    if text.startswith("s3://"):
        from vmsnap.repo.stores.s3 import S3Store

        return S3Store.from_url(text)
    if "://" in text:
        from vmsnap.errors import UsageError

        raise UsageError(
            f"unknown repository URL {text!r}", hint="use a directory path or s3://BUCKET/PREFIX"
        )
    from vmsnap.repo.stores.local import LocalStore

    return LocalStore(Path(text), create=create)
