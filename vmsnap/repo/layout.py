"""What the backup orchestrator and the CLI ask of a repository, whatever its layout:
:class:`RepositoryLayout` (listing, locking, restore, verify, prune, gc) and :class:`BackupWriter` (one
backup being written).

Two layouts implement it: ``qcow2`` (:mod:`vmsnap.repo.qcow2_repo`: a directory of qcow2 chains) and
``chunks`` (:mod:`vmsnap.repo.chunks.repository`: deduplicated chunks over any store), registered by name
under the ``vmsnap.layouts`` entry point (:func:`layout_class`). Open one with
:meth:`vmsnap.repo.repository.Repository.open`, which reads the marker's layout name and asks that class
(:meth:`RepositoryLayout.open_layout`); what differs between layouts is class data (``needs_directory``,
``encrypts``, ``chunk_size``, ``chunk_ids``, ``reads_exports`` …) and its marker rules (``new_marker``,
``accept_marker``), so nothing outside a layout's own modules names it.

A backup, as the orchestrator drives it::

    writer = repo.begin_backup(vm, parent)          # under repo.lock(vm); journal at repo.journal_path(vm)
    BackupContext(writer.workdir, …, Checkpoint(parent id, writer.checkpoint_images(parent, disks)), push)
    written = writer.write(disk, export_source, transport=…, progress=…)   # per disk, inside export
    manifest = writer.seal(kind=…, parent=…, strategy=…, …)               # the manifest last
    # on any failure: writer.discard(); a dead run is undone by repo.discard_backup / recover_leftovers
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Literal, Protocol

import attrs

from vmsnap.errors import NotFoundError, PluginError, UsageError
from vmsnap.image.digest import ChunkDigests
from vmsnap.image.sources import BackupSource
from vmsnap.model import Disk, ExportSource, Progress, validate_name
from vmsnap.registry import LAYOUT_GROUP, load, names
from vmsnap.repo import attachments
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.manifest import Damaged, Kind, Manifest
from vmsnap.repo.marker import COMPRESSIONS, RepoMarker
from vmsnap.repo.progress import DiskProgress, Transfer, no_progress
from vmsnap.repo.prune import plan_policy, plan_retention
from vmsnap.repo.reports import (
    CopiedBackup,
    GcReport,
    LayoutTraits,
    PruneResult,
    RestoredDisk,
    VerifyReport,
    WrittenDisk,
)
from vmsnap.repo.retention import RetentionPolicy
from vmsnap.repo.stores.base import Store
from vmsnap.runner import Runner
from vmsnap.transports.base import Transport

DEFINITION_FILE = "domain.xml"
"""Kept with a backup of a machine that has a definition (a libvirt domain's XML), for restore --define."""

ATTACHMENT_MAX = attachments.MAX_SIZE
"""The largest object :meth:`RepositoryLayout.attach` keeps (one chunk blob in the ``chunks`` layout)."""

RestoreFormat = Literal["qcow2", "raw"]
VerifyReader = Literal["auto", "qemu", "libqcow"]


class BackupWriter(Protocol):
    """One backup being written into a repository (see the module docstring for the order of calls).

    :ivar backup_id: the new backup's id
    :ivar workdir: a private local directory for the strategy's files of this backup (fleecing files; in
        the qcow2 layout the staging directory, where a push strategy writes ``<disk>.qcow2``)
    :ivar accepts_push: a strategy may write the images itself into ``workdir``
    :ivar location: where the backup will be, for messages and results (a path or a store URL and key)
    """

    backup_id: str
    workdir: Path
    accepts_push: bool
    location: str

    def checkpoint_images(self, parent: Manifest, disks: Sequence[Disk]) -> dict[str, Path]:
        """Disk name → the parent backup's image of it, for strategies that write incremental images on top
        (qcow2); empty when the layout keeps no such images (chunks)."""
        ...

    def write(
        self,
        disk: Disk,
        source: ExportSource,
        *,
        transport: Transport | None,
        progress: Progress,
        transfer: Callable[[Transfer], None] | None = None,
    ) -> WrittenDisk:
        """Store one disk's content from ``source`` (inside the strategy's export).

        :param transport: what copies the source (qcow2 pull mode); None when the strategy wrote the image
            itself (push) or the layout reads the source itself (chunks)
        :param transfer: called with the bytes read, stored and deduplicated as they grow, by a layout that
            reads the source itself
        :raise VmsnapError: the copy failed (the backup is then discarded by the caller)
        """
        ...

    def seal(
        self,
        *,
        kind: Kind,
        parent: Manifest | None,
        strategy: str,
        quiesced: bool,
        bitmap: str | None,
        definition: str | None,
    ) -> Manifest:
        """Make the backup exist: everything durable, the manifest written last. Returns it.

        :param parent: the parent of an incremental (None for a full backup)
        :param definition: the machine's definition (libvirt XML) to keep with the backup, or None
        :raise RepositoryError: something the manifest names is missing, or the writer lost its lease
        """
        ...

    def attach(self, name: str, data: bytes) -> None:
        """Keep ``data`` as the backup's object ``name`` (what the machine needs to come back besides its
        disks: firmware variables, TPM state, a QEMU command line), sealed with the backup: the manifest
        names its sha256 (``objects``), it exists once the manifest does, cannot be replaced afterwards
        (:meth:`RepositoryLayout.attach` refuses its name), and goes with a discarded run.

        :raise UsageError: a bad name, or more than :data:`ATTACHMENT_MAX` bytes
        """
        ...

    def discard(self) -> None:
        """Remove everything of this unfinished backup (idempotent)."""
        ...


class RepositoryLayout(abc.ABC):
    """A repository of either layout; see the module docstring.

    :cvar name: the name it is registered under (the marker's ``layout``)
    :cvar reads_exports: the layout reads a strategy's export itself: no transport may be chosen
    :cvar accepts_push: a strategy may write the backup's images itself (push)
    :cvar chains: incrementals depend on their parents (prune keeps the parents of kept backups)
    :cvar needs_directory: it keeps plain files, so only a directory (not an object store) can hold it
    :cvar encrypts: a repository of this layout can be encrypted
    :cvar chunk_size: the size its content is cut into (the marker's ``chunk_size``, with a
        ``compression``), or None when it cuts nothing (then the marker has neither)
    :cvar chunk_ids: the chunk id functions a new repository may be made with (``init --chunk-id``), its
        default first; empty: the layout names nothing by a hash of its content
    :cvar collects: removing a backup can leave data other backups shared (chunks) that only :meth:`gc`
        frees; False: a backup's data goes with it
    :cvar locks: a repository of this layout can be locked (S3 Object Lock: what its backups write cannot be
        deleted or overwritten for a while), on a store that can lock objects
    """

    name: ClassVar[str]
    reads_exports: ClassVar[bool]
    accepts_push: ClassVar[bool]
    chains: ClassVar[bool]
    needs_directory: ClassVar[bool] = False
    encrypts: ClassVar[bool] = False
    chunk_size: ClassVar[int | None] = None
    chunk_ids: ClassVar[tuple[str, ...]] = ()
    collects: ClassVar[bool] = False
    locks: ClassVar[bool] = False

    @classmethod
    def traits(cls) -> LayoutTraits:
        """The layout's traits, as the orchestrator plans with them."""
        return LayoutTraits(cls.name, cls.reads_exports, cls.accepts_push)

    @classmethod
    def new_marker(
        cls,
        *,
        compression: str = "zstd",
        key_id: str | None = None,
        chunk_id: str | None = None,
        lock: LockPolicy | None = None,
    ) -> RepoMarker:
        """The marker of a new repository of this layout (a layout with ``chunk_ids`` names the chosen one
        in it: its override).

        :param key_id: the key's fingerprint, for an encrypted repository
        :param chunk_id: one of :attr:`chunk_ids` (None: the layout's default)
        :param lock: the lock policy of a locked repository
        :raise UsageError: an unknown compression or chunk id hash, encryption in a layout that cannot be
            encrypted, or a lock in one that cannot be locked
        """
        if lock is not None and not cls.locks:
            can = [n for n in layout_names() if layout_class(n).locks]
            raise UsageError(
                f"the {cls.name} layout cannot be locked",
                hint=f"use --layout {' or '.join(can) or '(none installed)'} with --lock-days",
            )
        if compression not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compression!r}", hint=f"use {' or '.join(COMPRESSIONS)}")
        if key_id is not None and not cls.encrypts:
            can = [n for n in layout_names() if layout_class(n).encrypts]
            raise UsageError(
                f"the {cls.name} layout cannot be encrypted",
                hint=f"use --layout {' or '.join(can) or '(none installed)'} with --encrypt",
            )
        if chunk_id is not None and chunk_id not in cls.chunk_ids:
            if cls.chunk_ids:
                raise UsageError(
                    f"unknown chunk id hash {chunk_id!r}", hint=f"use {' or '.join(cls.chunk_ids)}"
                )
            can = [n for n in layout_names() if layout_class(n).chunk_ids]
            raise UsageError(
                f"the {cls.name} layout has no chunk ids",
                hint=f"leave --chunk-id out, or use --layout {' or '.join(can) or '(none installed)'}",
            )
        if cls.chunk_size is None:
            return RepoMarker.new(cls.name)
        return RepoMarker.new(
            cls.name, chunk_size=cls.chunk_size, compression=compression, key_id=key_id, lock=lock
        )

    @classmethod
    def accept_marker(cls, marker: RepoMarker) -> RepoMarker:
        """``marker`` as this layout reads it: what it does not use dropped, what it needs checked.

        :raise ValueError: the marker lacks what the layout needs (the caller says it is damaged)
        """
        if marker.lock is not None and not cls.locks:
            raise ValueError(f"a lock ({marker.lock.describe()}), which the {cls.name} layout cannot keep")
        if marker.sealed and not cls.encrypts:
            raise ValueError(f"sealed metadata in the {cls.name} layout, which cannot be encrypted")
        if marker.chunk_id is not None and not cls.chunk_ids:
            raise ValueError(f"chunk id {marker.chunk_id!r} in a {cls.name} repository")
        if cls.chunk_size is None:
            return RepoMarker(marker.format, marker.layout, marker.id)
        if marker.chunk_size != cls.chunk_size or marker.compression is None:
            raise ValueError(f"chunk size {marker.chunk_size!r} and compression {marker.compression!r}")
        return marker if cls.encrypts else attrs.evolve(marker, key_id=None, keyed_chunk_id=None)

    @classmethod
    @abc.abstractmethod
    def open_layout(
        cls,
        store: Store,
        marker: RepoMarker,
        *,
        directory: Path | None,
        location: Path | str,
        key_file: Path | None,
        runner: Runner | None,
        state_root: Path | None,
        lease_seconds: float | None,
    ) -> RepositoryLayout:
        """The repository in ``store`` whose marker is ``marker`` (called by
        :meth:`~vmsnap.repo.repository.Repository.open`; no I/O beyond what checking the key needs).

        :param directory: the store's directory when it is one (None: an object store)
        :param location: what the user named it by, for messages
        :param key_file: the key file given (or from ``$VMSNAP_KEY_FILE``), for an encrypted repository
        :param lease_seconds: lifetime of the leases it takes (None: its default)
        :raise RepositoryError: the layout cannot be read from this store
        :raise KeyFileError: an encrypted repository and a key file that is not its key
        """

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The repository's path or URL (for messages; never a secret)."""

    @property
    def root(self) -> Path | str:
        """The repository's directory (qcow2, or a chunks repository in a directory), else its URL."""
        return self.location

    # -- reading -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def vms(self) -> list[str]:
        """The VMs that have backups (or leftovers) here, sorted."""

    @abc.abstractmethod
    def backups(self, vm: str | None = None, *, damaged: list[Damaged] | None = None) -> list[Manifest]:
        """Complete backups (those with a manifest) of ``vm``, or of every VM; oldest first per VM.

        :param damaged: collect backups whose manifest is damaged here instead of raising
        :raise RepositoryError: a manifest is damaged (without ``damaged``)
        """

    def get(self, vm: str, backup_id: str | None = None) -> Manifest:
        """The backup ``backup_id`` of ``vm`` (the latest when None).

        :raise NotFoundError: no such VM or backup (with the ids that exist)
        :raise RepositoryError: the manifest of that backup (or of one newer than the latest good one, when
            ``backup_id`` is None) is damaged
        """
        if backup_id is not None:
            validate_name(backup_id, "backup id")
        damaged: list[Damaged] = []
        backups = self.backups(vm, damaged=damaged)
        for bad in damaged:  # the one asked for, or a newer one than the latest good
            if bad.backup_id == backup_id or (
                backup_id is None and (not backups or bad.backup_id > backups[-1].backup_id)
            ):
                raise bad.error
        if not backups:
            raise NotFoundError(
                f"no backups of VM {vm!r} in {self.location}",
                hint=f"VMs in this repository: {', '.join(self.vms()) or 'none'}",
            )
        if backup_id is None:
            return backups[-1]
        for manifest in backups:
            if manifest.backup_id == backup_id:
                return manifest
        raise NotFoundError(
            f"no backup {backup_id!r} of VM {vm!r}",
            hint=f"`vmsnap list --repo {self.location} --vm {vm}` lists them; the latest: "
            f"{backups[-1].backup_id}",
        )

    def latest(self, vm: str) -> Manifest | None:
        """The newest backup of ``vm``, or None.

        :raise RepositoryError: the newest backup's manifest is damaged
        """
        try:
            return self.get(vm)
        except NotFoundError:
            return None

    @abc.abstractmethod
    def definition(self, manifest: Manifest) -> str | None:
        """The machine definition (libvirt XML) kept with a backup, or None.

        :raise RepositoryError: it is damaged
        """

    # -- objects kept beside a backup (its proof, its machine state) ---------------------------------

    @abc.abstractmethod
    def attach(self, manifest: Manifest, name: str, data: bytes) -> None:
        """Store ``data`` as object ``name`` beside a complete backup, never rewriting its manifest (a boot
        verification's result, its screenshot); encrypted and authenticated like the rest in an encrypted
        repository. An object of that name is replaced, unless the manifest sealed it (machine state).

        :raise UsageError: a bad name, a name the manifest sealed, or more than :data:`ATTACHMENT_MAX` bytes
        :raise NotFoundError: the backup was removed (pruned) meanwhile
        :raise RepositoryError: the repository cannot be written
        """

    @abc.abstractmethod
    def attachment(self, manifest: Manifest, name: str) -> bytes:
        """The object ``name`` kept beside a backup, checked (its digest, or its authentication tag in an
        encrypted repository, and that it was stored for this backup under this name).

        :raise NotFoundError: the backup has no such object
        :raise RepositoryError: it is damaged or was moved from elsewhere
        """

    @abc.abstractmethod
    def attachments(self, manifest: Manifest) -> list[str]:
        """The names of the objects kept beside a backup, sorted."""

    @abc.abstractmethod
    def disk_source(self, manifest: Manifest, disk: str) -> BackupSource:
        """A backup's disk as something a server can read in place, for ``mount`` and instant restore: an
        :class:`~vmsnap.image.sources.ImageSource` (qcow2: the top of its chain) or a
        :class:`~vmsnap.image.sources.ReaderSource` (chunks: a reader nbdkit builds).

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: what the disk needs (a parent, an index) is missing or damaged
        """

    def chunk_digests(self, manifest: Manifest, disk: str) -> ChunkDigests | None:
        """The sha256 of each 4 MiB chunk of a backup disk's content as the layout keeps them (checked
        against the manifest), for whoever reads an image :meth:`disk_source` serves, which checks nothing
        itself; None when the layout keeps no such digests (its reader sources check what they read).

        :raise NotFoundError: the backup has no such disk
        :raise RepositoryError: the digests are missing or damaged
        """
        return None

    # -- the VM's lock, its journal and its change tracking -----------------------------------------

    @abc.abstractmethod
    def lock(self, vm: str) -> contextlib.AbstractContextManager[None]:
        """Hold the VM's writer lock for the body: one backup, prune or recover of a VM at a time.

        :raise RepositoryError: another run holds it (:class:`~vmsnap.errors.LeaseError` in chunks)
        """

    @abc.abstractmethod
    def reading(self, vm: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold a reader lease for the body (restore, verify, copy of ``vm``, or of any VM): what it reads
        is neither pruned (qcow2) nor collected by gc (chunks) meanwhile."""

    @abc.abstractmethod
    def journal_path(self, vm: str) -> Path:
        """Where the journal of a backup of ``vm`` is kept (a local file)."""

    @abc.abstractmethod
    def recover_leftovers(self, vm: str) -> list[str]:
        """Remove what dead runs of ``vm`` left in the repository (caller holds the VM's lock and has undone
        the journal's run); one line per action."""

    @abc.abstractmethod
    def discard_backup(self, vm: str, backup_id: str) -> bool:
        """Remove the unfinished backup ``backup_id`` of ``vm`` (a dead run's); True when there was one.

        :raise RepositoryError: that backup is complete (it has a manifest)
        """

    @abc.abstractmethod
    def require_full(self, vm: str, reason: str) -> None:
        """Make the next backup of ``vm`` a full one (its dirty bitmap can no longer be trusted)."""

    @abc.abstractmethod
    def full_required(self, vm: str) -> str | None:
        """Why the next backup of ``vm`` must be full, or None."""

    @abc.abstractmethod
    def clear_full_required(self, vm: str) -> None:
        """A full backup was committed: incrementals may follow it again."""

    # -- writing -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def usable_parent(self, manifest: Manifest) -> str | None:
        """Why ``manifest`` cannot be the parent of an incremental (qcow2: its chain is broken; chunks: an
        index is missing), or None when it can."""

    @abc.abstractmethod
    def begin_backup(self, vm: str, parent: Manifest | None, *, runner: Runner | None = None) -> BackupWriter:
        """Start a new backup of ``vm`` (caller holds the VM's lock).

        :param parent: the parent of an incremental, or None
        :param runner: where the machine's files are (file sources are read there)
        :raise RepositoryError: the repository cannot be written
        """

    # -- restore, verify, prune, gc ------------------------------------------------------------------

    @abc.abstractmethod
    def restore(
        self,
        vm: str,
        backup_id: str | None,
        to: Path,
        *,
        disks: Sequence[str] = (),
        progress: DiskProgress = no_progress,
        format: RestoreFormat = "qcow2",
        devices: Mapping[str, Path] | None = None,
    ) -> tuple[Manifest, list[RestoredDisk]]:
        """Write standalone, checked images of a backup (the latest when ``backup_id`` is None):
        ``to/<disk>.qcow2`` (or ``.raw``, sparse), or onto block devices; nothing is overwritten, and an
        image gets its final name only once every byte is checked.

        :param disks: restore only these disks (default: all)
        :param devices: disk name → a block device to write that disk onto instead of a file
        :raise NotFoundError: no such VM, backup or disk
        :raise ChecksumMismatchError: content does not match (DamagedChunkError: names the chunk and who
            uses it); no file is left
        :raise VmsnapError: a target file exists already
        """

    @abc.abstractmethod
    def verify(
        self,
        vm: str | None = None,
        backup_id: str | None = None,
        *,
        reader: VerifyReader = "auto",
        fast: bool = False,
        progress: DiskProgress = no_progress,
        repair_from: Sequence[RepositoryLayout] = (),
    ) -> VerifyReport:
        """Re-read backups and check every checksum (and chain link); collect problems, never raise for them.

        :param fast: chunks: check only that every referenced chunk exists (one listing); qcow2: ignored
        :param repair_from: chunks: other repositories to store damaged or missing chunks again from
        :raise NotFoundError: the named VM or backup does not exist
        :raise UsageError: ``backup_id`` without ``vm``, or an unavailable reader
        """

    @abc.abstractmethod
    def delete_backup(self, vm: str, backup_id: str) -> None:
        """Remove one backup (caller holds the VM's lock); it is never listed half removed."""

    def plan_prune(self, vm: str, policy: RetentionPolicy | int) -> PruneResult:
        """Which backups of ``vm`` ``prune`` would remove (see :meth:`prune`)."""
        backups = self.backups(vm)
        if isinstance(policy, RetentionPolicy):
            return plan_policy(vm, backups, policy, chains=self.chains)
        return plan_retention(vm, backups, policy, chains=self.chains)

    def prune(self, vm: str, policy: RetentionPolicy | int, *, dry_run: bool = False) -> PruneResult:
        """Remove the backups of ``vm`` that ``policy`` does not keep (borg's rules; qcow2 also keeps the
        parents a kept backup needs). An int N keeps exactly the newest N (vmsnap 0.1's ``--keep-last``).
        Newest first, so a prune that dies half-way never leaves a broken chain.

        :raise UsageError: a policy that keeps nothing (or N below 1)
        :raise RepositoryError: another run holds the VM's lock, or a manifest of the VM is damaged
        """
        with self.lock(vm):
            plan = self.plan_prune(vm, policy)
            held = self.held_back(vm, plan.removed)
            if held:
                plan = attrs.evolve(
                    plan, removed=tuple(b for b in plan.removed if b not in held), locked=held
                )
            if not dry_run:
                for backup_id in reversed(plan.removed):
                    self.delete_backup(vm, backup_id)
            return plan

    def held_back(self, vm: str, backup_ids: Sequence[str]) -> dict[str, str]:
        """Which of these backups a lock still protects from ``prune`` (a locked repository), each with the
        date it becomes removable (UTC ISO 8601); none by default."""
        return {}

    @abc.abstractmethod
    def copy_in(
        self, source: RepositoryLayout, manifest: Manifest, *, progress: DiskProgress = no_progress
    ) -> CopiedBackup:
        """Write the backup ``manifest`` of ``source`` (a repository of any layout, read only through this
        interface) into this repository under its id, every byte checked; a copy is never the parent of a
        later incremental here (its ``bitmap`` is null). Nothing of it is kept when it fails. The caller
        (:func:`~vmsnap.repo.copy.copy_backups`) holds this repository's lock on the VM and a reader lease
        on ``source``.

        :raise ChecksumMismatchError: source content that does not check out
        """

    @abc.abstractmethod
    def gc(self, *, wait: float = 0.0, dry_run: bool = False) -> GcReport:
        """Delete stored data no backup needs (chunks: unreferenced chunks and dead runs' partial backups).

        :param wait: seconds to wait for running writers and readers (0: refuse at once)
        :raise LeaseError: a backup, prune, restore or another gc is running
        """


def disk_filter(manifest: Manifest, disks: Sequence[str]) -> Iterator[str]:
    """The names of ``disks`` (all of the backup's when empty), each checked to be in it.

    :raise NotFoundError: a disk the backup lacks
    """
    names = list(disks) or [d.name for d in manifest.disks]
    for name in names:
        manifest.disk(name)
    yield from names


def layout_names() -> list[str]:
    """The registered layout names, sorted."""
    return names(LAYOUT_GROUP)


def layout_class(name: str) -> type[RepositoryLayout]:
    """The layout class registered as ``name``.

    :raise UsageError: unknown name (with close matches)
    :raise PluginError: the module failed to import, or the class is no :class:`RepositoryLayout`
    """
    try:
        cls = load(LAYOUT_GROUP, name)
    except PluginError as err:
        if not name or name not in layout_names():
            raise UsageError(f"unknown repository layout {name!r}", hint=err.hint) from err
        raise
    if not isinstance(cls, type) or not issubclass(cls, RepositoryLayout):
        raise PluginError(
            f"layout {name!r} ({cls!r}) is no vmsnap.repo.layout.RepositoryLayout",
            hint="its package must subclass vmsnap.repo.layout.RepositoryLayout",
        )
    return cls
