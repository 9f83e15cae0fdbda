"""Where a disk lives: a file on some filesystem, a file in a Btrfs subvolume, an LVM logical volume.

Storage strategies (btrfs, lvm) ask this module before they snapshot; every look-up runs through a
:class:`~vmsnap.runner.Runner`, so it works on this host, over SSH, and inside a guest (busybox is enough).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import PurePath, PurePosixPath
from typing import Any

import attrs

from vmsnap.errors import CommandError, NotFoundError, UnsupportedError
from vmsnap.runner import Runner


class StorageScopeWarning(UserWarning):
    """A storage snapshot holds (and a rollback turns back) more than this VM's disks: other files, VMs."""


class StorageNoteWarning(UserWarning):
    """Something about a storage snapshot the user should act on (a deferred merge, a leftover to remove)."""


#: the inode number of every Btrfs subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID)
BTRFS_SUBVOLUME_ROOT_INODE = 256

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/self/mountinfo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@attrs.frozen
class Mount:
    """One line of ``/proc/self/mountinfo``.

    :param mount_point: where it is mounted
    :param device: ``major:minor`` of the filesystem (for Btrfs, an anonymous per-subvolume number)
    :param fstype: filesystem type ("btrfs", "ext4", …)
    :param source: what was mounted ("/dev/mapper/vg-lv", "/dev/loop0", "tmpfs")
    :param root: the directory of the filesystem that is mounted there ("/" or a bind / subvolume path)
    """

    mount_point: PurePosixPath
    device: str
    fstype: str
    source: str
    root: str = "/"
    options: str = ""


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (see proc(5)); lines that do not parse are skipped."""
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
                mount_point=PurePosixPath(_unescape(fields[4])),
                device=fields[2],
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                root=_unescape(fields[3]),
                options=fields[5],
            )
        )
    return mounts


def resolve_path(runner: Runner, path: PurePath | str) -> PurePosixPath:
    """The canonical absolute path of ``path`` where ``runner`` runs (``readlink -f``).

    :raise NotFoundError: the path does not exist there
    """
    result = runner.run(["readlink", "-f", "--", str(path)], ok_codes=(0, 1), timeout=60)
    resolved = result.stdout.strip()
    if result.exit_code != 0 or not resolved:
        raise NotFoundError(f"{path} does not exist on {runner.host}", hint="check the disk's path")
    probe = runner.run(["test", "-e", resolved], ok_codes=(0, 1), timeout=60)
    if probe.exit_code != 0:
        raise NotFoundError(f"{path} does not exist on {runner.host}", hint="check the disk's path")
    return PurePosixPath(resolved)


def mount_of_path(path: PurePosixPath, mounts: Sequence[Mount]) -> Mount:
    """The mount holding ``path`` (absolute, resolved): the longest mount-point prefix; the last one wins."""
    best: Mount | None = None
    for mount in mounts:
        holds = path == mount.mount_point or mount.mount_point in path.parents
        if holds and (best is None or len(mount.mount_point.parts) >= len(best.mount_point.parts)):
            best = mount
    if best is None:
        raise NotFoundError(f"no mount holds {path}", hint="is /proc mounted?")
    return best


def mount_of(runner: Runner, path: PurePath | str) -> tuple[PurePosixPath, Mount]:
    """Resolve ``path`` and find the mount that holds it, where ``runner`` runs.

    :return: (resolved path, its mount)
    :raise NotFoundError: the path does not exist
    """
    resolved = resolve_path(runner, path)
    text = runner.run(["cat", "/proc/self/mountinfo"], timeout=60).stdout
    return resolved, mount_of_path(resolved, parse_mountinfo(text))


# -- Btrfs ------------------------------------------------------------------------------------------


@attrs.frozen
class BtrfsLocation:
    """A file inside a Btrfs subvolume.

    :param file: the file's resolved path
    :param subvolume: the root directory of the subvolume that holds it
    :param mount: the Btrfs mount the subvolume is visible through
    """

    file: PurePosixPath
    subvolume: PurePosixPath
    mount: Mount

    @property
    def relative(self) -> PurePosixPath:
        """The file's path inside its subvolume."""
        return self.file.relative_to(self.subvolume)

    @property
    def subvolume_in_mount(self) -> PurePosixPath:
        """The subvolume's path below the mount point ("." when it is the mounted subvolume itself)."""
        return self.subvolume.relative_to(self.mount.mount_point)


