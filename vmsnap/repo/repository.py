"""Opening and creating repositories: a directory path or an ``s3://BUCKET/PREFIX`` URL, its marker
(:mod:`vmsnap.repo.marker`) saying which layout it has. What :meth:`Repository.open` returns is a
:class:`~vmsnap.repo.layout.RepositoryLayout` — the one interface the orchestrator and the CLI use.

- A directory with ``vmsnap-repo.json`` ``{"format": 1}`` (vmsnap 0.1) opens as layout ``qcow2``.
- ``open(…, create=True)`` (what ``backup`` does) makes a new or empty directory (or an empty S3 prefix) a
  repository: layout ``chunks``, unencrypted, zstd, unless ``layout`` says otherwise.
- :meth:`Repository.init` (``vmsnap init``) makes one with every choice, an encrypted one included; it
  creates the key file (0600) when the one named is missing, and refuses an existing repository.

Keys: the key file is ``key_file``, else ``$VMSNAP_KEY_FILE``; a wrong key is refused when the repository is
opened, a missing one when something must be decrypted or authenticated (``recover`` needs none).

Locks: ``init(…, lock=LockPolicy)`` makes a locked repository (S3 Object Lock) in a bucket that has Object
Lock and versioning and no default retention rule (checked first, one line naming what is missing); its
marker records the policy and is itself locked. ``open(…, as_of=TIME)`` — or a location
``s3://BUCKET/PREFIX?as-of=TIME`` — reads the repository as it was at TIME from the bucket's object versions
(:mod:`vmsnap.repo.stores.history`), read-only. Opening a repository whose marker was deleted or overwritten
says so, and when, in one line (instead of "no repository here"), so the damage of an attack is seen at once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from vmsnap.errors import NotFoundError, RepositoryError, StoreError, UsageError, VmsnapError
from vmsnap.files import make_private_dir
from vmsnap.repo.chunks.keys import RepositoryKey, create_key_file, read_key_file
from vmsnap.repo.layout import DEFINITION_FILE, BackupWriter, RepositoryLayout, layout_class, layout_names
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.manifest import Damaged, DiskRecord, Kind, Manifest, utc_now_iso
from vmsnap.repo.marker import DEFAULT_LAYOUT, MARKER, RepoMarker
from vmsnap.repo.progress import DiskProgress
from vmsnap.repo.qcow2_layout import DELETING_PREFIX
from vmsnap.repo.reports import LayoutTraits, RestoredDisk
from vmsnap.repo.stores import is_url, normalize_location, open_store
from vmsnap.repo.stores.base import Retention, Store
from vmsnap.repo.stores.history import (
    AsOfStore,
    before,
    check_past,
    format_time,
    key_history,
    split_as_of,
    with_as_of,
)
from vmsnap.repo.stores.retaining import retention_after
from vmsnap.runner import Runner

# the names backup/, cli.py and jobs/ import from here
__all__ = [
    "DEFINITION_FILE",
    "DELETING_PREFIX",
    "KEY_ENV",
    "BackupWriter",
    "Damaged",
    "DiskProgress",
    "DiskRecord",
    "Kind",
    "Manifest",
    "Repository",
    "RepositoryLayout",
    "RestoredDisk",
    "utc_now_iso",
]

KEY_ENV = "VMSNAP_KEY_FILE"


def key_file_path(key_file: Path | str | None) -> Path | None:
    """``key_file``, else ``$VMSNAP_KEY_FILE``, else None."""
    if key_file is not None:
        return Path(key_file)
    value = os.environ.get(KEY_ENV)
    return Path(value) if value else None


class Repository:
    """Opens (:meth:`open`) and creates (:meth:`init`) repositories of either layout; see the module
    docstring. Not instantiated: what it returns is a :class:`~vmsnap.repo.layout.RepositoryLayout`."""

    @classmethod
    def open(
        cls,
        location: Path | str,
        *,
        create: bool = False,
        layout: str | None = None,
        key_file: Path | str | None = None,
        runner: Runner | None = None,
        state_root: Path | None = None,
        lease_seconds: float | None = None,
        as_of: dt.datetime | None = None,
    ) -> RepositoryLayout:
        """Open the repository at ``location``; with ``create``, make one there when it is a new or empty
        directory (or an empty S3 prefix), of ``layout`` (default ``chunks``).

        :param as_of: read the repository as it was then, from the store's object versions (read-only; also
            written into the location as ``LOCATION?as-of=TIME``)
        :raise RepositoryError: no repository there (without ``create``), a non-empty directory that is not
            one, one of another format, or one whose marker was deleted or overwritten (when, is said)
        :raise KeyFileError: an encrypted repository and a key file that is not its key
        :param lease_seconds: lifetime of the leases taken (default ``$VMSNAP_LEASE_SECONDS``, else 120)
        :raise UsageError: ``as_of`` in the future, on a store without versions, or with ``create``
        :raise StoreError: the store cannot be reached
        """
        if as_of is not None:
            location = with_as_of(str(normalize_location(location)), as_of)
        store, directory, view = _store(location, create=create)
        if create and view is not None:
            raise UsageError("a repository read --as-of a time cannot be written", hint="leave --as-of out")
        marker = _read_marker(store, location)
        if marker is None:
            _never_deleted(store, location, view)
            if not create:
                raise RepositoryError(
                    f"no vmsnap repository at {location} (no {MARKER})",
                    hint="check --repo; `vmsnap init --repo …` or `vmsnap backup --repo DIR` (a new or empty "
                    "directory) creates one",
                )
            marker = _create(store, directory, location, layout_class(layout or DEFAULT_LAYOUT).new_marker())
        elif layout is not None and layout_class(layout).name != marker.layout:
            raise RepositoryError(
                f"repository {location} has layout {marker.layout}, not {layout}",
                hint="choose another --repo for that layout, or leave --layout out",
            )
        return _instance(store, directory, marker, location, key_file, runner, state_root, lease_seconds)

    @classmethod
    def init(
        cls,
        location: Path | str,
        *,
        layout: str = DEFAULT_LAYOUT,
        encrypt: bool = False,
        key_file: Path | str | None = None,
        compression: str = "zstd",
        runner: Runner | None = None,
        state_root: Path | None = None,
        lock: LockPolicy | None = None,
    ) -> RepositoryLayout:
        """``vmsnap init``: make a new repository at ``location`` (a new or empty directory, or an empty S3
        prefix). With ``encrypt``, the key file (``key_file`` or ``$VMSNAP_KEY_FILE``) is created (0600)
        when it does not exist, else its key is used. With ``lock``, a locked repository (S3 Object Lock):
        the bucket must have Object Lock and versioning, and no default retention rule.

        :raise RepositoryError: a repository (or other data) is there already; a bucket that cannot hold a
            locked repository (what it lacks is named)
        :raise UsageError: ``encrypt`` without a key file, encryption or a lock in the qcow2 layout, a lock
            on a store that cannot lock (a directory)
        :raise KeyFileError: the key file cannot be created or read
        :raise StoreError: the server refused the lock (its mode, say)
        """
        path = key_file_path(key_file)
        if encrypt and path is None:
            raise UsageError(
                "--encrypt needs a key file", hint="pass --key-file FILE (or VMSNAP_KEY_FILE); it is created"
            )
        cls_ = layout_class(layout)
        cls_.new_marker(compression=compression, key_id="0" * 32 if encrypt else None, lock=lock)  # checks
        if lock is not None and not is_url(normalize_location(location)):
            raise UsageError(
                f"{location} is a directory: a locked repository needs an object store that locks objects",
                hint="use an S3 bucket with Object Lock: --repo s3://BUCKET/PREFIX",
            )
        store, directory, view = _store(location, create=True)
        if view is not None:
            raise UsageError("a repository read --as-of a time cannot be made", hint="leave --as-of out")
        if lock is not None:
            _check_lockable(store)
        if _read_marker(store, location) is not None:
            raise RepositoryError(
                f"{location} is a vmsnap repository already", hint="use it, or choose another --repo"
            )
        _never_deleted(store, location, None)
        key: RepositoryKey | None = None
        made_key = False
        if encrypt:
            assert path is not None
            made_key = not path.exists()
            key = create_key_file(path) if made_key else read_key_file(path)
        marker = cls_.new_marker(compression=compression, key_id=key.key_id if key else None, lock=lock)
        try:
            marker = _create(store, directory, location, marker, exclusive=True)
        except RepositoryError:
            if made_key and path is not None:
                path.unlink(missing_ok=True)  # the key of a repository that was not made
            raise
        return _instance(store, directory, marker, location, path, runner, state_root, None)

    @classmethod
    def traits_at(cls, location: Path | str, *, layout: str | None = None) -> LayoutTraits:
        """The traits of the repository at ``location``, or of the one ``open(create=True)`` would make
        there — read before a backup writes anything.

        :raise RepositoryError: the marker is damaged
        """
        marker = None
        if is_url(location) or Path(location).exists():
            try:
                store, _, _ = _store(location, create=False)
                marker = _read_marker(store, location)
            except (RepositoryError, NotFoundError):
                marker = None
        chosen = (
            _layout_of(marker, location) if marker is not None else layout_class(layout or DEFAULT_LAYOUT)
        )
        return chosen.traits()


def _store(location: Path | str, *, create: bool) -> tuple[Store, Path | None, AsOfStore | None]:
    """The store at ``location``, for a directory its path (made when ``create``), and for a URL with
    ``?as-of=TIME`` the view of the store as it was then (read-only; then it is the store returned too)."""
    location = normalize_location(location)
    if is_url(location):
        base, moment = split_as_of(str(location))
        store = open_store(base)
        if moment is not None:
            view = _as_of(store, moment)
            return view, None, view
        return store, None, None
    path, moment = split_as_of(str(location))
    if moment is not None:
        raise UsageError(
            f"{path} is a directory: it keeps no earlier versions",
            hint="--as-of needs an S3 bucket with versioning; leave it out",
        )
    directory = Path(location)
    if not directory.exists():
        if not create:
            raise RepositoryError(
                f"no vmsnap repository at {directory} (no such directory)",
                hint="check --repo; `vmsnap init --repo DIR` creates one",
            )
        make_private_dir(directory)
    if not directory.is_dir():
        raise RepositoryError(f"{directory} is not a directory", hint="choose a directory for --repo")
    return open_store(directory), directory, None


def _as_of(store: Store, moment: dt.datetime) -> AsOfStore:
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


def _check_lockable(store: Store) -> None:
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


def _never_deleted(store: Store, location: Path | str, view: AsOfStore | None) -> None:
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


def _read_marker(store: Store, location: Path | str) -> RepoMarker | None:
    try:
        raw = store.get(MARKER)
    except NotFoundError:
        return None
    try:
        marker = RepoMarker.from_bytes(raw, where=f"{location}/{MARKER}")
        return _layout_of(marker, location).accept_marker(marker)
    except ValueError as err:
        raise _overwritten(
            store,
            location,
            RepositoryError(
                f"{location}/{MARKER} is damaged: {err}",
                hint="restore the marker from a copy of the repository",
            ),
        ) from err
    except RepositoryError as err:
        raise _overwritten(store, location, err) from err


def _overwritten(store: Store, location: Path | str, err: RepositoryError) -> RepositoryError:
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


def _layout_of(marker: RepoMarker, location: Path | str) -> type[RepositoryLayout]:
    """The class of the marker's layout.

    :raise RepositoryError: a layout this vmsnap does not know (a plugin that is not installed)
    """
    try:
        return layout_class(marker.layout)
    except UsageError as err:
        raise RepositoryError(
            f"repository {location} has layout {marker.layout!r}, which this vmsnap does not know",
            hint=f"install the package that provides it (layouts here: {', '.join(layout_names())})",
        ) from err


def _create(
    store: Store, directory: Path | None, location: Path | str, marker: RepoMarker, *, exclusive: bool = False
) -> RepoMarker:
    """Write ``marker`` into an empty store. When another process (another host) made a repository there
    meanwhile, that one's marker is returned — or, with ``exclusive`` (``init``), refused: of several racing
    creators exactly one writes the marker (``put(if_absent)``).

    :raise RepositoryError: the store or directory holds other data, or (``exclusive``) a repository
    :raise UsageError: a layout that keeps plain files, in an object store
    """
    empty = not any(True for _ in store.list("")) if directory is None else not any(directory.iterdir())
    if not empty:
        found = _read_marker(store, location)
        if found is None:
            raise RepositoryError(
                f"{location} is not empty and not a vmsnap repository",
                hint="choose a new or empty directory (or S3 prefix) for --repo",
            )
        return _created_meanwhile(found, location, exclusive)
    cls = _layout_of(marker, location)
    if cls.needs_directory and directory is None:
        anywhere = [n for n in layout_names() if not layout_class(n).needs_directory]
        raise UsageError(
            f"the {cls.name} layout keeps plain files: it needs a directory, not an object store",
            hint=f"use --layout {' or '.join(anywhere) or '(none installed)'} for URLs",
        )
    retention: Retention | None = None
    if marker.lock is not None:  # the marker lives as long as the chunks (every backup extends it)
        retention = retention_after(marker.lock.mode, marker.lock.chunk_seconds)
    data = json.dumps(marker.to_json(), indent=1).encode() + b"\n"
    if not store.put(MARKER, data, if_absent=True, retention=retention):
        found = _read_marker(store, location)
        assert found is not None
        return _created_meanwhile(found, location, exclusive)
    if store.capabilities.conditional_put == "server":
        try:  # (after the marker: its probe object must not make a racing creator think the store is used)
            store.check_conditional_writes()  # a server that ignores If-None-Match would break the leases
        except VmsnapError:
            store.delete(MARKER)
            raise
    return marker


def _created_meanwhile(found: RepoMarker, location: Path | str, exclusive: bool) -> RepoMarker:
    if exclusive:
        raise RepositoryError(
            f"{location} is a vmsnap repository already (another process made it just now)",
            hint="use it, or choose another --repo",
        )
    return found


def _instance(
    store: Store,
    directory: Path | None,
    marker: RepoMarker,
    location: Path | str,
    key_file: Path | str | None,
    runner: Runner | None,
    state_root: Path | None,
    lease_seconds: float | None,
) -> RepositoryLayout:
    return _layout_of(marker, location).open_layout(
        store,
        marker,
        directory=directory,
        location=location,
        key_file=key_file_path(key_file),
        runner=runner,
        state_root=state_root,
        lease_seconds=lease_seconds,
    )
