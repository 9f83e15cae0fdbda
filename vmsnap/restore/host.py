"""This host's side of a mount: loop devices (``losetup``), filesystem mounts (``mount``/``umount``) and the
tables that show what exists (``/proc/self/mounts``, ``losetup -J``), found again by what backs them so that a
killed process's leftovers are recognised without its records.

Every command is an argv list through a :class:`~vmsnap.runner.Runner`; it must run on this host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import CommandError, UsageError, VmsnapError
from vmsnap.runner import Runner


@attrs.frozen
class MountEntry:
    """One line of ``/proc/self/mounts``."""

    source: str
    target: Path
    fstype: str
    options: tuple[str, ...]


@attrs.frozen
class LoopDevice:
    """One attached loop device, as ``losetup -J`` shows it."""

    name: str
    back_file: str
    offset: int
    size_limit: int
    read_only: bool


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[MountEntry]:
    """Parse ``/proc/self/mounts`` (octal escapes of spaces and backslashes undone)."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            entries.append(
                MountEntry(
                    _unescape(parts[0]), Path(_unescape(parts[1])), parts[2], tuple(parts[3].split(","))
                )
            )
    return entries


def mounts() -> list[MountEntry]:
    """Every mount this process sees."""
    return parse_mounts(Path("/proc/self/mounts").read_text())


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


def under(path: str | Path, directory: Path) -> bool:
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
