"""``copy``: backups from one repository into another, of either layout and on any store (off-site copies,
migration between layouts). A backup keeps its id; one the target has already is skipped.

- chunks → chunks: only the chunks the target lacks are sent; each is checked (decoded against its id)
  first. The blob is sent as it is when both repositories name chunks alike (both unencrypted, or the same
  key); otherwise it is re-encoded with the target's key (new ids, a rewritten index).
- qcow2 → chunks: each disk's image (its chain) is read through qemu-nbd into the target's pipeline, and
  every chunk read is checked against the source's chunk digests as it passes.
- chunks → qcow2, qcow2 → qcow2: the target gets standalone images (a full backup each), written and
  checked as a restore is.

A copy never serves as the parent of a later incremental in the target (its ``bitmap`` is null): the VM's
dirty bitmap belongs to the source repository's chain.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable

import attrs

from vmsnap.errors import ChecksumMismatchError, DamagedChunkError, UsageError
from vmsnap.files import write_atomic
from vmsnap.image.digest import ChunkDigests, zero_digest
from vmsnap.repo.chunks.blob import ID_SIZE, ChunkId, chunk_key
from vmsnap.repo.chunks.index import HOLE, ChunkIndex, encode_index
from vmsnap.repo.chunks.parallel import BoundedPool
from vmsnap.repo.chunks.pipeline import backup_disk
from vmsnap.repo.chunks.readers import open_image
from vmsnap.repo.chunks.records import encode_manifest, index_key, manifest_key
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.chunks.restore import RestoreProgress, restore_disk
from vmsnap.repo.layout import DEFINITION_FILE, RepositoryLayout
from vmsnap.repo.manifest import CHUNKS_FORMAT, INDEX_DIGEST, ChunkStats, DiskRecord, Manifest
from vmsnap.repo.progress import DiskProgress, no_progress
from vmsnap.repo.qcow2_repo import Qcow2Repository
from vmsnap.repo.reports import CopiedBackup, CopyReport

WORKERS = 4


def copy_backups(
    source: RepositoryLayout,
    target: RepositoryLayout,
    *,
    vm: str | None = None,
    backup_id: str | None = None,
    progress: DiskProgress = no_progress,
) -> CopyReport:
    """Copy the backups of ``vm`` (all VMs when None; only ``backup_id`` when given) from ``source`` into
    ``target``, oldest first, under a reader lease on the source and each VM's writer lock on the target.

    :raise UsageError: ``backup_id`` without ``vm``, or the same repository twice
    :raise NotFoundError: no such VM or backup
    :raise ChecksumMismatchError: source content that does not check out (nothing of that backup is kept)
    :raise LeaseError: the target's VM is being written, or gc runs on either
    """
    if backup_id is not None and vm is None:
        raise UsageError("--backup needs --vm", hint="name the VM the backup belongs to")
    if source.location == target.location:
        raise UsageError("copy needs two different repositories", hint="check --from and --to")
    copied: list[CopiedBackup] = []
    with source.reading(vm):
        chosen = (
            [source.get(vm, backup_id)] if vm is not None and backup_id is not None else source.backups(vm)
        )
        if vm is not None and not chosen:
            source.get(vm)  # raises NotFoundError naming the VMs there are
        for name, group in itertools.groupby(chosen, key=lambda m: m.vm):
            with target.lock(name):
                have = {m.backup_id for m in target.backups(name)}
                for manifest in group:
                    if manifest.backup_id in have:
                        copied.append(CopiedBackup(manifest.vm, manifest.backup_id, False))
                    else:
                        copied.append(_copy_one(source, target, manifest, progress))
    return CopyReport(tuple(copied))


def _copy_one(
    source: RepositoryLayout, target: RepositoryLayout, manifest: Manifest, progress: DiskProgress
) -> CopiedBackup:
    if isinstance(target, ChunksRepository):
        into = _ChunksTarget(target, manifest)
        try:
            if isinstance(source, ChunksRepository):
                for record in manifest.disks:
                    into.add_from_chunks(source, record, progress)
            elif isinstance(source, Qcow2Repository):
                for record in manifest.disks:
                    into.add_from_image(source, record, progress)
            into.seal(source.definition(manifest))
        except BaseException:
            target.discard_backup(manifest.vm, manifest.backup_id)
            raise
        return CopiedBackup(manifest.vm, manifest.backup_id, True, into.sent_chunks, into.sent_bytes)
    if isinstance(target, Qcow2Repository):
        return _copy_to_images(source, target, manifest, progress)
    raise UsageError(f"copy into a {target.name} repository is not supported")


@attrs.define
class _ChunksTarget:
    """One backup being copied into a chunks repository."""

    repo: ChunksRepository
    manifest: Manifest
    records: list[DiskRecord] = attrs.Factory(list)
    present: set[ChunkId] | None = None
    sent_chunks: int = 0
    sent_bytes: int = 0
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def _present(self) -> set[ChunkId]:
        if self.present is None:
            self.present = self.repo.present_chunks()
        return self.present

    def add_from_chunks(self, source: ChunksRepository, record: DiskRecord, progress: DiskProgress) -> None:
        """Send the chunks of one disk the target lacks (checked first), then its index."""
        index = source.index(self.manifest, record.name)
        same_ids = (source.marker.key_id, source.marker.chunk_id) == (
            self.repo.marker.key_id,
            self.repo.marker.chunk_id,
        )
        present = self._present()
        mapping: dict[ChunkId, ChunkId] = {}
        lengths = {chunk_id: index.length(n) for n, chunk_id in index.data_chunks()}
        done = [0]

        def send(chunk_id: ChunkId) -> None:
            blob = source.chunk_blob(chunk_id)
            try:
                data = source.codec.decode(blob, chunk_id, length=lengths[chunk_id])
            except DamagedChunkError as err:
                raise source.name_users(err) from err
            new_id = chunk_id if same_ids else self.repo.codec.chunk_id(data)
            stored = 0
            if new_id not in present:
                out = blob if same_ids else self.repo.codec.encode(data, new_id)
                if self.repo.store.put(chunk_key(new_id), out, if_absent=True):
                    stored = len(out)
            with self.lock:
                mapping[chunk_id] = new_id
                present.add(new_id)
                if stored:
                    self.sent_chunks += 1
                    self.sent_bytes += stored
                done[0] += lengths[chunk_id]
                progress(record.name, done[0], record.virtual_size)

        if same_ids:  # nothing to rename: send only what is missing
            todo = [c for c in lengths if c not in present]
            mapping.update((c, c) for c in lengths)
        else:
            todo = list(lengths)
        BoundedPool(send, workers=WORKERS, depth=2 * WORKERS).run(todo)
        ids = bytearray(index.ids)
        for number, chunk_id in index.data_chunks():
            ids[number * ID_SIZE : (number + 1) * ID_SIZE] = mapping[chunk_id]
        self._put_index(record, ChunkIndex(index.virtual_size, bytes(ids)), bytes_read=0)

    def add_from_image(self, source: Qcow2Repository, record: DiskRecord, progress: DiskProgress) -> None:
        """Read one disk's image chain through the pipeline, each chunk checked against its digest."""
        expected = source.chunk_digests(self.manifest, record.name)
        problems: list[int] = []

        def check(number: int, data: bytes | bytearray | memoryview) -> None:
            if hashlib.sha256(data).digest() != expected.chunk(number):
                problems.append(number)

        image = source.layout.image(self.manifest, record)
        with open_image(image, "qcow2", runner=source.runner) as reader:
            result = backup_disk(
                reader,
                self.repo.store,
                self.repo.codec,
                known=self._present(),
                inspect=check,
                progress=lambda state: progress(record.name, state.done, state.total),
            )
        problems += _unread_problems(result.index, expected)
        if problems:
            raise ChecksumMismatchError(
                f"{self.manifest.vm}/{self.manifest.backup_id}/{record.name}: {len(problems)} chunk(s) of "
                f"the source image do not match its digests (first: chunk {min(problems)})",
                hint="run `vmsnap verify` on the source repository; copy another backup",
            )
        self.sent_chunks += result.stats.new_chunks
        self.sent_bytes += result.stats.new_bytes
        self._present().update(result.index.referenced())
        self._put_index(record, result.index, bytes_read=result.stats.bytes_read)

    def _put_index(self, record: DiskRecord, index: ChunkIndex, *, bytes_read: int) -> None:
        data = encode_index(index, self.repo.key)
        self.repo.store.put(index_key(self.manifest.vm, self.manifest.backup_id, record.name), data)
        data_chunks = sum(1 for _ in index.data_chunks())
        stats = ChunkStats(
            logical_size=index.data_bytes(),
            bytes_read=bytes_read,
            new_chunks=0,
            new_bytes=0,
            reused_chunks=data_chunks,
            zero_chunks=len(index) - data_chunks,
            unchanged_chunks=0,
        )
        name = record.name
        self.records.append(
            DiskRecord(name, f"{name}.index", record.virtual_size, 0, hashlib.sha256(data).hexdigest(), stats)
        )

    def seal(self, definition: str | None) -> None:
        m = self.manifest
        definition_id = None
        if definition is not None:
            definition_id = self.repo.put_definition(m.vm, m.backup_id, definition)
        copied = attrs.evolve(
            m,
            bitmap=None,
            disks=tuple(self.records),
            format=CHUNKS_FORMAT,
            digest=INDEX_DIGEST,
            definition=definition_id,
        )
        self.repo.store.put(
            manifest_key(m.vm, m.backup_id), encode_manifest(copied, self.repo.key), if_absent=True
        )


