"""File-level restore: a backup disk as read-only directories, one per partition, and all of it undone again.

``mount(source, MOUNTPOINT)`` serves the disk read-only (:mod:`vmsnap.restore.source`) as a FUSE file,
reads its partition table (``sfdisk -J``: GPT, MBR with logical partitions, or a filesystem on the whole
disk), attaches a read-only loop device to each partition (``losetup --offset --sizelimit``: this works
without kernel NBD, udev or partition scanning), asks ``blkid -p`` what each holds, and mounts every
ext2/3/4, xfs, btrfs (and vfat, where this host's kernel reads it) at ``MOUNTPOINT/p<N>/``
(``MOUNTPOINT/disk/`` without a table) with options that never replay a journal
(:func:`vmsnap.restore.partitions.mount_options`). It returns once the files are readable; the servers keep
running in the background.

Why FUSE + loop and not libguestfs: no appliance to boot (a mount takes well under a second here), the files
are plain host paths for any tool, and the same pieces work on every host with FUSE and loop devices.
The cost: the guest's filesystem is parsed by the host kernel — mounted read-only with nodev, nosuid,
noexec, but a deliberately malformed filesystem can still hit a kernel bug. Use libguestfs for backups of
guests you do not trust.

Each mount lives in ``RUN_DIR/<key>/`` (0700; ``key`` is a hash of the mountpoint's real path)::

    mount.json      the state (0600): mountpoint, source, owner, status, partitions; written before each step
    qsd-XXXX/       the storage daemon's private directory (records, sockets, the FUSE file ``<disk>``)
    nbdkit-XXXX/    the nbdkit's, for reader sources

``umount(MOUNTPOINT)`` unmounts every partition, detaches the loop devices, stops the servers (which removes
the FUSE mount) and removes the run directory. :func:`recover` does the same, lazily, for mounts whose
process died half-way or whose servers died; it finds loop devices by their backing file and mounts by
their device, so it also cleans what the state file had no time to record. A second mount of a backup disk
that is mounted already is refused (the first mount serves it: use it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import CommandError, NotFoundError, UnsupportedError, UsageError, VmsnapError
from vmsnap.files import DIR_MODE, make_private_dir, write_json_atomic
from vmsnap.mounts import local_mounts
from vmsnap.processes import crash_point
from vmsnap.restore import host
from vmsnap.restore.partitions import (
    Partition,
    PartitionTable,
    mount_options,
    not_mountable,
    parse_blkid,
    parse_sfdisk,
    whole_disk,
)
from vmsnap.restore.source import BackupSource, serve
from vmsnap.restore.state import (
    daemons_under,
    locked,
    owner,
    owner_alive,
    read_state,
    run_key,
    stop_daemons_under,
)
from vmsnap.runner import LocalRunner, Runner

DEFAULT_RUN_DIR = Path("/run/vmsnap/mounts")
STATE = "mount.json"
STATE_FORMAT = 1
DISK = "disk"
"""The FUSE file's name (the served disk) inside the storage daemon's directory."""

CRASH_POINTS = ("mount-after-state", "mount-after-serve", "mount-after-loop", "mount-after-first-mount")


@attrs.frozen
class MountedPartition:
    """A partition that is mounted.

    :param name: ``p<N>`` or ``disk``
    :param path: where its files are (``MOUNTPOINT/<name>``)
    :param fstype: its filesystem type (from blkid)
    :param device: the loop device under it
    :param options: the mount options used
    :param label: the filesystem's label, else the GPT partition name, else ""
    :param size: the partition's size in bytes
    """

    name: str
    path: Path
    fstype: str
    device: str
    options: tuple[str, ...]
    label: str = ""
    size: int = 0


@attrs.frozen
class SkippedPartition:
    """A partition that holds nothing vmsnap can mount, and why (one line)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return self.reason


