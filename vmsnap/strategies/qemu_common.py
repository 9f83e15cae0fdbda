"""Helpers shared by the QEMU strategies (internal, external, backup): qemu-img wrappers, a qemu-nbd export
context manager, overlay file naming, and the qemu-img arguments that read an :class:`ExportSource`.

Everything runs through the machine's :class:`~vmsnap.runner.Runner`; nothing here talks to QMP.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmsnap.errors import CommandError, SnapshotError, UnsupportedError, VmsnapError
from vmsnap.imageio import source_args
from vmsnap.model import Disk, ExportSource, validate_name
from vmsnap.runner import Runner

OVERLAY_MARK = ".vmsnap-"
"""Overlay files are ``<image>.vmsnap-<snapshot>.qcow2`` next to the image they cover."""

_OVERLAY_RE = re.compile(r"^(?P<base>.+)\.vmsnap-(?P<name>[A-Za-z0-9][A-Za-z0-9_.+-]*)\.qcow2$")


def image_opts_escape(value: str) -> str:
    """Escape a value for ``--image-opts`` / ``-blockdev`` dotted syntax (a comma is written twice)."""
    return value.replace(",", ",,")


def overlay_path(image: Path, snapshot: str) -> Path:
    """The overlay file of ``snapshot`` on ``image``: ``<image>.vmsnap-<snapshot>.qcow2``, next to it.

    :raise UsageError: the snapshot name cannot be part of a file name
    """
    validate_name(snapshot, "snapshot name")
    return image.with_name(f"{image.name}{OVERLAY_MARK}{snapshot}.qcow2")


def parse_overlay_path(path: Path) -> tuple[Path, str] | None:
    """``(image, snapshot)`` for a path made by :func:`overlay_path`, else None."""
    match = _OVERLAY_RE.match(path.name)
    if match is None:
        return None
    return path.with_name(match["base"]), match["name"]


# -- reading an ExportSource with qemu-img -----------------------------------------------------------


def qemu_img_source_args(source: ExportSource) -> list[str]:
    """The input-side ``qemu-img convert`` arguments that read ``source`` (ending with its filename).

    Same rules as the transports (:func:`vmsnap.imageio.source_args`): ``snapshot.*`` keys in ``image_opts``
    become ``-l``, other keys ``--image-opts``; NBD sources are raw URIs.
    """
    return source_args(source)


def convert_argv(source: ExportSource, target: Path, *, target_format: str = "qcow2") -> list[str]:
    """``qemu-img convert`` of ``source``'s guest-visible content into a new standalone ``target``."""
    return ["qemu-img", "convert", *qemu_img_source_args(source), "-O", target_format, str(target)]


# -- qemu-img wrappers ----------------------------------------------------------------------------------


