"""What the soak expects: the VM's disks as bytes (every write the soak made, replayable from the log), the
content each backup must hold (the disks' sha256 at its snapshot instant), and which backups each
repository must list after an operation, given how that operation ended.

Writes happen only between operations, so a backup's snapshot instant is well defined: the disks hold what
they held when the operation started. A backup that a killed or failed command may have sealed (its manifest
put landed) is adopted with that content when it shows up; one that never shows up is not expected.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import attrs

MiB = 1024 * 1024
CHUNK = 4 * MiB
"""The chunks layout's chunk size: writes that cover whole chunks make duplicates and holes."""

WriteKind = Literal["random", "pattern", "zero", "copy"]


@attrs.frozen
class DiskSpec:
    """One data disk of the soak's VM."""

    name: str
    size: int
    bus: Literal["virtio", "scsi"]


@attrs.frozen
class Write:
    """One guest write: ``random`` bytes from ``seed``, a ``pattern`` byte, ``zero``\\ es, or a ``copy`` of
    ``length`` bytes from ``source`` on the same disk (a duplicate chunk for deduplication)."""

    disk: str
    kind: WriteKind
    offset: int
    length: int
    seed: int = 0
    pattern: int = 0
    source: int = 0

    def describe(self) -> str:
        what = {
            "random": f"random(seed={self.seed})",
            "pattern": f"pattern 0x{self.pattern:02x}",
            "zero": "zeroes",
            "copy": f"copy of @{self.source}",
        }[self.kind]
        return f"{self.disk} {self.offset}+{self.length} {what}"


def write_bytes(write: Write, disk: bytes | bytearray) -> bytes:
    """The bytes ``write`` puts on a disk that holds ``disk`` before it."""
    if write.kind == "random":
        return random.Random(write.seed).randbytes(write.length)
    if write.kind == "pattern":
        return bytes([write.pattern]) * write.length
    if write.kind == "zero":
        return bytes(write.length)
    return bytes(disk[write.source : write.source + write.length])


@attrs.frozen
class Content:
    """What the disks held at one instant: the write log's position and each disk's sha256."""

    version: int
    sha256: Mapping[str, str]