@attrs.frozen
class MountResult:
    """What :func:`mount` mounted (and what it could not)."""

    mountpoint: Path
    table: str
    partitions: tuple[MountedPartition, ...]
    skipped: tuple[SkippedPartition, ...] = ()
    run_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap mount``."""
        return {
            "mountpoint": str(self.mountpoint),
            "table": self.table or None,
            "partitions": [
                {
                    "name": p.name,
                    "path": str(p.path),
                    "fstype": p.fstype,
                    "label": p.label,
                    "size": p.size,
                    "options": list(p.options),
                }
                for p in self.partitions
            ],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
        }


def _check_mountpoint(mountpoint: Path, run_dir: Path) -> Path:
    path = Path(os.path.realpath(mountpoint))
    if not path.exists():
        raise NotFoundError(
            f"mountpoint {mountpoint} does not exist", hint="create an empty directory for it"
        )
    if not path.is_dir():
        raise UsageError(f"mountpoint {mountpoint} is not a directory", hint="give an empty directory")
    if os.path.ismount(path):
        raise UsageError(f"{mountpoint} is a mount point already", hint="give an empty directory that is not")
    if any(path.iterdir()):
        raise UsageError(f"mountpoint {mountpoint} is not empty", hint="give an empty directory")
    if host.under(path, run_dir) or host.under(run_dir, path):
        raise UsageError(f"mountpoint {mountpoint} overlaps vmsnap's run directory {run_dir}")
    return path


def _entries(run_dir: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    found: list[tuple[Path, dict[str, Any] | None]] = []
    if not run_dir.is_dir():
        return found
    for entry in sorted(run_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            try:
                found.append((entry, read_state(entry / STATE)))
            except VmsnapError:
                found.append((entry, None))
    return found


def _healthy(entry: Path, state: dict[str, Any] | None) -> bool:
    """A finished mount whose servers all still run."""
    if state is None or state.get("status") != "mounted":
        return False
    daemons = daemons_under(entry)
    return bool(daemons) and all(d.alive() for d in daemons)


def _probe(runner: Runner, device: str) -> dict[str, str]:
    result = runner.run(["blkid", "--probe", "--output", "export", device], ok_codes=(0, 2), timeout=120)
    return parse_blkid(result.stdout) if result.exit_code == 0 else {}


def _table(runner: Runner, disk: Path) -> PartitionTable:
    size = disk.stat().st_size
    result = runner.run(["sfdisk", "--json", str(disk)], ok_codes=(0, 1), timeout=120)
    if result.exit_code == 1:
        if "does not contain a recognized partition table" in result.stderr:
            return whole_disk(size)
        raise CommandError(["sfdisk", "--json", str(disk)], 1, result.stdout, result.stderr)
    return parse_sfdisk(result.stdout, size)


def _kernel_refuses(err: CommandError) -> bool:
    text = err.stderr.lower()
    return "unknown filesystem type" in text


def _mount_one(
    runner: Runner, mountpoint: Path, part: Partition, device: str, probe: dict[str, str]
) -> MountedPartition | SkippedPartition:
    reason = not_mountable(probe)
    if reason is not None:
        return SkippedPartition(part.name, f"{part.describe()}: {reason}")
    fstype = probe["TYPE"]
    options = mount_options(fstype)
    target = mountpoint / part.name
    target.mkdir(mode=DIR_MODE, exist_ok=True)
    try:
        host.mount_filesystem(runner, device, target, fstype, options)
    except CommandError as err:
        with contextlib.suppress(OSError):
            target.rmdir()
        last = [line.strip() for line in err.stderr.splitlines() if line.strip()]
        detail = last[0] if last else f"exit code {err.returncode}"
        if _kernel_refuses(err):
            return SkippedPartition(
                part.name, f"{part.describe()}: {fstype}, which this host's kernel cannot read ({detail})"
            )
        return SkippedPartition(part.name, f"{part.describe()}: {fstype} that did not mount ({detail})")
    label = probe.get("LABEL", "") or part.label
    return MountedPartition(part.name, target, fstype, device, options, label, part.size)


def mount(
    source: BackupSource,
    mountpoint: Path,
    *,
    run_dir: Path = DEFAULT_RUN_DIR,
    runner: Runner | None = None,
) -> MountResult:
    """Mount every readable filesystem of a backup disk read-only under ``mountpoint``; return once mounted.

    :param source: the backup disk (:class:`~vmsnap.restore.source.ImageSource` for a qcow2 chain,
        :class:`~vmsnap.restore.source.ReaderSource` for a block reader)
    :param mountpoint: an existing empty directory; partitions appear as ``p1``, ``p2`` … (``disk`` when
        the disk has no partition table)
    :param run_dir: where the state and the servers' sockets live (0700)
    :param runner: runs losetup, mount, sfdisk, blkid and the servers; must be this host
    :return: what was mounted, and every partition that was not with the reason
    :raise NotFoundError: the mountpoint or the backup image does not exist
    :raise UsageError: the mountpoint is not an empty directory, or this backup disk is mounted already
    :raise UnsupportedError: no partition holds a filesystem vmsnap can mount (the message lists what each
        holds); nothing is left behind
    :raise TransferError: the servers refused to start (e.g. a damaged image header)
    """
    run = runner or LocalRunner()
    make_private_dir(run_dir, tighten=True)
    with locked(run_dir):
        recover(run_dir=run_dir, runner=run, _locked=True)  # a dead mount's leftovers first
        for _entry, other in _entries(run_dir):
            if other is not None and other.get("source", {}).get("identity") == source.identity:
                raise UsageError(
                    f"this backup disk is mounted already at {other.get('mountpoint')}",
                    hint=f"read it there, or `vmsnap umount {other.get('mountpoint')}` first",
                )
        entry = run_dir / run_key(Path(os.path.realpath(mountpoint)))
        if entry.exists():
            raise UsageError(f"{mountpoint} has a vmsnap mount already", hint=f"`vmsnap umount {mountpoint}`")
        target = _check_mountpoint(mountpoint, run_dir)
        make_private_dir(entry, tighten=True)
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "mountpoint": str(target),
            "source": source.to_json(),
            "owner": owner(),
            "status": "mounting",
            "partitions": [],
            "skipped": [],
        }
        write_json_atomic(entry / STATE, state)
        crash_point("mount-after-state")
        with contextlib.ExitStack() as undo:
            undo.callback(_clean_entry, entry, state, run, lazy=True)
            result = _mount_in(entry, state, source, target, run)
            undo.pop_all()
        return result


def _mount_in(
    entry: Path, state: dict[str, Any], source: BackupSource, mountpoint: Path, runner: Runner
) -> MountResult:
    with contextlib.ExitStack() as servers:
        served = serve({DISK: source}, parent=entry, stack=servers, fuse=True, runner=runner)
        servers.pop_all()  # from here on _clean_entry stops them (also after a crash: recover)
    crash_point("mount-after-serve")
    disk = served.fuse_files[DISK]
    table = _table(runner, disk)
    mounted: list[MountedPartition] = []
    skipped: list[SkippedPartition] = []
    for part in table.partitions:
        device = host.attach_loop(runner, disk, part.offset, part.size)
        crash_point("mount-after-loop")
        outcome = _mount_one(runner, mountpoint, part, device, _probe(runner, device))
        if isinstance(outcome, SkippedPartition):
            host.detach_loop(runner, device)
            skipped.append(outcome)
        else:
            mounted.append(outcome)
            state["partitions"].append({"name": outcome.name, "device": device, "path": str(outcome.path)})
            write_json_atomic(entry / STATE, state)
            crash_point("mount-after-first-mount")
    if not mounted:
        found = "; ".join(s.reason for s in skipped) or "an empty partition table"
        raise UnsupportedError(
            f"no filesystem vmsnap can mount on this disk: {found}",
            hint="vmsnap mounts ext2/3/4, xfs and btrfs (vfat where the kernel reads it); "
            "`vmsnap restore` gives the whole image",
        )
    state["skipped"] = [{"name": s.name, "reason": s.reason} for s in skipped]
    state["status"] = "mounted"
    write_json_atomic(entry / STATE, state)
    return MountResult(mountpoint, table.label, tuple(mounted), tuple(skipped), entry)


def mounted(*, run_dir: Path = DEFAULT_RUN_DIR) -> list[dict[str, Any]]:
    """The state of every mount vmsnap knows of (for ``vmsnap mount --list``), with ``healthy`` added."""
    return [
        {**state, "healthy": _healthy(entry, state)}
        for entry, state in _entries(run_dir)
        if state is not None
    ]


def umount(
    mountpoint: Path, *, run_dir: Path = DEFAULT_RUN_DIR, lazy: bool = False, runner: Runner | None = None
) -> None:
    """Undo a :func:`mount`: unmount every partition, detach the loop devices, stop the servers, remove the
    run directory and the partition directories vmsnap made. Nothing is left behind.

    :param lazy: detach busy filesystems anyway (they go away when the last file is closed)
    :raise NotFoundError: vmsnap has nothing mounted at ``mountpoint``
    :raise VmsnapError: a partition is busy (a process has files open there); nothing more is undone, run
        umount again once they are closed, or with ``lazy``
    """
    run = runner or LocalRunner()
    target = Path(os.path.realpath(mountpoint))
    entry = run_dir / run_key(target)
    with locked(run_dir):
        state = read_state(entry / STATE) if entry.is_dir() else None
        if state is None or state.get("mountpoint") != str(target):
            if entry.is_dir():  # a mount killed before its first record: only servers may exist
                _clean_entry(entry, {"mountpoint": str(target)}, run, lazy=True)
                return
            raise NotFoundError(
                f"vmsnap has nothing mounted at {mountpoint}", hint="see `vmsnap mount --list`"
            )
        state["status"] = "unmounting"
        write_json_atomic(entry / STATE, state)
        _clean_entry(entry, state, run, lazy=lazy)


def _clean_entry(entry: Path, state: dict[str, Any], runner: Runner, *, lazy: bool) -> list[str]:
    """Undo everything of one mount, found by what backs it; returns what was undone (for messages)."""
    done: list[str] = []
    mountpoint = Path(str(state.get("mountpoint", "")))
    loops = [d for d in host.loop_devices(runner) if host.under(d.back_file, entry)]
    devices = {d.name for d in loops}
    for mounted_fs in reversed(local_mounts()):
        if mounted_fs.source in devices:
            target = Path(mounted_fs.mount_point)
            try:
                host.unmount(runner, target, lazy=lazy)
            except CommandError as err:
                if "busy" not in err.stderr:
                    raise
                raise VmsnapError(
                    f"{target} is busy: a process has files open there",
                    hint=f"close them (`fuser -vm {target}`), then umount again (or --lazy)",
                ) from err
            done.append(f"unmounted {target}")
    for device in loops:
        host.detach_loop(runner, device.name)
        done.append(f"detached {device.name}")
    done += [f"stopped {what}" for what in stop_daemons_under(entry, runner=runner)]
    for mounted_fs in reversed(local_mounts()):  # FUSE files of daemons that died with SIGKILL
        if mounted_fs.fstype.startswith("fuse") and host.under(mounted_fs.mount_point, entry):
            host.unmount(runner, Path(mounted_fs.mount_point), lazy=True)
            done.append(f"unmounted {mounted_fs.mount_point}")
    _remove_partition_dirs(mountpoint, state.get("partitions", []))
    shutil.rmtree(entry, ignore_errors=True)
    return done


def _remove_partition_dirs(mountpoint: Path, partitions: Sequence[dict[str, Any]]) -> None:
    if not mountpoint.is_dir() or not str(mountpoint).startswith("/"):
        return
    names = {str(p.get("name", "")) for p in partitions}
    # a killed mount may have made a directory it had no time to record: any p<N>/disk that is empty
    names |= {
        c.name for c in mountpoint.iterdir() if c.name == DISK or (c.name[:1] == "p" and c.name[1:].isdigit())
    }
    for name in sorted(names):
        path = mountpoint / name
        if name and "/" not in name and path.is_dir() and not os.path.ismount(path):
            with contextlib.suppress(OSError):  # not empty: not ours to remove
                path.rmdir()


def recover(
    *, run_dir: Path = DEFAULT_RUN_DIR, runner: Runner | None = None, _locked: bool = False
) -> list[str]:
    """Clean what killed mounts left: every mount whose process died before it finished (or during its
    umount), and every mount whose servers died (its files read as errors). Healthy mounts are kept.

    :return: one line per thing undone (unmounted, detached, stopped)
    :raise VmsnapError: a leftover could not be undone (the message says which)
    """
    run = runner or LocalRunner()
    if not run_dir.is_dir():
        return []
    done: list[str] = []
    with contextlib.nullcontext() if _locked else locked(run_dir):
        for entry, state in _entries(run_dir):
            if _healthy(entry, state):
                continue
            if (
                state is not None
                and state.get("status") == "mounting"
                and owner_alive(state.get("owner", {}))
            ):
                continue  # cannot happen under the lock, but never undo a live process's work
            done += _clean_entry(entry, state or {}, run, lazy=True)
    return done
