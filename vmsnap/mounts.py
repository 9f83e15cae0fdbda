"""The mount table: one parser of ``/proc/PID/mountinfo`` (see proc(5)) for every module that asks what is
mounted where — storage strategies (which filesystem holds a disk), mounts of backups and the FUSE files
of the storage daemon (what is left mounted after a crash).

A line of mountinfo, with the fields this module keeps::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
          (1)  (2)   (3)     (4)                (5)   (6)
    (1) device  (2) root  (3) mount_point  (4) options  (5) fstype  (6) source

Paths and sources are written with octal escapes (``\\040`` for a space, ``\\134`` for a backslash); they
are undone here.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import attrs

MOUNTINFO = Path("/proc/self/mountinfo")
"""This process's mount table."""

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of a mountinfo field."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@attrs.frozen
class Mount:
    """One line of ``/proc/self/mountinfo``.

    :param mount_point: where it is mounted
    :param device: ``major:minor`` of the filesystem (for Btrfs, an anonymous per-subvolume number)
    :param fstype: filesystem type ("btrfs", "ext4", "fuse", …)
    :param source: what was mounted ("/dev/mapper/vg-lv", "/dev/loop0", "tmpfs")
    :param root: the directory of the filesystem that is mounted there ("/" or a bind / subvolume path)
    :param options: the per-mount options ("ro,nosuid,nodev")
    """

    mount_point: PurePosixPath
    device: str
    fstype: str
    source: str
    root: str = "/"
    options: str = ""


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (see proc(5)), in its order (later mounts last); lines that do not parse
    are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_point=PurePosixPath(unescape(fields[4])),
                device=fields[2],
                fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]),
                root=unescape(fields[3]),
                options=fields[5],
            )
        )
    return mounts


def local_mounts() -> list[Mount]:
    """Every mount this process sees on this host.

    :raise OSError: ``/proc`` is not mounted
    """
    return parse_mountinfo(MOUNTINFO.read_text())


def fuse_mounted(path: Path) -> bool:
    """True when a FUSE filesystem is mounted on ``path`` here (False when the table cannot be read)."""
    try:
        table = local_mounts()
    except OSError:
        return False
    wanted = PurePosixPath(path)
    return any(m.fstype.startswith("fuse") and m.mount_point == wanted for m in table)
