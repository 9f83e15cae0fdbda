"""The one wrapper of ``qemu-img``: image metadata (info, map), and the arguments that read an image or an
:class:`~vmsnap.model.ExportSource` (``convert``, ``measure``).

Everything runs through a :class:`~vmsnap.runner.Runner`. Metadata is read with ``-U`` (force-share) unless
the caller asks otherwise: reading the header of an image a running QEMU holds is safe, and callers that
want to know whether QEMU holds an image (rollback, a transport refusing a live image) pass
``force_share=False`` and get the lock error.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmsnap.errors import CommandError, NotFoundError, UsageError
from vmsnap.model import ExportSource
from vmsnap.runner import LocalRunner, Runner

LOCKED_HINT = "a running QEMU holds it: export a snapshot through a strategy, or read it with force_share"


def escape_option(value: str) -> str:
    """Escape a value for QEMU's ``key=value,…`` option syntax (``--image-opts``, ``-blockdev``, ``-l``): a
    comma is written twice."""
    return value.replace(",", ",,")


def split_options(image_opts: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(``snapshot.*`` options, which select an internal snapshot, and the other block options)."""
    snapshot = {k: v for k, v in image_opts.items() if k.startswith("snapshot.")}
    other = {k: v for k, v in image_opts.items() if not k.startswith("snapshot.")}
    return snapshot, other


def options_string(
    path: str | Path, fmt: str, other: Mapping[str, str], *, block_device: bool, force_share: bool
) -> str:
    """An ``--image-opts`` string that opens ``path`` as ``fmt`` with the block options ``other``."""
    protocol = "host_device" if block_device else "file"
    parts = [f"driver={fmt}"]
    if force_share:
        parts += ["read-only=on", "force-share=on"]
    parts += [f"file.driver={protocol}", f"file.filename={escape_option(str(path))}"]
    parts += [f"{k}={escape_option(v)}" for k, v in other.items()]
    return ",".join(parts)