def _unread_problems(index: ChunkIndex, expected: ChunkDigests) -> list[int]:
    """Chunks the pipeline did not read (holes by the map) whose digest is not that of zeros."""
    return [
        number
        for number in range(len(index))
        if index.chunk_id(number) == HOLE and expected.chunk(number) != zero_digest(index.length(number))
    ]


def _copy_to_images(
    source: RepositoryLayout, target: Qcow2Repository, manifest: Manifest, progress: DiskProgress
) -> CopiedBackup:
    """A standalone full backup in a qcow2 repository: each disk restored (checked) into its staging, then
    sealed as a backup of that repository."""
    target.discard_backup(manifest.vm, manifest.backup_id)  # what a copy that died left
    staging = target.stage(manifest.vm, manifest.backup_id)
    try:
        records = []
        for record in manifest.disks:
            image = staging / f"{record.name}.qcow2"
            if isinstance(source, ChunksRepository):
                index = source.index(manifest, record.name)
                try:
                    restore_disk(
                        index,
                        source.store,
                        source.codec,
                        image,
                        format="qcow2",
                        progress=_restore_progress(progress, record.name),
                        runner=target.runner,
                    )
                except DamagedChunkError as err:
                    raise source.name_users(err) from err
            elif isinstance(source, Qcow2Repository):
                source.layout.restore(manifest, staging, disks=[record.name], progress=progress)
            digest = target.digest_staged(staging, record.name, record.virtual_size)
            written = image.stat().st_blocks * 512
            records.append(DiskRecord(record.name, image.name, record.virtual_size, written, digest))
        definition = source.definition(manifest)
        if definition is not None:
            write_atomic(staging / DEFINITION_FILE, definition.encode("utf-8"))
        copied = Manifest(
            vm=manifest.vm,
            backup_id=manifest.backup_id,
            kind="full",
            parent=None,
            strategy=manifest.strategy,
            transport=manifest.transport,
            created=manifest.created,
            quiesced=manifest.quiesced,
            bitmap=None,
            disks=tuple(records),
        )
        target.commit(staging, copied)
    except BaseException:
        target.discard(staging)
        raise
    return CopiedBackup(manifest.vm, manifest.backup_id, True, 0, sum(r.bytes_written for r in records))


def _restore_progress(progress: DiskProgress, disk: str) -> Callable[[RestoreProgress], None]:
    def report(state: RestoreProgress) -> None:
        progress(disk, state.done, state.total)

    return report