def qemu_img_info(runner: Runner, image: Path, *, force_share: bool = True) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``image`` (``-U`` by default: QEMU may hold it)."""
    argv = ["qemu-img", "info", "--output=json"]
    if force_share:
        argv.append("-U")
    result = runner.run([*argv, str(image)], timeout=120)
    return dict(json.loads(result.stdout))


def internal_snapshots(runner: Runner, image: Path, *, force_share: bool = True) -> list[dict[str, Any]]:
    """The internal snapshots of a qcow2 image (``qemu-img info``'s ``snapshots``), oldest first."""
    return list(qemu_img_info(runner, image, force_share=force_share).get("snapshots", []))


def lazy_refcounts(info: Mapping[str, Any]) -> bool | None:
    """The ``lazy-refcounts`` flag of a qcow2 image's ``qemu-img info``; None for other formats."""
    data = info.get("format-specific", {}).get("data", {})
    value = data.get("lazy-refcounts")
    return bool(value) if value is not None else None


def allocated_fraction(runner: Runner, image: Path) -> float:
    """How much of ``image``'s own layer (not its backing files) is allocated, 0.0-1.0 (``qemu-img map``)."""
    result = runner.run(["qemu-img", "map", "-U", "--output=json", str(image)], timeout=600)
    extents = json.loads(result.stdout)
    size = sum(int(e["length"]) for e in extents) or 1
    allocated = sum(int(e["length"]) for e in extents if e.get("depth") == 0 and e.get("present", True))
    return allocated / size


def qemu_img_check(runner: Runner, image: Path, *, force_share: bool = True) -> dict[str, Any]:
    """``qemu-img check`` of ``image``.

    :raise SnapshotError: the image has corruptions or leaks are reported as errors
    """
    argv = ["qemu-img", "check", "--output=json"]
    if force_share:
        argv.append("-U")
    try:
        result = runner.run([*argv, str(image)], ok_codes=(0, 3), timeout=600)
    except CommandError as err:
        raise SnapshotError(
            f"qemu-img check found errors in {image}: {err.stderr.strip() or err.stdout.strip()}",
            hint="run `qemu-img check -r leaks` on it with the VM off",
        ) from err
    return dict(json.loads(result.stdout)) if result.stdout.strip() else {}


# -- qemu-nbd -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_directory(runner: Runner, prefix: str = "vmsnap") -> Iterator[Path]:
    """A fresh 0700 directory (``mktemp -d``) where ``runner`` runs, removed on exit."""
    made = runner.run(["mktemp", "-d", "-t", f"{prefix}.XXXXXXXX"], timeout=30).stdout.strip()
    path = Path(made)
    try:
        yield path
    finally:
        runner.run(["rm", "-rf", "--", str(path)], timeout=60)


@contextlib.contextmanager
def qemu_nbd_export(
    runner: Runner,
    image: Path,
    *,
    disk: Disk,
    fmt: str = "qcow2",
    snapshot: str | None = None,
    force_share: bool = False,
    export_name: str = "vmsnap",
) -> Iterator[ExportSource]:
    """Serve ``image`` (or its internal ``snapshot``) read-only with ``qemu-nbd`` on a private unix socket.

    The server daemonises (``--fork``) and writes its pid; it is stopped by that pid on exit, also when the
    body raises. ``force_share`` opens the image while a running QEMU holds it.

    :raise SnapshotError: qemu-nbd could not serve the image (message carries its error)
    """
    validate_name(export_name, "NBD export name")
    with private_directory(runner, "vmsnap-nbd") as workdir:
        sock = workdir / "nbd.sock"
        pid_file = workdir / "qemu-nbd.pid"
        argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=4", "--fork"]
        argv += ["--pid-file", str(pid_file), "--socket", str(sock), "--export-name", export_name]
        if snapshot is not None:
            argv += ["--load-snapshot", f"snapshot.name={image_opts_escape(snapshot)}"]
        if force_share:
            opts = f"driver={fmt},force-share=on,read-only=on,file.filename={image_opts_escape(str(image))}"
            argv += ["--image-opts", opts]
        else:
            argv += ["--format", fmt, str(image)]
        try:
            runner.run(argv, timeout=60)
        except CommandError as err:
            raise SnapshotError(
                f"qemu-nbd could not export {image}"
                + (f" snapshot {snapshot!r}" if snapshot else "")
                + f": {err.stderr.strip().splitlines()[-1] if err.stderr.strip() else err}",
                hint="check that the image and snapshot exist and that qemu-nbd is installed",
            ) from err
        pid = runner.run(["cat", str(pid_file)], timeout=30).stdout.strip()
        try:
            yield ExportSource(
                kind="nbd",
                location=f"nbd+unix:///{export_name}?socket={sock}",
                format="raw",
                disk=disk,
                virtual_size=disk.virtual_size,
            )
        finally:
            stop_process(runner, pid)


def stop_process(runner: Runner, pid: str, *, timeout: float = 10.0) -> None:
    """Stop the process ``pid`` (SIGTERM, then SIGKILL after ``timeout`` seconds) and wait until it is gone.

    A zombie counts as gone: it holds no files any more, and a daemonised process is reaped by init, which
    may take its time.

    :param pid: as read from a pid file; anything but digits is ignored
    """
    if not pid.isdigit():
        return
    script = (
        'alive() { s=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }; '
        'kill -TERM "$1" 2>/dev/null || exit 0; i=0; while alive "$1"; do i=$((i+1)); '
        'if [ "$i" -gt "$2" ]; then kill -KILL "$1" 2>/dev/null; fi; sleep 0.02; done'
    )
    runner.run(["sh", "-c", script, "sh", pid, str(max(1, int(timeout / 0.02)))], timeout=timeout + 30)


def file_source(
    image: Path, *, disk: Disk, fmt: str = "qcow2", snapshot: str | None = None, force_share: bool = True
) -> ExportSource:
    """A file :class:`ExportSource` for ``image`` (optionally its internal ``snapshot``)."""
    return ExportSource(
        kind="file",
        location=str(image),
        format=fmt,
        disk=disk,
        virtual_size=disk.virtual_size,
        image_opts={"snapshot.name": snapshot} if snapshot is not None else {},
        force_share=force_share,
    )


def require_qcow2(disk: Disk, strategy: str) -> None:
    """:raise UnsupportedError: ``disk`` is not a qcow2 image."""
    if disk.format != "qcow2":
        raise UnsupportedError(
            f"{strategy} snapshots need a qcow2 image, but disk {disk.name} ({disk.file}) is {disk.format}",
            hint="convert it with `qemu-img convert -O qcow2`, or pick another strategy (vmsnap strategies)",
        )


def distinct_names(disks: Sequence[Disk]) -> None:
    """:raise VmsnapError: two of ``disks`` are the same disk."""
    seen: set[str] = set()
    for disk in disks:
        key = str(disk.file)
        if key in seen:
            raise VmsnapError(f"disk {disk.name} ({disk.file}) is listed twice", hint="name each disk once")
        seen.add(key)
