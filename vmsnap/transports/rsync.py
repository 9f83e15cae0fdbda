"""The rsync transport: copy an image file to a local path or to ``host:path`` over SSH with rsync's delta
algorithm, so a second backup into the same target sends only what changed.

rsync reads the bytes of a file. A source that is not already a standalone image file in the output format
(an internal snapshot, a backing chain, a raw source for qcow2 output, a block device, an NBD export) is first
materialised with ``qemu-img convert`` into a private staging directory, then sent.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs

from vmsnap.errors import CommandError, NotFoundError, UsageError
from vmsnap.files import check_target_dir, fsync_file
from vmsnap.image import qemu_img
from vmsnap.image.qemu_img import source_args
from vmsnap.model import ExportSource, Progress, ThrottledProgress, TransferStats
from vmsnap.runner import LocalRunner, Runner, SshRunner
from vmsnap.transports.base import check_options, check_send, write_failed

MAX_BLOCK_SIZE = 131072
"""rsync (protocol 30 and later) refuses checksum block sizes above 128 KiB."""

_REMOTE_RE = re.compile(r"^(?P<host>[^/:]+):(?P<path>.+)$")


@attrs.frozen
class RsyncStats:
    """What rsync reported with ``--stats``: new bytes written, bytes reused, bytes sent."""

    literal: int
    matched: int
    sent: int


def parse_stats(text: str) -> RsyncStats:
    """Parse rsync's ``--stats`` output (numbers may carry thousands separators)."""

    def number(label: str) -> int:
        match = re.search(rf"^{label}:\s*([\d,.]+)", text, re.MULTILINE)
        return int(re.sub(r"[,.]", "", match.group(1))) if match else 0

    return RsyncStats(number("Literal data"), number("Matched data"), number("Total bytes sent"))


@attrs.frozen
class RsyncTarget:
    """Where rsync writes: a local path, or a path on ``host`` (reached with ``ssh``)."""

    path: str
    host: str | None = None

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def spec(self) -> str:
        """The destination argument for rsync."""
        return f"{self.host}:{self.path}" if self.host is not None else self.path


