"""What is on a disk, from ``sfdisk -J`` and ``blkid -p -o export``: partitions (MBR and GPT, or one
filesystem on the whole disk) and the filesystem of each, with the read-only mount options that never
replay a journal.

Pure parsing, no I/O: :mod:`vmsnap.restore.mount` runs the commands and passes their output here.

Partitions are named ``p<N>`` after their number in the table (``p1``, ``p5`` for the first MBR logical
partition), never after a GPT partition name: numbers are unique and stable, GPT names may repeat, be empty,
or hold anything the guest wrote. The GPT name is kept as a label for display. A disk without a partition
table is one candidate named ``disk``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from vmsnap.errors import UsageError

WHOLE_DISK = "disk"
"""The name of the one candidate of a disk without a partition table."""

_EXTENDED_MBR_TYPES = {"5", "f", "85"}
_GPT_TYPES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
}
_MBR_TYPES = {"82": "Linux swap", "83": "Linux", "8e": "Linux LVM", "fd": "Linux RAID", "ef": "EFI System"}

READ_ONLY_BASE = ("ro", "nodev", "nosuid", "noexec")
"""Every mount: read-only, and nothing in a guest's filesystem can act on the host (devices, setuid)."""

_NO_REPLAY: Mapping[str, tuple[str, ...]] = {
    "ext4": ("noload",),  # do not load (replay) the journal
    "ext3": ("noload",),
    "ext2": (),
    "xfs": ("norecovery", "nouuid"),  # no log recovery; a second copy of a mounted UUID still mounts
    "btrfs": ("rescue=nologreplay",),  # no log tree replay; a cloned fsid gets a temp-fsid (Linux ≥ 6.7)
    "vfat": (),
}

MOUNTABLE = tuple(_NO_REPLAY)
"""Filesystem types vmsnap mounts (when this host's kernel reads them)."""


@attrs.frozen
class Partition:
    """One partition (or the whole disk) as a byte range of the disk.

    :param name: ``p<N>``, or :data:`WHOLE_DISK`
    :param number: its number in the table (0 for the whole disk)
    :param offset: its first byte
    :param size: its length in bytes
    :param type: the table's type (GPT type GUID or MBR type code), "" for the whole disk
    :param label: the GPT partition name, when it has one
    """

    name: str
    number: int
    offset: int
    size: int
    type: str = ""
    label: str = ""

    @property
    def type_name(self) -> str:
        """The partition type in words ("EFI System"), or the raw type."""
        return _GPT_TYPES.get(self.type.upper()) or _MBR_TYPES.get(self.type.lower()) or self.type

    def describe(self) -> str:
        """ "partition p2 (EFI System)" / "the whole disk" — for messages."""
        if self.name == WHOLE_DISK:
            return "the whole disk"
        kind = self.type_name
        return f"partition {self.name}" + (f" ({kind})" if kind else "")


@attrs.frozen
class PartitionTable:
    """``label`` ("gpt", "dos", or "" when the disk has none) and its partitions in table order."""

    label: str
    partitions: tuple[Partition, ...]


def whole_disk(size: int) -> PartitionTable:
    """The table of a disk without one: the whole disk as one candidate."""
    return PartitionTable("", (Partition(WHOLE_DISK, 0, 0, size),))


def _number(node: str, device: str) -> int:
    tail = node[len(device) :] if node.startswith(device) else node
    digits = ""
    for char in reversed(tail):
        if not char.isdigit():
            break
        digits = char + digits
    if not digits:
        raise ValueError(f"partition node {node!r} has no number")
    return int(digits)


def parse_sfdisk(text: str, disk_size: int) -> PartitionTable:
    """Parse ``sfdisk -J DISK``.

    MBR extended partitions (the containers of logical ones) are left out; a partition that reaches past the
    end of the disk is clipped (a damaged or truncated image still shows what it can).

    :param text: sfdisk's JSON
    :param disk_size: the disk's size in bytes
    :raise UsageError: the JSON is not an sfdisk partition table
    """
    try:
        data: Any = json.loads(text)["partitiontable"]
        label = str(data.get("label", ""))
        device = str(data.get("device", ""))
        unit = str(data.get("unit", "sectors"))
        sector = int(data.get("sectorsize", 512))
        if unit != "sectors":
            raise ValueError(f"unit {unit!r}")
        found: list[Partition] = []
        for entry in data.get("partitions", []):
            type_code = str(entry.get("type", ""))
            if label == "dos" and type_code.lower() in _EXTENDED_MBR_TYPES:
                continue
            number = _number(str(entry["node"]), device)
            offset = int(entry["start"]) * sector
            size = int(entry["size"]) * sector
            if offset >= disk_size or size <= 0:
                continue
            size = min(size, disk_size - offset)
            found.append(Partition(f"p{number}", number, offset, size, type_code, str(entry.get("name", ""))))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"sfdisk printed no partition table vmsnap understands ({err})") from err
    return PartitionTable(label, tuple(found))


def parse_blkid(text: str) -> dict[str, str]:
    """Parse ``blkid -p -o export``: ``KEY=value`` lines (``\\``-escapes in values are kept as they are)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            found[key.strip()] = value.strip()
    return found


def mount_options(fstype: str) -> tuple[str, ...]:
    """The read-only mount options for ``fstype`` that never replay a journal or log.

    :raise UsageError: vmsnap does not mount that type
    """
    if fstype not in _NO_REPLAY:
        raise UsageError(
            f"vmsnap does not mount {fstype} filesystems", hint=f"it mounts {', '.join(MOUNTABLE)}"
        )
    return (*READ_ONLY_BASE, *_NO_REPLAY[fstype])


def not_mountable(probe: Mapping[str, str]) -> str | None:
    """Why a blkid probe result cannot be mounted by vmsnap (None when its type is mountable).

    :param probe: :func:`parse_blkid` of the partition ({} when blkid found nothing)
    """
    fstype = probe.get("TYPE", "")
    usage = probe.get("USAGE", "")
    if not fstype:
        return "no filesystem (blkid found nothing)"
    if fstype in _NO_REPLAY:
        return None
    if fstype == "swap":
        return "swap space, no files"
    if fstype == "LVM2_member":
        return "an LVM physical volume (activate its volume group on a copy of the disk to read it)"
    if usage == "raid" or fstype.endswith("_raid_member"):
        return f"a RAID member ({fstype}), not a filesystem by itself"
    if usage == "crypto" or fstype == "crypto_LUKS":
        return f"an encrypted volume ({fstype})"
    return f"a {fstype} filesystem, which vmsnap does not mount (it mounts {', '.join(MOUNTABLE)})"
