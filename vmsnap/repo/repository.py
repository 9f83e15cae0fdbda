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
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vmsnap.errors import KeyFileError, NotFoundError, RepositoryError, UsageError, VmsnapError
from vmsnap.files import make_private_dir, write_json_atomic
from vmsnap.repo.chunks.keys import RepositoryKey, create_key_file, read_key_file
from vmsnap.repo.chunks.leases import lease_seconds as default_lease_seconds
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.layout import DEFINITION_FILE, BackupWriter, RepositoryLayout
from vmsnap.repo.manifest import Damaged, DiskRecord, Kind, Manifest, utc_now_iso
from vmsnap.repo.marker import CHUNK_IDS, DEFAULT_LAYOUT, MARKER, RepoMarker, check_layout
from vmsnap.repo.progress import DiskProgress
from vmsnap.repo.qcow2_layout import DELETING_PREFIX
from vmsnap.repo.qcow2_repo import Qcow2Repository
from vmsnap.repo.reports import LayoutTraits, RestoredDisk
from vmsnap.repo.stores import is_url, normalize_location, open_store
from vmsnap.repo.stores.base import Store
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
    ) -> RepositoryLayout:
        """Open the repository at ``location``; with ``create``, make one there when it is a new or empty
        directory (or an empty S3 prefix), of ``layout`` (default ``chunks``).

        :raise RepositoryError: no repository there (without ``create``), a non-empty directory that is not
            one, or one of another format
        :raise KeyFileError: an encrypted repository and a key file that is not its key
        :param lease_seconds: lifetime of the leases taken (default ``$VMSNAP_LEASE_SECONDS``, else 120)
        :raise StoreError: the store cannot be reached
        """
        store, directory = _store(location, create=create)
        marker = _read_marker(store, location)
        if marker is None:
            if not create:
                raise RepositoryError(
                    f"no vmsnap repository at {location} (no {MARKER})",
                    hint="check --repo; `vmsnap init --repo …` or `vmsnap backup --repo DIR` (a new or empty "
                    "directory) creates one",
                )
            marker = _create(store, directory, location, RepoMarker.new(layout or DEFAULT_LAYOUT))
        elif layout is not None and check_layout(layout) != marker.layout:
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
        chunk_id: str = CHUNK_IDS[0],
        runner: Runner | None = None,
        state_root: Path | None = None,
    ) -> RepositoryLayout:
        """``vmsnap init``: make a new repository at ``location`` (a new or empty directory, or an empty S3
        prefix). With ``encrypt``, the key file (``key_file`` or ``$VMSNAP_KEY_FILE``) is created (0600)
        when it does not exist, else its key is used. ``chunk_id`` is the chunk id hash of a chunks
        repository: "blake3" (the default, format 3) or "sha256" (format 2, readable by older vmsnap).

        :raise RepositoryError: a repository (or other data) is there already
        :raise UsageError: ``encrypt`` without a key file, or encryption in the qcow2 layout
        :raise KeyFileError: the key file cannot be created or read
        """
        path = key_file_path(key_file)
        if encrypt and path is None:
            raise UsageError(
                "--encrypt needs a key file", hint="pass --key-file FILE (or VMSNAP_KEY_FILE); it is created"
            )
        RepoMarker.new(
            layout, compression=compression, key_id="0" * 32 if encrypt else None, chunk_id=chunk_id
        )  # checks
        store, directory = _store(location, create=True)
        if _read_marker(store, location) is not None:
            raise RepositoryError(
                f"{location} is a vmsnap repository already", hint="use it, or choose another --repo"
            )
        key: RepositoryKey | None = None
        made_key = False
        if encrypt:
            assert path is not None
            made_key = not path.exists()
            key = create_key_file(path) if made_key else read_key_file(path)
        marker = RepoMarker.new(
            layout, compression=compression, key_id=key.key_id if key else None, chunk_id=chunk_id
        )
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
                store, _ = _store(location, create=False)
                marker = _read_marker(store, location)
            except (RepositoryError, NotFoundError):
                marker = None
        name = marker.layout if marker is not None else check_layout(layout or DEFAULT_LAYOUT)
        return (ChunksRepository if name == "chunks" else Qcow2Repository).traits()


def _store(location: Path | str, *, create: bool) -> tuple[Store, Path | None]:
    """The store at ``location`` and, for a directory, its path (made when ``create``)."""
    location = normalize_location(location)
    if is_url(location):
        return open_store(str(location)), None
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
    return open_store(directory), directory


def _read_marker(store: Store, location: Path | str) -> RepoMarker | None:
    try:
        raw = store.get(MARKER)
    except NotFoundError:
        return None
    return RepoMarker.from_bytes(raw, where=f"{location}/{MARKER}")


def _create(
    store: Store, directory: Path | None, location: Path | str, marker: RepoMarker, *, exclusive: bool = False
) -> RepoMarker:
    """Write ``marker`` into an empty store. When another process (another host) made a repository there
    meanwhile, that one's marker is returned — or, with ``exclusive`` (``init``), refused: of several racing
    creators exactly one writes the marker (``put(if_absent)``).

    :raise RepositoryError: the store or directory holds other data, or (``exclusive``) a repository
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
    if marker.layout == "qcow2":
        if directory is None:
            raise UsageError(
                "the qcow2 layout keeps plain files: it needs a directory, not an object store",
                hint="use --layout chunks for s3:// repositories",
            )
        write_json_atomic(directory / MARKER, marker.to_json())
        return marker
    if not store.put(MARKER, json.dumps(marker.to_json(), indent=1).encode() + b"\n", if_absent=True):
        found = _read_marker(store, location)
        assert found is not None
        return _created_meanwhile(found, location, exclusive)
    check_conditional_writes = getattr(store, "check_conditional_writes", None)
    if check_conditional_writes is not None:
        try:  # (after the marker: its probe object must not make a racing creator think the store is used)
            check_conditional_writes()  # an object store that ignores If-None-Match would break the leases
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
    if marker.layout == "qcow2":
        if directory is None:
            raise RepositoryError(f"{location}: a qcow2-layout repository in an object store cannot be read")
        return Qcow2Repository(directory, runner=runner)
    key: RepositoryKey | None = None
    problem: KeyFileError | None = None
    path = key_file_path(key_file)
    if marker.key_id is not None:
        if path is None:
            problem = KeyFileError(
                f"repository {location} is encrypted and no key file was given",
                hint="pass its key file with --key-file or VMSNAP_KEY_FILE",
            )
        else:
            key = read_key_file(path, expected_key_id=marker.key_id)
    return ChunksRepository(
        store,
        marker,
        key=key,
        key_file=path if key is not None else None,
        key_problem=problem,
        runner=runner,
        state_root=state_root,
        lease_seconds=lease_seconds if lease_seconds is not None else default_lease_seconds(),
    )
