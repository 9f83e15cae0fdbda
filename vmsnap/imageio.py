"""Image I/O shared by transports, the repository and verify: qemu-img source arguments, a qemu-nbd server,
NBD extent walking, the sha256 of an image's guest-visible content, and atomic 0600 target files.

Everything here runs on this host: qemu-img and qemu-nbd through a :class:`~vmsnap.runner.Runner` (a local
one by default), NBD reads in-process with libnbd's Python binding (``import nbd``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import NotFoundError, TransferError, UsageError, VmsnapError
from vmsnap.model import ExportSource, Progress
from vmsnap.runner import LocalRunner, Runner

CHUNK = 4 * 1024 * 1024
"""Bytes per NBD read: large enough to amortise round trips, far below libnbd's 64 MiB limit."""

_ZEROS = bytes(CHUNK)
LOCKED_HINT = "a running QEMU holds it: export a snapshot through a strategy, or read it with force_share"
_STATUS_SPAN = 1 << 30  # block-status requests stay below the 4 GiB some servers reject

STATE_HOLE = 1
STATE_ZERO = 2
DIRTY = 1


def bitmap_name(value: str) -> str:
    """The dirty bitmap's name, given either the name or its NBD context ``qemu:dirty-bitmap:NAME``."""
    return value.removeprefix("qemu:dirty-bitmap:")


def _nbd() -> Any:
    """The libnbd Python binding (Debian: python3-libnbd), imported lazily with a hint when missing."""
    try:
        import nbd
    except ImportError as err:  # pragma: no cover - depends on the host
        raise TransferError(
            "the libnbd Python binding (module 'nbd') is not installed",
            hint="install python3-libnbd (Debian) or libnbd's Python binding for your Python",
        ) from err
    return nbd


# ---------------------------------------------------------------------------------------------- qemu-img args


def _escape_opt(value: str) -> str:
    """Escape a value for QEMU's key=value,… option syntax (a comma is written twice)."""
    return value.replace(",", ",,")