class RsyncTransport:
    """Sends an image file with ``rsync --inplace --no-whole-file`` (block size = the qcow2 cluster size).

    :param runner: where the target lives: a :class:`LocalRunner` (default) or an :class:`SshRunner`, whose
        ``ssh`` options rsync uses (``-e``); rsync itself and staging run on this host
    :param output_format: "qcow2" (default) or "raw"
    :param staging_dir: where sources are materialised (default: a private directory in the system temp)
    :param sparse: pass ``--sparse`` (holes stay holes on the receiver)
    :param fsync: pass ``--fsync`` (the receiver fsyncs the file before rsync returns)
    :param inplace: update the target in place (``--inplace``, the default: no second copy on the receiver,
        but a failed update leaves a damaged target, which is then removed); False writes a temporary file
        that rsync renames over the target when complete, so an existing target survives a failure
    :raise UsageError: unknown options or output format
    """

    name: ClassVar[str] = "rsync"
    preference: ClassVar[int] = 100
    incremental: ClassVar[bool] = False

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        output_format: str = "qcow2",
        staging_dir: Path | str | None = None,
        sparse: bool = True,
        fsync: bool = True,
        inplace: bool = True,
        **unknown: Any,
    ) -> None:
        output_format = check_options(
            "rsync", unknown, ("output_format", "staging_dir", "sparse", "fsync", "inplace"), output_format
        )
        self.runner: Runner = runner or LocalRunner()
        self.local: Runner = self.runner.local if isinstance(self.runner, SshRunner) else self.runner
        self.output_format = output_format
        self.staging_dir = Path(staging_dir) if staging_dir is not None else None
        self.sparse = sparse
        self.fsync = fsync
        self.inplace = inplace
        self.last_stats: RsyncStats | None = None

    def accepts(self, source: ExportSource) -> bool:
        """True for "file", "block" and "nbd" sources without a dirty bitmap (all but plain image files are
        staged first; incrementals are the nbd transport's job)."""
        return source.kind in ("file", "block", "nbd") and not source.dirty_bitmap

    def parse_target(self, target: Path | str) -> RsyncTarget:
        """Split ``target`` into host and path: ``host:path`` or, with an SshRunner, a path on its host."""
        text = str(target)
        match = _REMOTE_RE.match(text) if isinstance(target, str) else None
        if match:
            host = match.group("host")
            if host.startswith("-"):
                raise UsageError(f"invalid rsync target {text!r}")
            if isinstance(self.runner, SshRunner):
                host = self.runner.destination
            return RsyncTarget(match.group("path"), host)
        if isinstance(self.runner, SshRunner):
            return RsyncTarget(text, self.runner.destination)
        return RsyncTarget(text)

    def ssh_command(self) -> str:
        """The ``-e`` remote shell for rsync, built from the SshRunner's ssh argv (minus the destination)."""
        if isinstance(self.runner, SshRunner):
            return shlex.join(self.runner.ssh_argv()[:-1])
        return "ssh -o BatchMode=yes"

    def needs_staging(self, source: ExportSource) -> bool:
        """True when rsync cannot send the source file as it is (snapshot options, chain, format).

        :raise TransferError: the image is locked by a running QEMU (and not marked ``force_share``) or
            qemu-img cannot open it
        """
        if source.kind != "file" or source.image_opts or source.format != self.output_format:
            return True
        try:  # without -U this also fails when a running QEMU holds the image for writing
            info = qemu_img.info(
                self.local, source.location, fmt=source.format, force_share=source.force_share
            )
        except CommandError as err:
            raise write_failed(f"reading {source.location}", "rsync", err.stderr) from err
        return bool(info.get("backing-filename"))

    def argv(self, source_file: str, target: RsyncTarget, block_size: int) -> list[str]:
        """The rsync command line."""
        argv = ["rsync", *(["--inplace"] if self.inplace else []), "--no-whole-file"]
        argv += [f"--block-size={block_size}", "--stats"]
        argv += ["--perms", "--chmod=F600", "--times"]
        if self.sparse:
            argv.append("--sparse")
        if self.fsync:
            argv.append("--fsync")
        if target.remote:
            argv += ["-e", self.ssh_command()]
        return [*argv, "--", source_file, target.spec]

    @contextlib.contextmanager
    def _staged(self, source: ExportSource) -> Iterator[str]:
        if not self.needs_staging(source):
            yield source.location
            return
        base = self.staging_dir
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="vmsnap-rsync-", dir=base))
        os.chmod(workdir, 0o700)
        try:
            staged = workdir / f"staged.{self.output_format}"
            try:
                self.local.run(
                    ["qemu-img", "convert", "-O", self.output_format, *source_args(source), str(staged)],
                    timeout=None,
                )
            except CommandError as err:
                raise write_failed(f"staging {source.location}", workdir, err.stderr) from err
            os.chmod(staged, 0o600)
            yield str(staged)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _exists(self, target: RsyncTarget) -> bool:
        if target.remote:
            return self.runner.run(["test", "-e", target.path], ok_codes=(0, 1), timeout=60).exit_code == 0
        return os.path.lexists(target.path)

    def _check_dir(self, target: RsyncTarget) -> None:
        if not target.remote:
            check_target_dir(Path(target.path))
            return
        parent = os.path.dirname(target.path) or "."
        if self.runner.run(["test", "-d", parent], ok_codes=(0, 1), timeout=60).exit_code != 0:
            raise NotFoundError(
                f"target directory {parent} does not exist on {target.host}", hint="create it first"
            )

    def _remove(self, target: RsyncTarget) -> None:
        with contextlib.suppress(Exception):
            if target.remote:
                self.runner.run(["rm", "-f", "--", target.path], timeout=60)
            else:
                os.unlink(target.path)

    def send(
        self,
        source: ExportSource,
        target: Path | str,
        *,
        progress: Progress,
        backing: Path | str | None = None,
    ) -> TransferStats:
        """rsync ``source`` into ``target`` (a local path, ``host:path``, or a path on the SshRunner's host).

        ``bytes_written`` is rsync's "Literal data": the bytes that were not already in the target.

        :raise UnsupportedError: an unknown source kind
        :raise NotFoundError: the source, or the target's directory, does not exist
        :raise TransferError: rsync failed (full target, ssh failure); a target this call created or
            half-updated in place is removed (with ``inplace=False`` an existing target is left as it was)
        """
        check_send(self, source, target, backing=backing, local_target=False)
        where = self.parse_target(target)
        self._check_dir(where)
        existed = self._exists(where)
        started = time.monotonic()
        report = ThrottledProgress(progress, max(source.virtual_size, 1))
        report(0, final=True)
        with self._staged(source) as source_file:
            block = min(
                qemu_img.cluster_size(self.local, source_file, self.output_format),
                MAX_BLOCK_SIZE,
            )
            argv = self.argv(source_file, where, block)
            try:
                result = self.local.run(argv, timeout=None)
            except CommandError as err:
                if self.inplace or not existed:  # a half-updated file is worse than none
                    self._remove(where)
                raise write_failed(f"rsync of {source.location}", where.spec, err.stderr) from err
        if not where.remote:
            fsync_file(Path(where.path))
        self.last_stats = parse_stats(result.stdout)
        report(max(source.virtual_size, 1), final=True)
        return TransferStats(
            self.last_stats.literal, time.monotonic() - started, where.spec, self.output_format
        )
