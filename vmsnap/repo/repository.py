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

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, UsageError, VmsnapError
from vmsnap.files import make_private_dir
from vmsnap.processes import crash_point
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
from vmsnap.repo.stores.history import AsOfStore, split_as_of, with_as_of
from vmsnap.repo.stores.retaining import retention_after
from vmsnap.repo.versioned import as_of_view, check_lockable, never_deleted, overwritten
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
    "LocatedRepository",
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
        directory (or an empty S3 prefix), of ``layout`` (default ``chunks``). The same as
        ``Repository.locate(…).open()``.

        :param as_of: read the repository as it was then, from the store's object versions (read-only; also
            written into the location as ``LOCATION?as-of=TIME``)
        :raise RepositoryError: no repository there (without ``create``), a non-empty directory that is not
            one, one of another format, or one whose marker was deleted or overwritten (when, is said)
        :raise KeyFileError: an encrypted repository and a key file that is not its key
        :param lease_seconds: lifetime of the leases taken (default ``$VMSNAP_LEASE_SECONDS``, else 120)
        :raise UsageError: ``as_of`` in the future, on a store without versions, or with ``create``
        :raise StoreError: the store cannot be reached
        """
        return cls.locate(
            location,
            create=create,
            layout=layout,
            key_file=key_file,
            runner=runner,
            state_root=state_root,
            lease_seconds=lease_seconds,
            as_of=as_of,
        ).open()

    @classmethod
    def locate(
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
    ) -> LocatedRepository:
        """The repository at ``location`` found without writing anything: its store opened and its marker
        read (once; a new directory is neither made nor opened yet), so that a backup can plan with the
        layout's traits before its first write and then open it (:meth:`LocatedRepository.open`). The
        options are :meth:`open`'s.

        :raise RepositoryError: no such directory (without ``create``), or a damaged marker (overwritten:
            when, is said)
        :raise UsageError: an unknown ``layout``; ``as_of`` in the future, on a store without versions, or
            with ``create``
        :raise StoreError: the store cannot be reached
        """
        if layout is not None:
            layout_class(layout)  # an unknown name fails now
        if as_of is not None:
            location = with_as_of(str(normalize_location(location)), as_of)
        if create and split_as_of(str(location))[1] is not None:
            raise UsageError("a repository read --as-of a time cannot be written", hint="leave --as-of out")
        store: Store | None = None
        directory: Path | None = None
        view: AsOfStore | None = None
        marker: RepoMarker | None = None
        if not create or is_url(location) or Path(location).exists():
            store, directory, view = _store(location, create=False)
            marker = _read_marker(store, location)
        options = _Options(key_file, runner, state_root, lease_seconds)
        return LocatedRepository(location, create, layout, options, store, directory, marker, view)

    @classmethod
    def init(
        cls,
        location: Path | str,
        *,
        layout: str = DEFAULT_LAYOUT,
        encrypt: bool = False,
        key_file: Path | str | None = None,
        compression: str = "zstd",
        chunk_id: str | None = None,
        runner: Runner | None = None,
        state_root: Path | None = None,
        lock: LockPolicy | None = None,
    ) -> RepositoryLayout:
        """``vmsnap init``: make a new repository at ``location`` (a new or empty directory, or an empty S3
        prefix). With ``encrypt``, the key file (``key_file`` or ``$VMSNAP_KEY_FILE``) is created (0600)
        when it does not exist, else its key is used. ``chunk_id`` is the chunk id hash, one of the layout's
        ``chunk_ids`` (None: its default; see :meth:`~vmsnap.repo.layout.RepositoryLayout.new_marker`). With
        ``lock``, a locked repository (S3 Object Lock): the bucket must have Object Lock and versioning, and
        no default retention rule.

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
        key_id = "0" * 32 if encrypt else None
        cls_.new_marker(compression=compression, key_id=key_id, chunk_id=chunk_id, lock=lock)  # checks
        if lock is not None and not is_url(normalize_location(location)):
            raise UsageError(
                f"{location} is a directory: a locked repository needs an object store that locks objects",
                hint="use an S3 bucket with Object Lock: --repo s3://BUCKET/PREFIX",
            )
        store, directory, view = _store(location, create=True)
        if view is not None:
            raise UsageError("a repository read --as-of a time cannot be made", hint="leave --as-of out")
        if lock is not None:
            check_lockable(store)
        if _read_marker(store, location) is not None:
            raise RepositoryError(
                f"{location} is a vmsnap repository already", hint="use it, or choose another --repo"
            )
        never_deleted(store, location, None)
        key: RepositoryKey | None = None
        made_key = False
        if encrypt:
            assert path is not None
            made_key = not path.exists()
            key = create_key_file(path) if made_key else read_key_file(path)
        key_id = key.key_id if key else None
        marker = cls_.new_marker(compression=compression, key_id=key_id, chunk_id=chunk_id, lock=lock)
        try:
            marker = _create(store, directory, location, marker, exclusive=True)
        except RepositoryError:
            if made_key and path is not None:
                path.unlink(missing_ok=True)  # the key of a repository that was not made
            raise
        return _instance(store, directory, marker, location, path, runner, state_root, None)

    @classmethod
    def missing(cls, location: Path | str) -> str | None:
        """Why there is no repository at ``location``, as one line (``vmsnap recover`` says it): no such
        directory, an empty one (or one holding only what :meth:`clear_unmade` removes), an empty S3 prefix;
        None when there is a repository or other data there (:meth:`open` says which).

        :raise StoreError: an S3 store cannot be reached
        """
        location = normalize_location(location)
        if is_url(location):
            store = open_store(str(location))
            if _read_marker(store, location) is None and not any(True for _ in store.list("")):
                return f"no vmsnap repository at {location} (nothing is stored there): nothing to undo in it"
            return None
        directory = Path(location)
        if not directory.exists() and not directory.is_symlink():
            return f"no vmsnap repository at {directory} (no such directory): nothing to undo in it"
        if directory.is_dir() and not (directory / MARKER).exists():
            leftovers = _creation_leftovers(directory)
            what = "an empty directory" if leftovers == [] else "only a half-written marker"
            if leftovers is not None:
                return f"no vmsnap repository at {directory} ({what}): nothing to undo in it"
        return None

    @classmethod
    def clear_unmade(cls, location: Path | str) -> list[str]:
        """Remove what a backup that died while writing the marker of a new directory repository left (the
        marker's temporary file), so that the directory is empty again; one line per file removed.

        A process writing a marker holds an flock on the directory (:func:`_creating`): while one does, its
        temporary file is left alone. Where the filesystem has no flock on directories (NFS), only a
        temporary file older than :data:`UNMADE_AGE` seconds is taken for a dead run's.
        """
        location = normalize_location(location)
        if is_url(location):
            return []  # an object is stored whole or not at all
        directory = Path(location)
        if not directory.is_dir() or directory.is_symlink() or (directory / MARKER).exists():
            return []
        removed = []
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                return []  # a live process is writing the marker right now
            except OSError:
                locked = False
            for leftover in _creation_leftovers(directory) or []:
                if not locked and not _older_than(leftover, UNMADE_AGE):
                    continue
                leftover.unlink(missing_ok=True)
                removed.append(f"removed {leftover}: the half-written marker of a dead run's new repository")
        finally:
            os.close(fd)  # (releases the lock)
        return removed

    @classmethod
    def traits_at(cls, location: Path | str, *, layout: str | None = None) -> LayoutTraits:
        """The traits of the repository at ``location``, or of the one ``open(create=True)`` would make
        there — read before a backup writes anything (:meth:`locate` does the same and keeps what it read).
        """
        try:
            return cls.locate(location, create=True, layout=layout).traits()
        except (RepositoryError, NotFoundError):
            return layout_class(layout or DEFAULT_LAYOUT).traits()


