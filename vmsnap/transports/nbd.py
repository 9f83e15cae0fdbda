"""The nbd transport: read a snapshot through a real NBD client (libnbd) into a local qcow2 or raw file.

File and block sources are served read-only by a private ``qemu-nbd``; "nbd" sources (QEMU's own NBD server,
pull mode) are read directly. With a dirty bitmap and a ``backing`` parent, only the extents the bitmap marks
dirty are read, into a qcow2 overlay whose backing file is the parent (a relative path): an incremental.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from vmsnap.errors import CommandError, TransferError, UsageError
from vmsnap.files import atomic_target, is_full
from vmsnap.image.nbd import (
    CHUNK,
    DIRTY,
    STATE_ZERO,
    QemuNbdServer,
    dirty_context,
    extents,
    libnbd,
    nbd_connection,
    pread,
)
from vmsnap.model import ExportSource, Progress, ThrottledProgress, TransferStats
from vmsnap.runner import LocalRunner, Runner
from vmsnap.transports.base import check_options, check_send, write_failed

GRANULE = 64 * 1024
"""Zero detection works on runs of this many bytes (the default qcow2 cluster size)."""

_ZEROS = bytes(GRANULE)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in ranges:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((offset, length))
    return merged


def _runs(data: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, length, is_zero) runs of ``data`` at GRANULE resolution."""
    view = memoryview(data)
    start, zero = 0, None
    for pos in range(0, len(data), GRANULE):
        piece = view[pos : pos + GRANULE]
        is_zero = piece == _ZEROS[: len(piece)]
        if zero is None:
            zero = is_zero
        elif is_zero != zero:
            yield start, pos - start, zero
            start, zero = pos, is_zero
    if zero is not None:
        yield start, len(data) - start, zero


class NbdTransport:
    """Copies a source through NBD into a new local image (0600, fsync'd, renamed into place when complete).

    :param runner: runs qemu-nbd / qemu-img on this host
    :param output_format: "qcow2" (default) or "raw"; incrementals are always qcow2
    :param backing: the parent backup's file; with a source ``dirty_bitmap`` the target becomes an overlay
        on it holding only the dirty extents (``send(..., backing=…)`` overrides it per call)
    :param tcp: serve file/block sources on 127.0.0.1 TCP instead of a private unix socket
    :param poll_interval: seconds between progress reports
    :raise UsageError: unknown options or output format
    """

    name: ClassVar[str] = "nbd"
    preference: ClassVar[int] = 20
    incremental: ClassVar[bool] = True

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        output_format: str = "qcow2",
        backing: Path | str | None = None,
        tcp: bool = False,
        poll_interval: float = 0.25,
        **unknown: Any,
    ) -> None:
        output_format = check_options(
            "nbd", unknown, ("output_format", "backing", "tcp", "poll_interval"), output_format
        )
        self.runner: Runner = runner or LocalRunner()
        self.output_format = output_format
        self.backing = Path(backing) if backing is not None else None
        self.tcp = tcp
        self.poll_interval = poll_interval
        self.last_dirty_bytes = 0

    def accepts(self, source: ExportSource) -> bool:
        """True for "file", "block" and "nbd" sources."""
        return source.kind in ("file", "block", "nbd")

    @contextlib.contextmanager
    def _source_uri(self, source: ExportSource) -> Iterator[str]:
        if source.kind == "nbd":
            yield source.location
            return
        server = QemuNbdServer.for_source(source, runner=self.runner)
        server.tcp = self.tcp
        with server:
            yield server.uri

    def send(
        self,
        source: ExportSource,
        target: Path | str,
        *,
        progress: Progress,
        backing: Path | str | None = None,
    ) -> TransferStats:
        """Copy ``source`` into ``target``: everything (full), or only its dirty extents (incremental).

        :param backing: overrides the constructor's ``backing`` for this call
        :raise UsageError: a backing parent without a dirty bitmap, or raw output for an incremental
        :raise NotFoundError: the source, the parent, or the target's directory does not exist
        :raise TransferError: the NBD server is unreachable, lacks the bitmap, or the target is full;
            no partial target is left
        """
        check_send(self, source, target, backing=backing)
        target = Path(target)
        parent = Path(backing) if backing is not None else self.backing
        incremental = parent is not None
        if incremental:
            if not source.dirty_bitmap:
                raise UsageError(
                    f"an incremental copy of {source.location} needs the source's dirty bitmap",
                    hint="export the snapshot with its dirty bitmap, or make a full backup",
                )
            if self.output_format != "qcow2":
                raise UsageError("incremental copies are qcow2 overlays", hint="use output_format='qcow2'")
            assert parent is not None
            if not parent.is_file():
                raise TransferError(
                    f"the parent image {parent} of the incremental does not exist",
                    hint="make a full backup first",
                )
        fmt = "qcow2" if incremental else self.output_format
        context = dirty_context(source.dirty_bitmap or "") if incremental else "base:allocation"
        started = time.monotonic()
        with self._source_uri(source) as uri, atomic_target(target) as partial:
            self._create(partial, fmt, source.virtual_size, parent)
            with QemuNbdServer(partial, fmt, read_only=False, runner=self.runner) as sink:
                written = self._copy(uri, sink.uri, context, incremental, progress, target)
        return TransferStats(written, time.monotonic() - started, str(target), fmt)

    def _create(self, path: Path, fmt: str, size: int, parent: Path | None) -> None:
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if parent is not None:
            backing = os.path.relpath(parent, path.parent)
            argv += ["-b", backing, "-F", "qcow2"]
        try:
            self.runner.run([*argv, str(path), str(size)], timeout=120)
        except CommandError as err:
            raise write_failed("creating the target image", path, err.stderr) from err

    def _copy(
        self,
        source_uri: str,
        sink_uri: str,
        context: str,
        incremental: bool,
        progress: Progress,
        target: Path,
    ) -> int:
        nbd = libnbd()
        with nbd_connection(source_uri, contexts=[context]) as src, nbd_connection(sink_uri) as dst:
            size = int(src.get_size())
            if dst.get_size() < size:
                raise TransferError(f"the target image {target} is smaller than the source ({size} bytes)")
            if incremental and not src.can_meta_context(context):
                raise TransferError(
                    f"the NBD export {source_uri} does not expose {context}",
                    hint="export the snapshot with its dirty bitmap (block-export-add bitmaps / qemu-nbd -B)",
                )
            wanted: list[tuple[int, int]] = []
            for offset, length, flags in extents(src, context, end=size):
                if (flags & DIRTY) if incremental else not (flags & STATE_ZERO):
                    wanted.append((offset, length))
            ranges = _merge(wanted)
            total = sum(length for _, length in ranges)
            self.last_dirty_bytes = total
            report = ThrottledProgress(progress, max(total, 1), interval=self.poll_interval)
            report(0, final=True)
            done = written = 0
            try:
                for offset, length in ranges:
                    pos, end = offset, offset + length
                    while pos < end:
                        step = min(CHUNK, end - pos)
                        data = pread(src, step, pos)
                        for start, run, zero in _runs(data):
                            if not zero:
                                dst.pwrite(data[start : start + run], pos + start)
                                written += run
                            elif incremental:  # a dirty range that is now zero must hide the parent's data
                                dst.zero(run, pos + start)
                        pos += step
                        done += step
                        report(done)
                dst.flush()
            except nbd.Error as err:
                if err.errno is not None and is_full(OSError(err.errno, err.string)):
                    raise write_failed("NBD copy", target, "No space left on device") from err
                raise write_failed("NBD copy", target, str(err.string)) from err
            report(max(total, 1), final=True)
            return written
