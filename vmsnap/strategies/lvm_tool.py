"""The one wrapper of the ``lvm`` program (:class:`Lvm`), how its reports read, and where a disk lives on LVM.

Every LVM command vmsnap runs is built here, as ``lvm <command> …`` (one binary: the lab guest and minimal
hosts have no ``lvs``/``lvcreate`` links); all run through a :class:`~vmsnap.runner.Runner`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import PurePath, PurePosixPath
from typing import Any

import attrs

from vmsnap.errors import CommandError, NotFoundError, UnsupportedError
from vmsnap.mounts import Mount
from vmsnap.runner import Runner
from vmsnap.strategies.storage import mount_of, stat_paths

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
VGS_FIELDS = ("vg_name", "vg_size", "vg_free", "vg_extent_size")


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


def _report_rows(text: str, report: str) -> list[dict[str, Any]]:
    """The rows of an ``lvs``/``vgs`` JSON report (``report``: "lv" or "vg").

    :raise UnsupportedError: the text is not such a report (an lvm2 too old for ``--reportformat json``)
    """
    try:
        return [row for part in json.loads(text)["report"] for row in part.get(report, [])]
    except (ValueError, KeyError, TypeError) as err:
        raise UnsupportedError(
            f"{report}s did not print a JSON report", hint="vmsnap needs lvm2 2.02.158 or newer"
        ) from err


def parse_lvs_json(text: str) -> list[LogicalVolume]:
    """Parse ``lvs --reportformat json --units b --nosuffix -o <LVS_FIELDS>``.

    :raise UnsupportedError: the text is not lvs JSON (an lvm2 too old for ``--reportformat json``)
    """
    volumes = []
    for row in _report_rows(text, "lv"):
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


@attrs.frozen
class VolumeGroupSpace:
    """Free space of a volume group, in bytes."""

    name: str
    size: int
    free: int
    extent_size: int


def parse_vgs_json(text: str) -> list[VolumeGroupSpace]:
    """Parse ``vgs --reportformat json --units b --nosuffix -o <VGS_FIELDS>``.

    :raise UnsupportedError: the text is not vgs JSON
    """
    rows = _report_rows(text, "vg")
    try:
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


@attrs.frozen
class Lvm:
    """``lvm <command> …`` where ``runner`` runs: reports, snapshots, activation, merges.

    :raise CommandError: from every method, when the command fails (LVM's message is in the error)
    :raise CommandTimeoutError: from every method, when it runs past its timeout
    """

    runner: Runner

    def _run(self, command: str, *args: str, timeout: float = 600) -> str:
        return self.runner.run(["lvm", command, *args], timeout=timeout).stdout

    def _report(self, command: str, fields: Sequence[str], *selectors: str) -> str:
        report = ["--reportformat", "json", "--units", "b", "--nosuffix", "-o", ",".join(fields)]
        return self._run(command, *report, *selectors, timeout=120)

    def volumes(self, *selectors: str) -> list[LogicalVolume]:
        """``lvs`` of the given ``vg`` / ``vg/lv`` names (all LVs when none are given)."""
        return parse_lvs_json(self._report("lvs", LVS_FIELDS, *selectors))

    def volume(self, full_name: str) -> LogicalVolume:
        """The LV called ``vg/lv``.

        :raise NotFoundError: no such LV
        """
        try:
            volumes = self.volumes(full_name)
        except CommandError as err:
            raise NotFoundError(f"no logical volume {full_name}: {err.message}", hint="check `lvs`") from err
        for volume in volumes:
            if volume.full_name == full_name:
                return volume
        raise NotFoundError(f"no logical volume {full_name}", hint="check `lvs`")

    def find(self, full_name: str) -> LogicalVolume | None:
        """The LV called ``vg/lv``, or None when there is none."""
        try:
            return self.volume(full_name)
        except NotFoundError:
            return None

    def exists(self, full_name: str) -> bool:
        """True when the LV ``vg/lv`` exists."""
        return self.find(full_name) is not None

    def group_space(self, vg: str) -> VolumeGroupSpace:
        """Size and free space of volume group ``vg``.

        :raise NotFoundError: vgs reports no such group
        """
        groups = parse_vgs_json(self._report("vgs", VGS_FIELDS, vg))
        if not groups:
            raise NotFoundError(f"no volume group {vg}", hint="check `vgs`")
        return groups[0]

    def create_snapshot(self, origin: str, name: str, *, size: int | None, tags: Sequence[str]) -> None:
        """``lvcreate -s``: snapshot LV ``origin`` (``vg/lv``) as ``name`` in its group, with ``tags``.

        :param size: the copy-on-write size in bytes of a classic snapshot; None for a thin one
        """
        sized = ["-L", f"{size}b"] if size is not None else []
        tagged = [arg for tag in tags for arg in ("--addtag", tag)]
        self._run("lvcreate", "-s", "-n", name, *sized, *tagged, origin)

    def remove(self, full_name: str) -> None:
        """``lvremove -y``."""
        self._run("lvremove", "-y", full_name)

    def activate(self, full_name: str, *, ignore_skip: bool = False) -> None:
        """``lvchange -ay`` (``-K``: also an LV flagged to skip activation, as thin snapshots are)."""
        self._run("lvchange", "-ay", *(["-K"] if ignore_skip else []), full_name)

    def deactivate(self, full_name: str) -> None:
        """``lvchange -an``."""
        self._run("lvchange", "-an", full_name)

    def delete_tag(self, full_name: str, tag: str) -> None:
        """``lvchange --deltag``."""
        self._run("lvchange", "--deltag", tag, full_name)

    def merge(self, snapshot: str) -> str:
        """``lvconvert --merge`` of a snapshot into its origin; returns what LVM printed (it says when the
        merge waits for the origin's next activation)."""
        return self._run("lvconvert", "--merge", "-i", "1", snapshot, timeout=3600)


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
    kind, major, minor = stat_paths(runner, "%F|%t|%T", [path], dereference=True).stdout.strip().split("|")
    if kind != "block special file":
        return None
    return f"{int(major, 16)}:{int(minor, 16)}"


def lvm_location(
    runner: Runner, path: PurePath | str, volumes: Sequence[LogicalVolume] | None = None
) -> LvmLocation:
    """Find the LV under ``path``: the LV's own device node, or the LV whose filesystem holds the file.

    :param volumes: the output of :meth:`Lvm.volumes` when the caller has it already

    :raise NotFoundError: the path does not exist
    :raise UnsupportedError: it is neither an LV nor on one (the message names what it is on)
    """
    resolved, mount = mount_of(runner, path)
    device = _device_numbers(runner, resolved)
    is_device = device is not None
    if device is None:
        device = mount.device
    if volumes is None:
        volumes = Lvm(runner).volumes()
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
