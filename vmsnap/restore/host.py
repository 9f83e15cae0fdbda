"""This host's side of a mount: loop devices (``losetup``), filesystem mounts (``mount``/``umount``) and the
loop device table (``losetup -J``; the mount table is :mod:`vmsnap.mounts`), found again by what backs them
so that a killed process's leftovers are recognised without its records.

Every command is an argv list through a :class:`~vmsnap.runner.Runner`; it must run on this host.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import attrs

from vmsnap.errors import CommandError, UsageError, VmsnapError
from vmsnap.runner import Runner


@attrs.frozen
class LoopDevice:
    """One attached loop device, as ``losetup -J`` shows it."""

    name: str
    back_file: str
    offset: int
    size_limit: int
    read_only: bool


def parse_losetup(text: str) -> list[LoopDevice]:
    """Parse ``losetup -J --list`` (empty output: no loop devices)."""
    if not text.strip():
        return []
    data: Any = json.loads(text)
    devices = []
    for entry in data.get("loopdevices", []):
        back = str(entry.get("back-file") or "")
        devices.append(
            LoopDevice(
                name=str(entry["name"]),
                back_file=back.removesuffix(" (deleted)"),
                offset=int(entry.get("offset") or 0),
                size_limit=int(entry.get("sizelimit") or 0),
                read_only=bool(entry.get("ro")),
            )
        )
    return devices


def loop_devices(runner: Runner) -> list[LoopDevice]:
    """Every attached loop device.

    :raise CommandError: losetup failed
    """
    return parse_losetup(runner.run(["losetup", "--json", "--list"], timeout=60).stdout)


def under(path: str | PurePath, directory: Path) -> bool:
    """True when ``path`` is ``directory`` or inside it (by name, no symlinks followed)."""
    text, root = os.path.normpath(str(path)), os.path.normpath(str(directory))
    return text == root or text.startswith(root.rstrip("/") + "/")


def attach_loop(runner: Runner, file: Path, offset: int, size: int) -> str:
    """Attach a read-only loop device to ``size`` bytes of ``file`` at ``offset``; returns ``/dev/loopN``.

    :raise CommandError: losetup failed (no free loop device, no loop support)
    """
    result = runner.run(
        [
            "losetup",
            "--read-only",
            "--offset",
            str(offset),
            "--sizelimit",
            str(size),
            "--show",
            "--find",
            str(file),
        ],
        timeout=60,
    )
    device = result.stdout.strip()
    if not device.startswith("/dev/loop"):
        raise VmsnapError(f"losetup attached {file} but printed {device!r}, not a loop device")
    return device


def detach_loop(runner: Runner, device: str) -> None:
    """Detach a loop device (an already detached one is fine).

    :raise CommandError: losetup refused (it is still in use)
    """
    try:
        runner.run(["losetup", "--detach", device], timeout=60)
    except CommandError as err:
        if "No such device" in err.stderr or "failed to use device" in err.stderr:
            return
        raise


def mount_filesystem(runner: Runner, device: str, target: Path, fstype: str, options: Sequence[str]) -> None:
    """``mount -t TYPE -o OPTIONS DEVICE TARGET``.

    :raise CommandError: mount failed (its last line says why)
    """
    if any("," in option for option in options):
        raise UsageError(f"mount option with a comma in {list(options)}")
    runner.run(["mount", "-t", fstype, "-o", ",".join(options), device, str(target)], timeout=300)


def unmount(runner: Runner, target: Path, *, lazy: bool = False) -> None:
    """``umount TARGET`` (``--lazy``: detach now, let go when the last user does).

    :raise CommandError: umount failed, e.g. the target is busy
    """
    argv = ["umount", str(target)] if not lazy else ["umount", "--lazy", str(target)]
    runner.run(argv, timeout=300)


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