def image_args(
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
    snapshot, other = split_options(image_opts or {})
    args: list[str] = []
    if force_share:
        args.append("-U")
    if snapshot:
        args += ["-l", ",".join(f"{k}={escape_option(v)}" for k, v in snapshot.items())]
    if other:
        args += [
            "--image-opts",
            options_string(path, fmt, other, block_device=block_device, force_share=False),
        ]
    else:
        args += ["-f", fmt, str(path)]
    return args


def source_args(source: ExportSource) -> list[str]:
    """qemu-img arguments for a "file" or "block" :class:`ExportSource`, or the URI of an "nbd" one."""
    if source.kind == "nbd":
        return ["-f", "raw", source.location]
    return image_args(
        source.location,
        source.format,
        image_opts=source.image_opts,
        force_share=source.force_share,
        block_device=source.kind == "block",
    )


def convert_argv(source: ExportSource, target: Path, *, target_format: str = "qcow2") -> list[str]:
    """``qemu-img convert`` of ``source``'s guest-visible content into a new standalone ``target``."""
    return ["qemu-img", "convert", *source_args(source), "-O", target_format, str(target)]


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


# -- metadata -----------------------------------------------------------------------------------------


def _info_argv(path: str | Path, fmt: str | None, force_share: bool, backing_chain: bool) -> list[str]:
    argv = ["qemu-img", "info", "--output=json"]
    if force_share:
        argv.append("-U")
    if backing_chain:
        argv.append("--backing-chain")
    if fmt:
        argv += ["-f", fmt]
    return [*argv, str(path)]


def info(
    runner: Runner | None, path: str | Path, *, fmt: str | None = None, force_share: bool = True
) -> dict[str, Any]:
    """``qemu-img info --output=json`` of one image.

    :param runner: where qemu-img runs (None: this host)
    :param fmt: the image's format, when known (qemu-img probes otherwise)
    :param force_share: ``-U``: read an image a running QEMU holds (False: fail while it is held)
    :raise CommandError: qemu-img could not read it (missing, corrupt, locked without ``-U``)
    """
    result = (runner or LocalRunner()).run(_info_argv(path, fmt, force_share, False), timeout=120)
    return dict(json.loads(result.stdout))


def chain_info(
    runner: Runner | None, path: str | Path, *, fmt: str | None = None, force_share: bool = True
) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain``: the image first, then its backing files (see :func:`info`)."""
    result = (runner or LocalRunner()).run(_info_argv(path, fmt, force_share, True), timeout=120)
    return [dict(entry) for entry in json.loads(result.stdout)]


def readable_chain(runner: Runner | None, path: Path) -> list[dict[str, Any]]:
    """:func:`chain_info` of an image that must be a readable disk image.

    :raise CommandError: it is not (with a hint that says so)
    """
    try:
        return chain_info(runner, path)
    except CommandError as err:
        raise CommandError(
            err.argv,
            err.returncode,
            err.stdout,
            err.stderr,
            host=err.host,
            hint=f"qemu-img cannot read {path}: is it a disk image, and not damaged?",
        ) from err


def map_entries(
    runner: Runner | None, path: str | Path, *, fmt: str | None = None, force_share: bool = True
) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``: the image's extents (start, length, depth, data, zero, offset)."""
    argv = ["qemu-img", "map", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    if force_share:
        argv.append("-U")
    result = (runner or LocalRunner()).run([*argv, str(path)], timeout=None)
    return [dict(entry) for entry in json.loads(result.stdout)]


def cluster_size(runner: Runner | None, path: str | Path, fmt: str, *, force_share: bool = True) -> int:
    """The qcow2 cluster size of ``path`` (65536 for raw images and when qemu-img does not report one)."""
    if fmt != "qcow2":
        return 65536
    return int(info(runner, path, fmt=fmt, force_share=force_share).get("cluster-size") or 65536)


def lazy_refcounts(image_info: Mapping[str, Any]) -> bool | None:
    """The ``lazy-refcounts`` flag of a qcow2 image's :func:`info`; None for other formats."""
    data = image_info.get("format-specific", {}).get("data", {})
    value = data.get("lazy-refcounts")
    return bool(value) if value is not None else None


def allocated_fraction(runner: Runner | None, path: Path) -> float:
    """How much of ``path``'s own layer (not its backing files) is allocated, 0.0-1.0 (``qemu-img map``)."""
    extents = map_entries(runner, path)
    size = sum(int(e["length"]) for e in extents) or 1
    allocated = sum(int(e["length"]) for e in extents if e.get("depth") == 0 and e.get("present", True))
    return allocated / size


# -- making images ------------------------------------------------------------------------------------


def create(
    runner: Runner | None,
    path: str | Path,
    fmt: str,
    size: int,
    *,
    backing: str | Path | None = None,
    backing_format: str = "qcow2",
    unsafe: bool = False,
) -> None:
    """``qemu-img create``: a new ``fmt`` image of ``size`` bytes, empty or (``backing``) an overlay on an
    image of ``backing_format``; ``backing`` is written as given (a relative path is relative to ``path``'s
    directory; a ``json:`` pseudo-filename such as an NBD export is fine).

    :param unsafe: ``-u``: do not open the backing file (it need not exist yet, or only a VM reaches it)
    :raise CommandError: qemu-img failed (the directory is missing or full, the backing file unreadable)
    """
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if unsafe:
        argv.append("-u")
    if backing is not None:
        argv += ["-b", str(backing), "-F", backing_format]
    (runner or LocalRunner()).run([*argv, str(path), str(size)], timeout=120)


def commit(runner: Runner | None, path: str | Path, *, timeout: float | None) -> None:
    """``qemu-img commit -d``: write ``path``'s own data into its backing file; ``path`` stays as it is
    (the caller removes it). No QEMU may hold either image.

    :raise CommandError: qemu-img failed (an image is in use, the backing file's filesystem is full)
    """
    (runner or LocalRunner()).run(["qemu-img", "commit", "-q", "-d", str(path)], timeout=timeout)


def rebase_unsafe(runner: Runner | None, path: str | Path, backing: str | Path, backing_format: str) -> None:
    """``qemu-img rebase -u``: only rewrite ``path``'s backing file name (and format); no data is compared
    or copied, so the new backing file must hold what the old one held.

    :raise CommandError: qemu-img failed
    """
    argv = ["qemu-img", "rebase", "-u", "-b", str(backing), "-F", backing_format, str(path)]
    (runner or LocalRunner()).run(argv, timeout=120)


SNAPSHOT_FLAGS = {"create": "-c", "apply": "-a", "delete": "-d"}
"""``qemu-img snapshot``'s flag for each action."""


def snapshot(runner: Runner | None, path: str | Path, name: str, *, action: str) -> None:
    """``qemu-img snapshot``: create, apply (revert the image to) or delete internal snapshot ``name`` of a
    qcow2 image that no QEMU holds.

    :param action: "create", "apply" or "delete"
    :raise UsageError: an unknown action
    :raise CommandError: qemu-img refused (no such snapshot, the image is in use)
    """
    flag = SNAPSHOT_FLAGS.get(action)
    if flag is None:
        raise UsageError(f"unknown qemu-img snapshot action {action!r}", hint="create, apply or delete")
    (runner or LocalRunner()).run(["qemu-img", "snapshot", flag, name, str(path)], timeout=600)


# -- persistent dirty bitmaps of a qcow2 image --------------------------------------------------------


def bitmaps(runner: Runner | None, path: str | Path) -> list[dict[str, Any]]:
    """The persistent dirty bitmaps of a qcow2 image that no QEMU holds (``qemu-img info``, without ``-U``):
    each ``{"name", "granularity", "flags"}``; flag "auto" means enabled, "in-use" inconsistent.

    :raise CommandError: the image is missing, damaged, or a running QEMU holds it
    """
    data = info(runner, path, fmt="qcow2", force_share=False).get("format-specific", {}).get("data", {})
    return [dict(b) for b in data.get("bitmaps", [])]


def bitmap(
    runner: Runner | None,
    path: str | Path,
    name: str,
    *,
    add: bool = False,
    merge_from: str | None = None,
    disable: bool = False,
    clear: bool = False,
    remove: bool = False,
) -> None:
    """``qemu-img bitmap``: change persistent dirty bitmap ``name`` of a qcow2 image that no QEMU holds.

    The operations asked for run in this order, in one qemu-img run: add (an empty, enabled bitmap),
    merge the bits of bitmap ``merge_from`` into it, disable it (it stops recording writes), clear its
    bits, remove it.

    :raise UsageError: no operation asked for
    :raise CommandError: qemu-img refused (no such bitmap, it exists already, the image is in use)
    """
    operations = ["--add"] if add else []
    operations += ["--merge", merge_from] if merge_from is not None else []
    operations += ["--disable"] if disable else []
    operations += ["--clear"] if clear else []
    operations += ["--remove"] if remove else []
    if not operations:
        raise UsageError(f"no operation on bitmap {name!r} of {path}")
    argv = ["qemu-img", "bitmap", *operations, "-f", "qcow2", str(path), name]
    (runner or LocalRunner()).run(argv, timeout=120)