def btrfs_location(runner: Runner, path: PurePath | str) -> BtrfsLocation:
    """Find the Btrfs subvolume that holds ``path``.

    The subvolume root is the nearest ancestor directory whose inode number is 256; one ``stat`` call
    covers every ancestor up to the mount point.

    :raise NotFoundError: the path does not exist
    :raise UnsupportedError: the path is not on Btrfs (the message names the filesystem found)
    """
    resolved, mount = mount_of(runner, path)
    if mount.fstype != "btrfs":
        raise UnsupportedError(
            f"{path} is on {mount.fstype} ({mount.source} mounted at {mount.mount_point}), not on Btrfs",
            hint="the btrfs strategy needs the disk image in a Btrfs subvolume; pick another strategy",
        )
    ancestors = [resolved.parent]
    while ancestors[-1] != mount.mount_point and ancestors[-1] != ancestors[-1].parent:
        ancestors.append(ancestors[-1].parent)
    result = runner.run(["stat", "-c", "%i", "--", *map(str, ancestors)], timeout=60)
    inodes = result.stdout.split()
    for directory, inode in zip(ancestors, inodes, strict=True):
        if int(inode) == BTRFS_SUBVOLUME_ROOT_INODE:
            return BtrfsLocation(resolved, directory, mount)
    # the mount point of a Btrfs filesystem is always some subvolume's root
    return BtrfsLocation(resolved, mount.mount_point, mount)


def is_btrfs_subvolume(runner: Runner, path: PurePath | str) -> bool:
    """True when ``path`` is the root directory of a Btrfs subvolume (or snapshot)."""
    result = runner.run(["stat", "-f", "-c", "%T", "--", str(path)], ok_codes=(0, 1), timeout=60)
    if result.exit_code != 0 or result.stdout.strip() != "btrfs":
        return False
    inode = runner.run(["stat", "-c", "%i", "--", str(path)], timeout=60).stdout.strip()
    return inode == str(BTRFS_SUBVOLUME_ROOT_INODE)


# -- LVM --------------------------------------------------------------------------------------------

LVS_FIELDS = (
    "lv_name",
    "vg_name",
    "lv_path",
    "lv_size",
    "lv_attr",
    "origin",
    "snap_percent",
    "pool_lv",
    "lv_kernel_major",
    "lv_kernel_minor",
    "lv_tags",
    "lv_time",
)


def _number(value: Any) -> float | None:
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


@attrs.frozen
class LogicalVolume:
    """One row of ``lvs``.

    :param attr: ``lv_attr`` (10 characters, see lvs(8)); the helpers below decode the parts vmsnap needs
    :param snap_percent: how full a snapshot's copy-on-write space is (None for non-snapshots)
    :param kernel_device: ``major:minor`` while active, else ""
    """

    name: str
    vg: str
    path: str
    size: int
    attr: str
    origin: str = ""
    snap_percent: float | None = None
    pool: str = ""
    kernel_device: str = ""
    tags: tuple[str, ...] = ()
    created: str = ""

    @property
    def full_name(self) -> str:
        """``vg/lv``, how LVM commands address it."""
        return f"{self.vg}/{self.name}"

    @property
    def device(self) -> str:
        """The device node (``/dev/vg/lv``)."""
        return self.path or f"/dev/{self.vg}/{self.name}"

    @property
    def is_thin(self) -> bool:
        """A thin volume (its snapshots need no size and are activated with ``-K``)."""
        return self.attr[:1] == "V" or bool(self.pool)

    @property
    def is_snapshot(self) -> bool:
        """A classic or thin snapshot of another LV."""
        return bool(self.origin)

    @property
    def is_invalid(self) -> bool:
        """A classic snapshot whose copy-on-write space ran full: its content is lost.

        (For thin volumes lvs reports the data fill as ``snap_percent``; that is not a snapshot's fill.)
        """
        if self.attr[:1] not in ("s", "S"):
            return False
        return self.attr[4:5] == "I" or (self.snap_percent is not None and self.snap_percent >= 100.0)

    @property
    def is_active(self) -> bool:
        return self.attr[4:5] == "a"

    @property
    def is_open(self) -> bool:
        """Some process (a mount, QEMU) holds the device open."""
        return self.attr[5:6] == "o"

    @property
    def is_merging(self) -> bool:
        """An origin with a merge pending or running (``lvconvert --merge``)."""
        return self.attr[:1] in ("O", "S")


def parse_lvs_json(text: str) -> list[LogicalVolume]:
    """Parse ``lvs --reportformat json --units b --nosuffix -o <LVS_FIELDS>``.

    :raise UnsupportedError: the text is not lvs JSON (an lvm2 too old for ``--reportformat json``)
    """
    try:
        report = json.loads(text)
        rows = [row for part in report["report"] for row in part.get("lv", [])]
    except (ValueError, KeyError, TypeError) as err:
        raise UnsupportedError(
            "lvs did not print a JSON report", hint="vmsnap needs lvm2 2.02.158 or newer"
        ) from err
    volumes = []
    for row in rows:
        major, minor = str(row.get("lv_kernel_major", "")), str(row.get("lv_kernel_minor", ""))
        active = major.isdigit() and minor.isdigit()
        size = _number(row.get("lv_size", ""))
        volumes.append(
            LogicalVolume(
                name=str(row["lv_name"]).strip("[]"),
                vg=str(row["vg_name"]),
                path=str(row.get("lv_path", "")),
                size=int(size) if size is not None else 0,
                attr=str(row.get("lv_attr", "")),
                origin=str(row.get("origin", "")),
                snap_percent=_number(row.get("snap_percent", "")),
                pool=str(row.get("pool_lv", "")),
                kernel_device=f"{major}:{minor}" if active else "",
                tags=tuple(t for t in str(row.get("lv_tags", "")).split(",") if t),
                created=str(row.get("lv_time", "")),
            )
        )
    return volumes