def _split_opts(image_opts: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(snapshot options for ``-l``, other block options for ``--image-opts``)."""
    snapshot = {k: v for k, v in image_opts.items() if k.startswith("snapshot.")}
    other = {k: v for k, v in image_opts.items() if not k.startswith("snapshot.")}
    return snapshot, other


def _opts_string(
    path: str, fmt: str, other: Mapping[str, str], *, block_device: bool, force_share: bool
) -> str:
    protocol = "host_device" if block_device else "file"
    parts = [f"driver={fmt}"]
    if force_share:
        parts += ["read-only=on", "force-share=on"]
    parts += [f"file.driver={protocol}", f"file.filename={_escape_opt(path)}"]
    parts += [f"{k}={_escape_opt(v)}" for k, v in other.items()]
    return ",".join(parts)


def qemu_img_source_args(
    path: str | Path,
    fmt: str,
    *,
    image_opts: Mapping[str, str] | None = None,
    force_share: bool = False,
    block_device: bool = False,
) -> list[str]:
    """Arguments naming one source image for ``qemu-img convert``/``measure`` (options, then the file last).

    ``snapshot.*`` keys become ``-l`` (an internal snapshot); other keys make an ``--image-opts`` string.

    :param path: the image file or block device
    :param fmt: its format ("qcow2" or "raw")
    :param image_opts: extra block options, e.g. ``{"snapshot.name": "s1"}``
    :param force_share: add ``-U`` (a running QEMU holds the image)
    :param block_device: ``path`` is a block device
    """
    snapshot, other = _split_opts(image_opts or {})
    args: list[str] = []
    if force_share:
        args.append("-U")
    if snapshot:
        args += ["-l", ",".join(f"{k}={_escape_opt(v)}" for k, v in snapshot.items())]
    if other:
        args += [
            "--image-opts",
            _opts_string(str(path), fmt, other, block_device=block_device, force_share=False),
        ]
    else:
        args += ["-f", fmt, str(path)]
    return args


def source_args(source: ExportSource) -> list[str]:
    """qemu-img arguments for a "file" or "block" :class:`ExportSource`, or the URI of an "nbd" one."""
    if source.kind == "nbd":
        return ["-f", "raw", source.location]
    return qemu_img_source_args(
        source.location,
        source.format,
        image_opts=source.image_opts,
        force_share=source.force_share,
        block_device=source.kind == "block",
    )


def check_source(source: ExportSource) -> None:
    """Fail early and clearly when a "file"/"block" source is missing or an "nbd" URI is malformed.

    :raise NotFoundError: the file, device or NBD unix socket does not exist
    :raise UsageError: an unknown format, kind, or an NBD location that is not an nbd URI
    """
    if source.kind == "nbd":
        if not source.location.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
            raise UsageError(
                f"NBD source {source.location!r} is not an NBD URI",
                hint="use nbd+unix:///EXPORT?socket=PATH (or nbd://HOST:PORT/EXPORT)",
            )
        socket = urllib.parse.parse_qs(urllib.parse.urlsplit(source.location).query).get("socket")
        if socket and not Path(socket[0]).exists():
            raise NotFoundError(
                f"NBD socket {socket[0]} of {source.location} does not exist",
                hint="check that the NBD server (QEMU's nbd-server-start, or qemu-nbd) is running",
            )
        return
    if source.kind not in ("file", "block"):
        raise UsageError(f"unknown source kind {source.kind!r}", hint="use 'file', 'block' or 'nbd'")
    if source.format not in ("qcow2", "raw"):
        raise UsageError(f"unsupported image format {source.format!r} for {source.location}")
    if not Path(source.location).exists():
        raise NotFoundError(
            f"source image {source.location} does not exist",
            hint="check the path; the snapshot may have been deleted",
        )


def image_info(
    path: str | Path,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    backing_chain: bool = False,
    runner: Runner | None = None,
) -> Any:
    """``qemu-img info --output=json`` of ``path`` (a list with ``backing_chain``).

    :raise CommandError: qemu-img could not open the image
    """
    argv = ["qemu-img", "info", "--output=json"]
    if force_share:
        argv.append("-U")
    if backing_chain:
        argv.append("--backing-chain")
    if fmt:
        argv += ["-f", fmt]
    result = (runner or LocalRunner()).run([*argv, str(path)], timeout=120)
    return json.loads(result.stdout)


def cluster_size(
    path: str | Path, fmt: str, *, force_share: bool = False, runner: Runner | None = None
) -> int:
    """The qcow2 cluster size of ``path`` (65536 for raw images and when qemu-img does not report one)."""
    if fmt != "qcow2":
        return 65536
    info = image_info(path, fmt, force_share=force_share, runner=runner)
    return int(info.get("cluster-size") or 65536)


def allocated_bytes(path: str | Path) -> int:
    """Bytes the file occupies on its filesystem (holes not counted)."""
    return os.stat(path).st_blocks * 512


# ----------------------------------------------------------------------------------------- target handling


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target_dir(target: Path) -> None:
    """Fail clearly when the directory a target goes into does not exist or is not writable.

    :raise NotFoundError: the directory does not exist
    :raise TransferError: it is not a writable directory
    """
    parent = target.parent
    if not parent.is_dir():
        raise NotFoundError(
            f"target directory {parent} does not exist", hint="create it, or choose another target"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TransferError(
            f"target directory {parent} is not writable", hint="fix its permissions or choose another target"
        )


@contextlib.contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success make it 0600, fsync it, rename it to ``target``
    and fsync the directory; on any error remove it, so no partial target is ever left behind.

    :raise NotFoundError: the target's directory does not exist
    :raise TransferError: the directory is not writable
    """
    target = Path(target)
    check_target_dir(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, 0o600)
        fsync_path(partial)
        os.replace(partial, target)
        fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise


def no_space(text: str) -> bool:
    """True when an error text says a filesystem is full."""
    return "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text


def write_failed(what: str, target: object, detail: str) -> TransferError:
    """A TransferError for a failed write into ``target``, with a hint that fits the cause."""
    last = [line.strip() for line in detail.strip().splitlines() if line.strip()]
    reason = last[-1] if last else "unknown error"
    if no_space(detail):
        return TransferError(
            f"{what} into {target} failed: the target filesystem is full ({reason})",
            hint="free space there or choose another target; nothing partial was kept",
        )
    if "Failed to get" in detail and "lock" in detail:
        return TransferError(
            f"{what} failed: the image is locked by another process ({reason})",
            hint=LOCKED_HINT,
        )
    return TransferError(
        f"{what} into {target} failed: {reason}", hint="run with --debug for the full output"
    )


# -------------------------------------------------------------------------------------------- qemu-nbd server


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid
        return True
    try:  # a zombie waiting for its reaper counts as gone
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@attrs.define
class QemuNbdServer:
    """A ``qemu-nbd`` this process started on a unix socket in a private 0700 directory; a context manager.

    It forks into the background (``--fork --pid-file``) and is stopped by its pid on exit (SIGTERM, which
    makes qemu-nbd flush and close the image; SIGKILL after ``stop_timeout``).

    :param path: the image file or block device to serve
    :param format: "qcow2" or "raw"
    :param read_only: export read-only (sources); writable for targets
    :param image_opts: ``snapshot.*`` keys load an internal snapshot (``-l``); others go to ``--image-opts``
    :param force_share: open without taking QEMU's image lock (a running QEMU holds the image)
    :param bitmap: a persistent dirty bitmap to expose as ``qemu:dirty-bitmap:NAME``
    :param block_device: ``path`` is a block device
    :param tcp: listen on 127.0.0.1 on a free port instead of a unix socket (only on request)
    :param persistent: keep serving after the last client disconnects; by default qemu-nbd exits then, so a
        vmsnap that is killed mid-copy leaves no server behind
    :param runner: where qemu-nbd runs; must be this host (the socket is local)
    """

    path: Path
    format: str = "qcow2"
    read_only: bool = True
    image_opts: Mapping[str, str] = attrs.Factory(dict)
    force_share: bool = False
    bitmap: str | None = None
    block_device: bool = False
    tcp: bool = False
    runner: Runner = attrs.Factory(LocalRunner)
    stop_timeout: float = 10.0
    persistent: bool = False
    _dir: Path | None = attrs.field(default=None, init=False)
    _pid: int | None = attrs.field(default=None, init=False)
    _port: int | None = attrs.field(default=None, init=False)

    @classmethod
    def for_source(cls, source: ExportSource, *, runner: Runner | None = None) -> QemuNbdServer:
        """A read-only server for a "file" or "block" :class:`ExportSource` (with its bitmap, if any)."""
        if source.kind == "nbd":
            raise UsageError("an 'nbd' source is already served; connect to its URI instead")
        return cls(
            Path(source.location),
            source.format,
            read_only=True,
            image_opts=dict(source.image_opts),
            force_share=source.force_share,
            bitmap=bitmap_name(source.dirty_bitmap) if source.dirty_bitmap else None,
            block_device=source.kind == "block",
            runner=runner or LocalRunner(),
        )

    @property
    def socket(self) -> Path:
        if self._dir is None:
            raise UsageError("the qemu-nbd server is not running")
        return self._dir / "nbd.sock"

    @property
    def uri(self) -> str:
        """The export's NBD URI (``nbd+unix:///?socket=…``, or ``nbd://127.0.0.1:PORT/`` with ``tcp``)."""
        if self._port is not None:
            return f"nbd://127.0.0.1:{self._port}/"
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def pid(self) -> int | None:
        return self._pid

    def argv(self) -> list[str]:
        """The qemu-nbd command line (needs the private directory to exist, i.e. inside ``start``)."""
        assert self._dir is not None
        argv = ["qemu-nbd", "--fork", f"--pid-file={self._dir / 'nbd.pid'}", "--shared=8"]
        if self.persistent:
            argv.append("--persistent")
        if self._port is not None:
            argv += ["--bind=127.0.0.1", f"--port={self._port}"]
        else:
            argv.append(f"--socket={self.socket}")
        if self.read_only:
            argv.append("--read-only")
        else:
            argv += ["--cache=writeback", "--discard=unmap"]
        if self.bitmap:
            argv.append(f"--bitmap={self.bitmap}")
        snapshot, other = _split_opts(self.image_opts)
        if snapshot:
            argv.append("--load-snapshot=" + ",".join(f"{k}={_escape_opt(v)}" for k, v in snapshot.items()))
        if other or self.force_share:
            argv += [
                "--image-opts",
                _opts_string(
                    str(self.path),
                    self.format,
                    other,
                    block_device=self.block_device,
                    force_share=self.force_share,
                ),
            ]
        else:
            argv += [f"--format={self.format}", str(self.path)]
        return argv

    def start(self) -> QemuNbdServer:
        """Start qemu-nbd; returns once it listens.

        :raise NotFoundError: the image does not exist
        :raise TransferError: qemu-nbd failed to start (the message has its error)
        """
        if not self.path.exists():
            raise NotFoundError(f"image {self.path} does not exist", hint="check the path")
        self.path = self.path.absolute()  # qemu-nbd --fork may change directory
        self._dir = Path(tempfile.mkdtemp(prefix="vmsnap-nbd-"))
        os.chmod(self._dir, 0o700)
        if self.tcp:
            self._port = _free_port()
        try:
            self.runner.run(self.argv(), timeout=60)
            self._pid = int((self._dir / "nbd.pid").read_text().strip())
        except VmsnapError as err:
            self.stop()
            detail = " ".join(str(getattr(err, "stderr", "") or err.message).split())
            locked = "Failed to get" in detail and "lock" in detail
            raise TransferError(
                f"qemu-nbd could not serve {self.path}: {detail}",
                hint=LOCKED_HINT
                if locked
                else "check that the image is readable and the snapshot name is right",
            ) from err
        except (OSError, ValueError) as err:
            self.stop()
            raise TransferError(f"qemu-nbd did not write its pid file for {self.path}: {err}") from err
        return self

    def stop(self) -> None:
        """Stop the server this object started (by pid) and remove its private directory."""
        pid, self._pid = self._pid, None
        if pid is not None and _pid_alive(pid):
            # a SIGTERM that lands while qemu-nbd is still entering its main loop can be lost (seen with
            # QEMU 7.2), so it is repeated until the process is gone
            deadline = time.monotonic() + self.stop_timeout
            next_term = 0.0
            while _pid_alive(pid) and time.monotonic() < deadline:
                if time.monotonic() >= next_term:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                    next_term = time.monotonic() + 0.5
                time.sleep(0.01)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _pid_alive(pid) and time.monotonic() < deadline + 5:
                    time.sleep(0.01)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._port = None

    def __enter__(self) -> QemuNbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ NBD client


@contextlib.contextmanager
def nbd_connection(uri: str, *, contexts: Sequence[str] = ()) -> Iterator[Any]:
    """A connected libnbd handle for ``uri``, asking for the metadata ``contexts``; shut down on exit.

    :raise TransferError: the connection failed (the message names the URI and libnbd's reason)
    """
    nbd = _nbd()
    handle = nbd.NBD()
    try:
        for context in contexts:
            handle.add_meta_context(context)
        handle.connect_uri(uri)
    except nbd.Error as err:
        del handle
        raise TransferError(
            f"cannot connect to NBD export {uri}: {err.string}",
            hint="check that the NBD server runs and the socket path or host:port is right",
        ) from err
    try:
        yield handle
    finally:
        with contextlib.suppress(nbd.Error):
            handle.shutdown()
        del handle  # libnbd closes the connection when the handle is freed


def _collect(
    context: str, found: list[tuple[int, int]], metacontext: str, _offset: int, entries: list[int], _err: Any
) -> int:
    if metacontext == context:
        found.extend(zip(entries[0::2], entries[1::2], strict=False))
    return 0


def extents(
    handle: Any, context: str, *, offset: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """Walk ``context`` (e.g. ``base:allocation``) over ``[offset, end)``: yields (offset, length, flags).

    Extents are clipped to the range; a server that reports nothing for a span yields it with flags 0
    (for base:allocation that means "data"; for a dirty bitmap "clean").
    """
    nbd = _nbd()
    end = handle.get_size() if end is None else end
    supported = handle.can_meta_context(context)
    pos = offset
    while pos < end:
        span = min(end - pos, _STATUS_SPAN)
        if not supported:
            yield pos, span, 0
            pos += span
            continue
        found: list[tuple[int, int]] = []
        try:
            handle.block_status(span, pos, functools.partial(_collect, context, found))
        except nbd.Error as err:
            raise TransferError(f"NBD block status at offset {pos} failed: {err.string}") from err
        if not found:
            found = [(span, 0)]
        for length, flags in found:
            length = min(length, end - pos)
            if length <= 0:
                break
            yield pos, length, flags
            pos += length


def pread(handle: Any, length: int, offset: int) -> bytes:
    """Read ``length`` bytes at ``offset``.

    :raise TransferError: the server reported an error
    """
    nbd = _nbd()
    try:
        return bytes(handle.pread(length, offset))
    except nbd.Error as err:
        raise TransferError(f"NBD read of {length} bytes at offset {offset} failed: {err.string}") from err


def nbd_sha256(uri: str) -> str:
    """sha256 of an NBD export's whole content, reading only extents that are not known to be zero."""
    digest = hashlib.sha256()
    with nbd_connection(uri, contexts=["base:allocation"]) as handle:
        for offset, length, flags in extents(handle, "base:allocation"):
            pos, end = offset, offset + length
            while pos < end:
                step = min(CHUNK, end - pos)
                digest.update(_ZEROS[:step] if flags & STATE_ZERO else pread(handle, step, pos))
                pos += step
    return digest.hexdigest()


def guest_sha256(
    path: str | Path,
    format: str,
    *,
    image_opts: Mapping[str, str] | None = None,
    force_share: bool = False,
    block_device: bool = False,
    runner: Runner | None = None,
) -> str:
    """sha256 of an image's GUEST-VISIBLE content: its whole virtual size, backing files resolved, holes read
    as zeros (hashed from a shared zero buffer, never read). A qcow2 and its raw conversion, or a chain and
    its flattened copy, give the same digest. Read straight from the image's files where ``qemu-img map``
    places every data extent (see :mod:`vmsnap.digest`), else through a private qemu-nbd.

    :param path: image file (or block device)
    :param format: "qcow2" or "raw"
    :param image_opts: e.g. ``{"snapshot.name": "s1"}`` to hash an internal snapshot
    :param force_share: read an image a running QEMU holds
    :raise NotFoundError: the image does not exist
    :raise TransferError: qemu-nbd could not open it, or a read failed
    """
    if format not in ("qcow2", "raw"):
        raise UsageError(f"unsupported image format {format!r}", hint="use 'qcow2' or 'raw'")
    if not image_opts and Path(path).exists():
        from vmsnap.digest import plain_sha256  # vmsnap.digest builds on this module

        direct = plain_sha256(path, format, force_share=force_share, block_device=block_device, runner=runner)
        if direct is not None:
            return direct
    server = QemuNbdServer(
        Path(path),
        format,
        image_opts=dict(image_opts or {}),
        force_share=force_share,
        block_device=block_device,
        runner=runner or LocalRunner(),
    )
    with server:
        return nbd_sha256(server.uri)


def source_sha256(source: ExportSource, *, runner: Runner | None = None) -> str:
    """:func:`guest_sha256` of any :class:`ExportSource` ("nbd" ones are read directly)."""
    check_source(source)
    if source.kind == "nbd":
        return nbd_sha256(source.location)
    with QemuNbdServer.for_source(attrs.evolve(source, dirty_bitmap=None), runner=runner) as server:
        return nbd_sha256(server.uri)


def oserror_is_full(err: OSError) -> bool:
    """True when ``err`` says the filesystem is full."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


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