@attrs.frozen
class _Options:
    key_file: Path | str | None
    runner: Runner | None
    state_root: Path | None
    lease_seconds: float | None


class LocatedRepository:
    """A repository found by :meth:`Repository.locate`, not opened yet (nothing written).

    :ivar marker: its marker, or None where there is none yet (``open`` makes it, with ``create``)
    """

    def __init__(
        self,
        location: Path | str,
        create: bool,
        layout: str | None,
        options: _Options,
        store: Store | None,
        directory: Path | None,
        marker: RepoMarker | None,
        view: AsOfStore | None = None,
    ) -> None:
        self.location = location
        self._create = create
        self._layout = layout
        self._options = options
        self._store = store
        self._directory = directory
        self._view = view
        self.marker = marker

    def traits(self) -> LayoutTraits:
        """The layout's traits: the marker's layout, or the one :meth:`open` would make."""
        if self.marker is not None:
            return _layout_of(self.marker, self.location).traits()
        return layout_class(self._layout or DEFAULT_LAYOUT).traits()

    def open(self) -> RepositoryLayout:
        """Open the repository with the store found (made first where ``create`` found none: a new
        directory, an empty one, an empty S3 prefix); once.

        :raise RepositoryError: no repository there (without ``create``), a non-empty directory that is not
            one, or one of another layout than asked for
        :raise KeyFileError: an encrypted repository and a key file that is not its key
        """
        location, marker = self.location, self.marker
        store, directory = self._store, self._directory
        if marker is None:
            if store is not None:
                never_deleted(store, location, self._view)
            if not self._create:
                raise RepositoryError(
                    f"no vmsnap repository at {location} (no {MARKER})",
                    hint="check --repo; `vmsnap init --repo …` or `vmsnap backup --repo DIR` (a new or empty "
                    "directory) creates one",
                )
            if store is None:
                store, directory, _ = _store(location, create=True)
            new = layout_class(self._layout or DEFAULT_LAYOUT).new_marker()
            marker = _create(store, directory, location, new)
        elif self._layout is not None and layout_class(self._layout).name != marker.layout:
            raise RepositoryError(
                f"repository {location} has layout {marker.layout}, not {self._layout}",
                hint="choose another --repo for that layout, or leave --layout out",
            )
        assert store is not None
        o = self._options
        return _instance(
            store, directory, marker, location, o.key_file, o.runner, o.state_root, o.lease_seconds
        )


