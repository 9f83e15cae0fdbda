"""The throughput workload that vmsnap's run and the peers' run share, so both measure the same thing.

A qcow2 holding incompressible data in 4 MiB chunks at scattered offsets (holes left between), and the same
rounds of 4 MiB writes at the same pseudo-random offsets before each incremental backup. A timed operation
is a :class:`ThroughputFigure` (median seconds over its runs, and the data it moved).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from vmsnap.files import fsync_dir, fsync_file
from vmsnap.runner import LocalRunner

MiB = 1024 * 1024
CHUNK = 4 * MiB

DURABLE_COPY = "qemu-img convert + fsync (the durable copy)"
"""The anchor backup and restore figures are divided by: the image copied with its output made durable, as
vmsnap's are (not the hardware's limit: a copy that needs no fsync would be faster)."""

IMAGE_SEED = 1
"""Seed of the data chunks' offsets in the test image."""

WRITES_SEED = 7
"""Seed of the offsets written between incremental backups (the same for vmsnap and the peers)."""


@attrs.frozen
class ThroughputFigure:
    """One timed operation: median seconds over ``runs``, the data it moved, and (when measured) the median
    CPU seconds (user+sys) of every process involved (:mod:`vmsnap.benchmark.cpu`)."""

    name: str
    seconds: float
    runs: tuple[float, ...]
    data_bytes: int
    cpu_seconds: float | None = None

    @property
    def mb_per_s(self) -> float:
        return self.data_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def cpu_per_gib(self) -> float | None:
        """CPU seconds per GiB of data moved."""
        if self.cpu_seconds is None or not self.data_bytes:
            return None
        return self.cpu_seconds / (self.data_bytes / 2**30)


def make_test_image(path: Path, *, size_mib: int, data_mib: int, seed: int = IMAGE_SEED) -> int:
    """A qcow2 of ``size_mib`` with ``data_mib`` of random data in 4 MiB chunks at scattered offsets.

    :return: bytes of data written
    :raise CommandError: qemu-img could not convert the raw image
    """
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    slots = sorted(rng.sample(range(size_mib * MiB // CHUNK), data_mib * MiB // CHUNK))
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(size_mib * MiB)
        for slot in slots:
            f.seek(slot * CHUNK)
            f.write(os.urandom(CHUNK))
    LocalRunner().run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], timeout=1200)
    raw.unlink()
    return len(slots) * CHUNK


def incremental_rounds(runs: int) -> int:
    """How many incremental backups a run takes (at least three, so that a restore walks a chain)."""
    return max(3, runs)


def incremental_writes(*, size_mib: int, incremental_mib: int, runs: int) -> Iterator[Sequence[str]]:
    """Per incremental round, the ``qemu-io`` commands that change ``incremental_mib`` of the disk first:
    ``write -P PATTERN OFFSET 4194304``, each round its own pattern, offsets from :data:`WRITES_SEED`.

    Draw the rounds in order (the offsets of a round depend on the ones drawn before).
    """
    rng = random.Random(WRITES_SEED)  # noqa: S311 - test data
    slots = size_mib * MiB // CHUNK
    for round_ in range(incremental_rounds(runs)):
        yield [
            f"write -P {0x40 + round_} {rng.randrange(slots) * CHUNK} {CHUNK}"
            for _ in range(incremental_mib * MiB // CHUNK)
        ]


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself) and its directories: what vmsnap's figures and
    ``qemu-img convert``'s include, so that each figure ends with the data on disk."""
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for item in paths:
        if item.is_symlink():
            continue
        if item.is_dir():
            fsync_dir(item)
        elif item.is_file():
            fsync_file(item)


def filesystem_image(path: Path, *, size_mib: int, source: Path | None = None) -> int:
    """A raw ext4 image of ``size_mib`` holding a copy of ``source`` (default: /usr/share, or /usr/share/doc
    in a disk under 1.5 GiB); returns the bytes of data it holds (allocated blocks)."""
    source = source or Path("/usr/share" if size_mib >= 1536 else "/usr/share/doc")
    LocalRunner().run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(source),
            str(path),
            f"{size_mib}M",
        ],
        timeout=1200,
    )
    return os.stat(path).st_blocks * 512
