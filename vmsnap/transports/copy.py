"""The copy transport: a full, sparse copy of a file, block-device or NBD source into a local target file.

qcow2 (default) or raw output through ``qemu-img convert`` (holes stay holes). A raw file to raw, or a
standalone qcow2 file (no backing file, no internal snapshots) to qcow2 on the same filesystem, goes through
``cp --reflink=auto --sparse=always`` instead, so Btrfs/XFS clone its extents rather than copying them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from vmsnap.errors import CommandError, TransferError
from vmsnap.files import allocated_bytes, atomic_target
from vmsnap.image import qemu_img
from vmsnap.image.qemu_img import source_args
from vmsnap.model import ExportSource, Progress, ThrottledProgress, TransferStats
from vmsnap.runner import CommandResult, LocalRunner, Runner
from vmsnap.transports.base import check_options, check_send, write_failed


class CopyTransport:
    """Copies a whole "file", "block" or "nbd" source into a new local image (0600, fsync'd, atomic rename).

    :param runner: runs qemu-img / cp; must be this host (the target is a local path)
    :param output_format: "qcow2" (default) or "raw"
    :param reflink: copy plain image files with ``cp --reflink=auto`` when that gives the wanted image
        (raw → raw; a standalone qcow2 → qcow2 on the same filesystem), so Btrfs/XFS clone extents
    :param poll_interval: seconds between progress reports
    :raise UsageError: unknown options or output format
    """

    name: ClassVar[str] = "copy"
    preference: ClassVar[int] = 10
    incremental: ClassVar[bool] = False

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        output_format: str = "qcow2",
        reflink: bool = True,
        poll_interval: float = 0.25,
        **unknown: Any,
    ) -> None:
        output_format = check_options(
            "copy", unknown, ("output_format", "reflink", "poll_interval"), output_format
        )
        self.runner: Runner = runner or LocalRunner()
        self.output_format = output_format
        self.reflink = reflink
        self.poll_interval = poll_interval

    def accepts(self, source: ExportSource) -> bool:
        """True for "file", "block" and "nbd" sources without a dirty bitmap (a source with one is an
        incremental: the nbd transport's job)."""
        return source.kind in ("file", "block", "nbd") and not source.dirty_bitmap

    def argv(self, source: ExportSource, target: Path) -> list[str]:
        """The command that writes ``source`` into ``target``."""
        if self._cloneable(source, target):
            return ["cp", "--reflink=auto", "--sparse=always", "--", source.location, str(target)]
        return ["qemu-img", "convert", "-O", self.output_format, *source_args(source), str(target)]

    def _cloneable(self, source: ExportSource, target: Path) -> bool:
        """True when copying the source file byte for byte gives the wanted image, cheaply.

        Raw to raw always (cp keeps holes). qcow2 to qcow2 only when nothing but the guest data would come
        along (no backing file, no internal snapshots), nothing writes the file (not ``force_share``), and
        the target shares the source's filesystem (a clone is free there; elsewhere convert compacts).
        """
        if not self.reflink or source.kind != "file" or source.image_opts or source.force_share:
            return False
        if source.format != self.output_format:
            return False
        if source.format == "raw":
            return True
        try:
            if os.stat(source.location).st_dev != os.stat(target.parent).st_dev:
                return False
            info = qemu_img.info(
                self.runner, source.location, fmt="qcow2", force_share=False
            )  # fails if QEMU holds it
        except (OSError, CommandError, ValueError):
            return False
        return not info.get("backing-filename") and not info.get("snapshots")

    def _estimate(self, source: ExportSource) -> int:
        """Bytes the target will roughly occupy (``qemu-img measure``), for the progress total."""
        try:
            result = self.runner.run(
                ["qemu-img", "measure", "--output=json", "-O", "qcow2", *source_args(source)], timeout=120
            )
            return max(int(json.loads(result.stdout)["required"]), 1)
        except (CommandError, ValueError, KeyError):
            return max(source.virtual_size, 1)

    def send(
        self,
        source: ExportSource,
        target: Path | str,
        *,
        progress: Progress,
        backing: Path | str | None = None,
    ) -> TransferStats:
        """Copy ``source`` into ``target`` (a local path).

        :raise UnsupportedError: an unknown source kind
        :raise NotFoundError: the source or the target's directory does not exist
        :raise TransferError: the copy failed (full target, unreadable source); no partial target is left
        """
        check_send(self, source, target, backing=backing)
        target = Path(target)
        started = time.monotonic()
        total = self._estimate(source)
        report = ThrottledProgress(progress, total, interval=self.poll_interval)
        report(0, final=True)
        with atomic_target(target) as partial:
            argv = self.argv(source, partial)
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmsnap-copy") as pool:
                future = pool.submit(self.runner.run, argv, timeout=None)
                while True:
                    try:
                        result: CommandResult = future.result(timeout=self.poll_interval)
                        break
                    except concurrent.futures.TimeoutError:
                        report(min(allocated_bytes(partial), total - 1))
                    except CommandError as err:
                        raise write_failed(
                            f"copying {source.location}", target, err.stderr or err.stdout
                        ) from err
            del result
            written = allocated_bytes(partial)
        report(total, final=True)
        if not target.exists():  # pragma: no cover - atomic_target renames or raises
            raise TransferError(f"copy of {source.location} produced no {target}")
        return TransferStats(written, time.monotonic() - started, str(target), self.output_format)
