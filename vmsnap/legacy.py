"""Old signatures of the first two rounds' helpers whose new homes take other arguments, kept for callers of
their old modules (:mod:`vmsnap.moved` maps them; each import warns and names the function to use now).
Nothing in vmsnap calls these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmsnap import processes
from vmsnap.image import digest, qcow2, qemu_img
from vmsnap.runner import Runner
from vmsnap.strategies.lvm_tool import LogicalVolume, Lvm, VolumeGroupSpace


def image_info(runner: Runner, image: Path, *, force_share: bool = True) -> dict[str, Any]:
    """``vmsnap.machine.image_info``: now :func:`vmsnap.image.qemu_img.info`."""
    return qemu_img.info(runner, image, force_share=force_share)


def image_chain(runner: Runner, image: Path, *, force_share: bool = True) -> list[dict[str, Any]]:
    """``vmsnap.machine.image_chain``: now :func:`vmsnap.image.qemu_img.chain_info`."""
    return qemu_img.chain_info(runner, image, force_share=force_share)


def imageio_image_info(
    path: str | Path,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    backing_chain: bool = False,
    runner: Runner | None = None,
) -> Any:
    """``vmsnap.imageio.image_info``: now :func:`vmsnap.image.qemu_img.info` (or ``chain_info``)."""
    if backing_chain:
        return qemu_img.chain_info(runner, path, fmt=fmt, force_share=force_share)
    return qemu_img.info(runner, path, fmt=fmt, force_share=force_share)


def internal_snapshots(runner: Runner, image: Path, *, force_share: bool = True) -> list[dict[str, Any]]:
    """``vmsnap.strategies.qemu_common.internal_snapshots``: ``qemu_img.info(...)["snapshots"]``."""
    return list(qemu_img.info(runner, image, force_share=force_share).get("snapshots", []))


def guest_digest(path: str | Path, format: str = "qcow2", **options: Any) -> str:
    """``vmsnap.digest.guest_digest``: now ``vmsnap.image.digest.image_chunks(...).root``."""
    return digest.image_chunks(path, format, **options).root


def process_matches(pid: int, program: str, marker: str, start_time: int | None = None) -> bool:
    """``vmsnap.image.storage_daemon.process_matches``: now :func:`vmsnap.processes.matches`."""
    return processes.matches(pid, processes.Identity(program, marker, start_time))


def stop_recorded_process(
    pid: int, program: str, marker: str, start_time: int | None = None, *, timeout: float = 10.0
) -> bool:
    """``vmsnap.image.storage_daemon.stop_process``: now :func:`vmsnap.processes.terminate`."""
    identity = processes.Identity(program, marker, start_time)
    return processes.terminate(pid, timeout=timeout, identity=identity)


def list_logical_volumes(runner: Runner, *selectors: str) -> list[LogicalVolume]:
    """``vmsnap.storage.list_logical_volumes``: now ``Lvm(runner).volumes(...)``."""
    return Lvm(runner).volumes(*selectors)


def logical_volume(runner: Runner, full_name: str) -> LogicalVolume:
    """``vmsnap.storage.logical_volume``: now ``Lvm(runner).volume(...)``."""
    return Lvm(runner).volume(full_name)


def volume_group_space(runner: Runner, vg: str) -> VolumeGroupSpace:
    """``vmsnap.storage.volume_group_space``: now ``Lvm(runner).group_space(...)``."""
    return Lvm(runner).group_space(vg)


def qcow2_virtual_size(path: Path) -> int:
    """``vmsnap.strategies.backup.qcow2_virtual_size``: now ``vmsnap.image.qcow2.read_header(path)``."""
    return qcow2.read_header(path).virtual_size
