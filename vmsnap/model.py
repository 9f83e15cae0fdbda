"""Frozen value types shared by machines, strategies, transports and the repository.

Nothing here does I/O; these are the nouns the rest of vmsnap passes around.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import attrs

from vmsnap.errors import UsageError


def _as_dict(mapping: Mapping[str, str]) -> dict[str, str]:
    return dict(mapping)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def validate_name(name: str, what: str = "name") -> str:
    """Check that ``name`` can safely become one path component (no '/', no '..', no leading dot).

    :raise UsageError: when it cannot
    """
    if not _NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"invalid {what} {name!r}",
            hint="use letters, digits, '.', '_', '+' and '-' (at most 128, not starting with '.' or '-')",
        )
    return name


def validate_seconds(seconds: float, what: str, *, zero: bool = True) -> float:
    """Check that ``seconds`` is a finite duration (0 or more; above 0 unless ``zero``): ``inf`` would
    overflow a socket's timeout, and ``nan`` compares false with every deadline.

    :raise UsageError: when it is not
    """
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        least = "0 or more" if zero else "above 0"
        raise UsageError(f"{what} {seconds!r} is not a finite number of seconds, {least}")
    return seconds


ImageFormat = Literal["qcow2", "raw"]


@attrs.frozen
class Disk:
    """One virtual disk of a machine, as QEMU (or the image on disk) describes it.

    :param name: the stable short name used in backups (qdev id, libvirt target, or image stem)
    :param node_name: the block node QMP commands address (format node), "" for offline images
    :param file: the image file (or block device) of the active layer
    :param format: "qcow2" or "raw"
    :param virtual_size: guest-visible size in bytes
    :param backing_chain: the backing files below ``file``, nearest first
    :param qdev: the guest device's qdev id or QOM path, when attached to a device
    :param file_node: the protocol node under ``node_name`` (QMP), "" when unknown
    """

    name: str
    node_name: str
    file: Path
    format: str
    virtual_size: int
    backing_chain: tuple[Path, ...] = ()
    qdev: str | None = None
    file_node: str = ""
    read_only: bool = False


@attrs.frozen
class SnapshotRef:
    """A snapshot of one disk as a strategy made it; the strategy needs nothing else to export or delete it.

    :param strategy: the strategy's registered name
    :param name: the snapshot's name (unique per disk)
    :param disk: the disk as it was when the snapshot was created
    :param location: where the snapshot lives (overlay file, target image, LV path, subvolume) or ""
    :param details: strategy-specific strings (node names, bitmap names, job ids)
    """

    strategy: str
    name: str
    disk: Disk
    location: str = ""
    details: Mapping[str, str] = attrs.field(factory=dict, converter=_as_dict)


ExportKind = Literal["file", "block", "nbd"]


@attrs.frozen
class ExportSource:
    """What a transport reads from: an image file, a block device, or an NBD URI.

    :param kind: "file", "block" or "nbd"
    :param location: the path or ``nbd+unix:///export?socket=…`` URI
    :param format: the format of what is read ("qcow2" or "raw"); NBD exports are always raw
    :param disk: the disk this is a snapshot of
    :param virtual_size: guest-visible size in bytes
    :param image_opts: extra ``qemu-img --image-opts`` keys (e.g. ``snapshot.name``) for file sources
    :param force_share: read with ``-U`` because a running QEMU holds the image
    :param dirty_bitmap: for incremental NBD reads, the ``qemu:dirty-bitmap:NAME`` context to use
    :param since: the backup id whose content this source's changes are relative to (an incremental: only
        the extents ``dirty_bitmap`` marks differ from that backup), or None: the source is complete
    """

    kind: ExportKind
    location: str
    format: str
    disk: Disk
    virtual_size: int
    image_opts: Mapping[str, str] = attrs.field(factory=dict, converter=_as_dict)
    force_share: bool = False
    dirty_bitmap: str | None = None
    since: str | None = None


@attrs.frozen
class Traits:
    """A strategy's row of the classic comparison table, as data (``vmsnap strategies`` prints it)."""

    qemu_command: str
    libvirt_command: str
    os_command: str
    snapshot_is: str
    scope: Literal["one VM", "all storage"]
    technology: str
    copy_out: str
    write_cost: str
    delete_cost: str
    rollback_cost: str

    @staticmethod
    def columns() -> tuple[tuple[str, str], ...]:
        """(field, heading) pairs in table order."""
        return (
            ("qemu_command", "QEMU command"),
            ("libvirt_command", "libvirt command"),
            ("os_command", "OS command"),
            ("snapshot_is", "snapshot is"),
            ("scope", "scope"),
            ("technology", "technology"),
            ("copy_out", "copied out by"),
            ("write_cost", "write cost while it exists"),
            ("delete_cost", "storage load on delete"),
            ("rollback_cost", "storage load on rollback"),
        )


@attrs.frozen
class TransferStats:
    """What a transport moved: bytes written to the target, seconds spent, and the target's format."""

    bytes_written: int
    seconds: float
    target: str
    format: str = "qcow2"


Progress = Callable[[int, int], None]
"""Progress callback: (bytes done, bytes total). The library calls it; only the CLI draws anything."""


def no_progress(done: int, total: int) -> None:
    """A Progress that ignores its calls."""


class ThrottledProgress:
    """Wraps a :data:`~vmsnap.model.Progress` callback so it is called at most every ``interval`` seconds
    (and always for the first and the final call), with ``done`` never going backwards."""

    def __init__(self, progress: Progress, total: int, *, interval: float = 0.25) -> None:
        self._progress = progress
        self.total = total
        self._interval = interval
        self._last_call = -interval
        self._done = -1

    def __call__(self, done: int, *, final: bool = False) -> None:
        """Report ``done`` bytes (clamped to the total); ``final`` forces the call."""
        done = max(min(done, self.total), self._done, 0)
        now = time.monotonic()
        if final or now - self._last_call >= self._interval:
            if done != self._done or final:
                self._progress(done, self.total)
            self._last_call = now
            self._done = done