class Disks:
    """The VM's disks as the soak wrote them: a bytearray per disk and the log of every write."""

    def __init__(self, specs: Sequence[DiskSpec]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self._data = {spec.name: bytearray(spec.size) for spec in specs}
        self.log: list[Write] = []
        self._content: Content | None = None

    @property
    def version(self) -> int:
        return len(self.log)

    def apply(self, write: Write) -> bytes:
        """Record ``write`` and return the bytes it writes (to send to the VM)."""
        disk = self._data[write.disk]
        data = write_bytes(write, disk)
        disk[write.offset : write.offset + write.length] = data
        self.log.append(write)
        self._content = None
        return data

    def content(self) -> Content:
        """The disks' content now (cached until the next write)."""
        if self._content is None:
            self._content = Content(
                self.version, {name: hashlib.sha256(data).hexdigest() for name, data in self._data.items()}
            )
        return self._content

    def replay(self, version: int) -> dict[str, bytearray]:
        """The disks as they were after the first ``version`` writes (for a mismatch's report)."""
        disks = {name: bytearray(spec.size) for name, spec in self.specs.items()}
        for write in self.log[:version]:
            disks[write.disk][write.offset : write.offset + write.length] = write_bytes(
                write, disks[write.disk]
            )
        return disks

    def random_writes(self, rng: random.Random) -> list[Write]:
        """A few writes of random kinds, sizes and places (sector-aligned; some whole chunks)."""
        writes = []
        for _ in range(rng.randint(1, 5)):
            spec = rng.choice(list(self.specs.values()))
            whole = rng.random() < 0.3
            if whole:  # whole chunks: duplicates, holes and chunks replaced entirely
                chunks = (spec.size + CHUNK - 1) // CHUNK
                first = rng.randrange(chunks)
                offset = first * CHUNK
                length = min(rng.randint(1, 2) * CHUNK, spec.size - offset)
            else:
                length = 512 * rng.randint(1, rng.choice((8, 256, 4096)))
                length = min(length, spec.size)
                offset = 512 * rng.randrange((spec.size - length) // 512 + 1)
            kind: WriteKind = rng.choices(("random", "pattern", "zero", "copy"), (55, 20, 15, 10))[0]
            source = 0
            if kind == "copy":
                source = CHUNK * rng.randrange((spec.size - length) // CHUNK + 1) if whole else 0
                if not whole:
                    source = 512 * rng.randrange((spec.size - length) // 512 + 1)
            writes.append(
                Write(
                    spec.name,
                    kind,
                    offset,
                    length,
                    seed=rng.getrandbits(64),
                    pattern=rng.randrange(1, 256),
                    source=source,
                )
            )
        return writes


def differing_chunks(expected: bytes | bytearray, actual_path: str, *, limit: int = 8) -> list[int]:
    """The indexes of the 4 MiB chunks in which the file ``actual_path`` differs from ``expected`` (at most
    ``limit``; a file of another length differs in its last chunk too)."""
    found: list[int] = []
    with open(actual_path, "rb") as actual:
        index = 0
        while index * CHUNK < max(len(expected), 1):
            got = actual.read(CHUNK)
            if got != bytes(expected[index * CHUNK : (index + 1) * CHUNK]):
                found.append(index)
                if len(found) >= limit:
                    break
            index += 1
        if actual.read(1) and len(found) < limit:
            found.append(index)
    return found


@attrs.define
class Reconciled:
    """What :meth:`RepoModel.reconcile` found: backups adopted, backups gone as allowed, and problems."""

    adopted: list[str] = attrs.Factory(list)
    gone: list[str] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)


@attrs.define
class RepoModel:
    """The backups one repository must hold: backup id → the content it must restore to."""

    name: str
    backups: dict[str, Content] = attrs.Factory(dict)
    checked: dict[str, int] = attrs.Factory(dict)
    """How often each backup was restored and found exact."""
    unchecked: list[str] = attrs.Factory(list)
    """Backups adopted after a kill or failure, not restored yet (restored first)."""

    def reconcile(
        self,
        listed: Iterable[str],
        *,
        new: Mapping[str, Content] = {},
        must_appear: Iterable[str] = (),
        may_appear_one: Content | None = None,
        may_vanish: Iterable[str] = (),
        must_vanish: Iterable[str] = (),
    ) -> Reconciled:
        """Compare what the repository lists now with the model after one operation and update the model.

        :param new: ids the operation may have added, with their content (copy: the source's backups)
        :param must_appear: ids among ``new`` that must be listed now (it reported them done)
        :param may_appear_one: one backup of unknown id may have appeared with this content (a backup that
            was killed or failed after its manifest may have been put)
        :param may_vanish: ids the operation may have removed (a prune that was killed or failed)
        :param must_vanish: ids that must be gone now (a prune reported them removed)
        """
        result = Reconciled()
        listed_set = set(listed)
        known = set(self.backups)
        allowed_vanish = set(may_vanish) | set(must_vanish)
        for backup_id in sorted(known - listed_set):
            if backup_id in allowed_vanish:
                result.gone.append(backup_id)
                del self.backups[backup_id]
                self.checked.pop(backup_id, None)
                if backup_id in self.unchecked:
                    self.unchecked.remove(backup_id)
            else:
                result.problems.append(f"{self.name}: backup {backup_id} vanished")
        for backup_id in sorted(set(must_vanish) & listed_set):
            result.problems.append(f"{self.name}: backup {backup_id} was reported removed but is listed")
        for backup_id in sorted(set(must_appear) - listed_set):
            result.problems.append(f"{self.name}: backup {backup_id} was reported done but is not listed")
        unknown_allowed = may_appear_one
        for backup_id in sorted(listed_set - known):
            if backup_id in new:
                self.backups[backup_id] = new[backup_id]
                if backup_id not in set(must_appear):
                    result.adopted.append(backup_id)
                    self.unchecked.append(backup_id)
            elif unknown_allowed is not None:
                self.backups[backup_id] = unknown_allowed
                result.adopted.append(backup_id)
                self.unchecked.append(backup_id)
                unknown_allowed = None
            else:
                result.problems.append(f"{self.name}: backup {backup_id} appeared, no operation made it")
        return result
