"""Opening a repository in a store that keeps object versions (an S3 bucket with versioning; a locked
repository's always does): reading it as it was at an earlier time, telling a deleted or overwritten
repository from a new, empty place, and checking that a bucket can hold a locked repository.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from vmsnap.errors import RepositoryError, StoreError, UsageError, VmsnapError
from vmsnap.repo.marker import MARKER
from vmsnap.repo.stores.base import Store
from vmsnap.repo.stores.history import AsOfStore, before, check_past, format_time, key_history


def as_of_view(store: Store, moment: dt.datetime) -> AsOfStore:
    """``store`` as it was at ``moment``.

    :raise UsageError: ``moment`` in the future, or a store that keeps no versions
    :raise RepositoryError: a bucket without versioning (nothing to read)
    """
    check_past(moment)
    if not store.capabilities.versions:
        raise UsageError(
            f"{store.url} keeps no earlier versions: --as-of needs an object store with versioning",
            hint="leave --as-of out",
        )
    if not store.locking().versioning:
        raise RepositoryError(
            f"{store.url} keeps no earlier versions (the bucket's versioning is off): nothing can be read "
            f"as it was at {format_time(moment)}",
            hint="leave --as-of out; a locked repository's bucket has versioning (Object Lock turns it on)",
        )
    return AsOfStore(store, moment)


def check_lockable(store: Store) -> None:
    """Make sure ``store`` can hold a locked repository (two requests on S3).

    :raise UsageError: the store cannot lock objects at all
    :raise RepositoryError: the bucket lacks Object Lock or versioning, or has a default retention rule
    """
    if not store.capabilities.retention_locks:
        raise UsageError(
            f"{store.url} cannot lock objects", hint="use an S3 bucket with Object Lock: --repo s3://BUCKET/…"
        )
    locking = store.locking()
    missing = [
        what
        for what, there in (
            ("Object Lock is not enabled", locking.object_lock),
            ("versioning is off", locking.versioning),
        )
        if not there
    ]
    if missing:
        raise RepositoryError(
            f"{store.url} cannot hold a locked repository: {' and '.join(missing)} on its bucket",
            hint="create a bucket with Object Lock (aws s3api create-bucket --object-lock-enabled-for-bucket "
            "…; it turns versioning on) and use that; vmsnap never creates buckets",
        )
    if locking.default_retention is not None:
        raise RepositoryError(
            f"{store.url}: the bucket has a default retention ({locking.default_retention}); vmsnap locks "
            "each object itself and keeps its leases unlocked",
            hint="remove the rule (aws s3api put-object-lock-configuration --object-lock-configuration "
            "ObjectLockEnabled=Enabled), or use a bucket without one",
        )


def never_deleted(store: Store, location: Path | str, view: AsOfStore | None) -> None:
    """No marker here: make sure none was deleted (one listing of its versions where the store keeps them;
    an emptied repository must not be taken for a new, empty place).

    :raise RepositoryError: the marker was deleted (when is said), or a read as of a time before it existed
    """
    if view is not None:
        first = view.first_written(MARKER)
        moment = format_time(view.moment)
        if first is not None and first > view.moment:
            raise RepositoryError(
                f"the repository at {location} did not exist yet at {moment}: it was made at "
                f"{format_time(first)}",
                hint="give a later --as-of",
            )
        if first is not None:
            raise RepositoryError(
                f"the repository at {location} had been deleted by {moment}",
                hint="give an earlier --as-of",
            )
        return
    if not store.capabilities.versions:
        return
    try:
        history = key_history(store, MARKER)
    except StoreError:  # no s3:ListBucketVersions: nothing to tell (a bucket without versions needs none)
        return
    deleted = history.deleted_at
    if deleted is not None:
        raise RepositoryError(
            f"the repository at {location} was deleted at {format_time(deleted)} (its {MARKER} has a delete "
            "marker; its other objects may be deleted or overwritten too)",
            hint=f"read it as it was with --as-of {before(deleted)} (list, verify, restore, mount), or "
            "rescue it with `vmsnap copy --as-of … --from … --to s3://NEW-BUCKET/…`",
        )


def overwritten(store: Store, location: Path | str, err: RepositoryError) -> RepositoryError:
    """``err`` about a damaged marker, saying when it was overwritten where the store keeps versions."""
    if not store.capabilities.writable or not store.capabilities.versions:
        return err
    try:
        when = key_history(store, MARKER).overwritten_at
    except VmsnapError:
        return err
    if when is None:
        return err
    return RepositoryError(
        f"{location}/{MARKER} was overwritten at {format_time(when)}: {err.message}",
        hint=f"read the repository as it was with --as-of {before(when)}",
    )