def list_logical_volumes(runner: Runner, *selectors: str) -> list[LogicalVolume]:
    """``lvs`` of the given ``vg`` / ``vg/lv`` names (all LVs when none are given)."""
    argv = ["lvm", "lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", ",".join(LVS_FIELDS)]
    result = runner.run([*argv, *selectors], timeout=120)
    return parse_lvs_json(result.stdout)


def logical_volume(runner: Runner, full_name: str) -> LogicalVolume:
    """The LV called ``vg/lv``.

    :raise NotFoundError: no such LV
    """
    try:
        volumes = list_logical_volumes(runner, full_name)
    except CommandError as err:
        raise NotFoundError(f"no logical volume {full_name}: {err.message}", hint="check `lvs`") from err
    for volume in volumes:
        if volume.full_name == full_name:
            return volume
    raise NotFoundError(f"no logical volume {full_name}", hint="check `lvs`")


@attrs.frozen
class VolumeGroupSpace:
    """Free space of a volume group, in bytes."""

    name: str
    size: int
    free: int
    extent_size: int


def parse_vgs_json(text: str) -> list[VolumeGroupSpace]:
    """Parse ``vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free,vg_extent_size``."""
    try:
        rows = [row for part in json.loads(text)["report"] for row in part.get("vg", [])]
        return [
            VolumeGroupSpace(
                name=str(r["vg_name"]),
                size=int(float(r["vg_size"])),
                free=int(float(r["vg_free"])),
                extent_size=int(float(r["vg_extent_size"])),
            )
            for r in rows
        ]
    except (ValueError, KeyError, TypeError) as err:
        raise UnsupportedError(
            "vgs did not print a JSON report", hint="vmsnap needs lvm2 2.02.158 or newer"
        ) from err


def volume_group_space(runner: Runner, vg: str) -> VolumeGroupSpace:
    """Size and free space of volume group ``vg``."""
    argv = ["lvm", "vgs", "--reportformat", "json", "--units", "b", "--nosuffix"]
    result = runner.run([*argv, "-o", "vg_name,vg_size,vg_free,vg_extent_size", vg], timeout=120)
    groups = parse_vgs_json(result.stdout)
    if not groups:
        raise NotFoundError(f"no volume group {vg}", hint="check `vgs`")
    return groups[0]


@attrs.frozen
class LvmLocation:
    """A disk on LVM: either the LV itself is the disk, or the disk is a file on a filesystem on the LV.

    :param volume: the logical volume
    :param file: the disk's resolved path (the LV's device node, or the image file)
    :param mount: the LV's mount when the disk is a file on it, else None
    """

    volume: LogicalVolume
    file: PurePosixPath
    mount: Mount | None = None

    @property
    def is_file(self) -> bool:
        return self.mount is not None

    @property
    def relative(self) -> PurePosixPath:
        """The image file's path inside the LV's filesystem (only when :attr:`is_file`)."""
        if self.mount is None:
            raise UnsupportedError(f"{self.file} is the LV itself, not a file on it")
        inside = self.file.relative_to(self.mount.mount_point)
        root = PurePosixPath(self.mount.root)
        return (root / inside).relative_to("/") if root.is_absolute() else inside


def _device_numbers(runner: Runner, path: PurePosixPath) -> str | None:
    """``major:minor`` of a block device node, or None when ``path`` is not one."""
    result = runner.run(["stat", "-L", "-c", "%F|%t|%T", "--", str(path)], timeout=60)
    kind, major, minor = result.stdout.strip().split("|")
    if kind != "block special file":
        return None
    return f"{int(major, 16)}:{int(minor, 16)}"


def lvm_location(
    runner: Runner, path: PurePath | str, volumes: Sequence[LogicalVolume] | None = None
) -> LvmLocation:
    """Find the LV under ``path``: the LV's own device node, or the LV whose filesystem holds the file.

    :param volumes: the output of :func:`list_logical_volumes` when the caller has it already

    :raise NotFoundError: the path does not exist
    :raise UnsupportedError: it is neither an LV nor on one (the message names what it is on)
    """
    resolved, mount = mount_of(runner, path)
    device = _device_numbers(runner, resolved)
    is_device = device is not None
    if device is None:
        device = mount.device
    if volumes is None:
        volumes = list_logical_volumes(runner)
    for volume in volumes:
        if volume.kernel_device and volume.kernel_device == device:
            return LvmLocation(volume, resolved, None if is_device else mount)
    if is_device:
        found = f"block device {resolved} ({device})"
    else:
        found = f"{mount.fstype} on {mount.source} mounted at {mount.mount_point}"
    raise UnsupportedError(
        f"{path} is not on an LVM logical volume: it is {'a ' + found if is_device else 'on ' + found}",
        hint="the lvm strategy needs the disk to be an LV or a file on a filesystem on an LV",
    )