def _store(location: Path | str, *, create: bool) -> tuple[Store, Path | None, AsOfStore | None]:
    """The store at ``location``, for a directory its path (made when ``create``), and for a URL with
    ``?as-of=TIME`` the view of the store as it was then (read-only; then it is the store returned too)."""
    location = normalize_location(location)
    if is_url(location):
        base, moment = split_as_of(str(location))
        store = open_store(base)
        if moment is not None:
            view = as_of_view(store, moment)
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


UNMADE_AGE = 60.0
"""Seconds after which a marker's temporary file is taken for a dead run's where the directory cannot be
locked (a live creator writes and renames it within moments)."""


@contextlib.contextmanager
def _creating(directory: Path | None) -> Iterator[None]:
    """Hold an exclusive flock on a new repository's directory while its marker is written, so that
    :meth:`Repository.clear_unmade` (``vmsnap recover``, which takes no VM's lock for a repository not yet
    made) leaves the marker's temporary file of a live creator alone. Released by the kernel when the
    process dies. A filesystem that cannot lock a directory (NFS) is written without it."""
    if directory is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


_CREATION_LEFTOVER = re.compile(r"\.tmp-[0-9a-f]{16}|\.vmsnap-repo\.json\.tmp-[0-9a-f]{8}")
"""The temporary file of a marker being written (the local store's, or the qcow2 layout's atomic write)."""


def _creation_leftovers(directory: Path) -> list[Path] | None:
    """The temporary files a run that died writing the marker left in ``directory`` (a directory with no
    marker), or None when it holds anything else."""
    found = []
    for entry in directory.iterdir():
        if entry.is_symlink() or not entry.is_file() or not _CREATION_LEFTOVER.fullmatch(entry.name):
            return None
        found.append(entry)
    return found


def _read_marker(store: Store, location: Path | str) -> RepoMarker | None:
    try:
        raw = store.get(MARKER)
    except NotFoundError:
        return None
    try:
        marker = RepoMarker.from_bytes(raw, where=f"{location}/{MARKER}")
        return _layout_of(marker, location).accept_marker(marker)
    except ValueError as err:
        raise overwritten(
            store,
            location,
            RepositoryError(
                f"{location}/{MARKER} is damaged: {err}",
                hint="restore the marker from a copy of the repository",
            ),
        ) from err
    except RepositoryError as err:
        raise overwritten(store, location, err) from err


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
    """:func:`_create_locked`, holding the directory's creation lock (:func:`_creating`)."""
    with _creating(directory):
        return _create_locked(store, directory, location, marker, exclusive=exclusive)


def _create_locked(
    store: Store, directory: Path | None, location: Path | str, marker: RepoMarker, *, exclusive: bool = False
) -> RepoMarker:
    """Write ``marker`` into an empty store. When another process (another host) made a repository there
    meanwhile, that one's marker is returned — or, with ``exclusive`` (``init``), refused: of several racing
    creators exactly one writes the marker (``put(if_absent)``).

    :raise RepositoryError: the store or directory holds other data, or (``exclusive``) a repository
    :raise UsageError: a layout that keeps plain files, in an object store
    """
    if directory is None:
        empty = not any(True for _ in store.list(""))
    else:  # the temporary file of a run that died writing the marker is no data (nor, while it is being
        # written, is a racing creator's: so it is left alone here; `vmsnap recover` removes a dead run's)
        empty = _creation_leftovers(directory) is not None
    if not empty:
        found = _read_marker(store, location)
        if found is None:
            raise RepositoryError(
                f"{location} is not empty and not a vmsnap repository",
                hint="choose a new or empty directory (or S3 prefix) for --repo",
            )
        return _created_meanwhile(found, location, exclusive)
    crash_point("before-marker")
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
