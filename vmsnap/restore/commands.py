"""The restore commands as one call each, for the CLI and for scripts: ``mount`` (resolve a backup, mount one
of its disks), ``umount``, ``instant-restore`` in its four shapes, and what ``recover`` cleans of restores.

Every command keeps its run state under one root (default ``/run/vmsnap``): ``mounts/`` (see
:mod:`vmsnap.restore.mount`) and ``instant/`` (the servers of instant restores, see
:mod:`vmsnap.restore.instant`). ``/run`` is emptied at boot, like the servers it describes.

Instant restore, by what the configuration names (:attr:`InstantConfig.mode`):

=================  ==========================================  =========================================
mode               given                                       does
=================  ==========================================  =========================================
``libvirt``        a backup, ``to``, ``define``                prepare, define + start the domain, pull
                                                               every disk, finish; repeat it to resume
``prepare``        a backup, ``to``                            prepare (bare QEMU: the user starts QEMU)
``stream``         ``to``, ``qmp``                             block-stream in that QEMU, finish; repeat
``stream-domain``  ``to``, ``domain``                          libvirt's pull of that domain, finish
=================  ==========================================  =========================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.backup.config import RecoveryReport
from vmsnap.backup.recover import recover as recover_backup
from vmsnap.errors import NotFoundError, UsageError
from vmsnap.model import validate_name
from vmsnap.restore import boot_session, instant, mount
from vmsnap.restore.backups import ResolvedBackup, resolve
from vmsnap.restore.instant import InstantRestore, StreamProgress, StreamResult
from vmsnap.restore.mount import MountResult
from vmsnap.runner import Runner
from vmsnap.vm.machine import Machine

DEFAULT_RUN_ROOT = Path("/run/vmsnap")
"""Where mounts and instant restores keep their state and their servers' sockets."""


def mounts_dir(run_root: Path) -> Path:
    return run_root / "mounts"


def instant_dir(run_root: Path) -> Path:
    return run_root / "instant"


def _no_progress(disk: str, done: int, total: int) -> None:
    """A StreamProgress that ignores its calls."""


@attrs.frozen
class BackupRef:
    """A backup as every command names one.

    :param repo: the repository (a directory; a URL where the layout supports one)
    :param vm: the VM's name in it
    :param backup_id: the backup (None: the latest)
    :param key_file: an encrypted repository's key file
    """

    repo: Path | str
    vm: str
    backup_id: str | None = None
    key_file: Path | None = None

    def __attrs_post_init__(self) -> None:
        validate_name(self.vm, "VM name")
        if self.backup_id is not None:
            validate_name(self.backup_id, "backup id")

    def resolve(self, disks: tuple[str, ...] = ()) -> ResolvedBackup:
        return resolve(self.repo, self.vm, self.backup_id, disks, key_file=self.key_file)


# -- mount --------------------------------------------------------------------------------------------------


@attrs.frozen
class MountConfig:
    """``vmsnap mount``: one disk of a backup at ``mountpoint``.

    :param disk: the disk (needed when the backup has several)
    """

    backup: BackupRef
    mountpoint: Path
    disk: str | None = None
    run_root: Path = DEFAULT_RUN_ROOT


@attrs.frozen
class MountedBackup:
    """What :func:`mount_backup` mounted: which backup disk, and its partitions."""

    vm: str
    backup_id: str
    disk: str
    result: MountResult

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap mount``."""
        return {"vm": self.vm, "backup_id": self.backup_id, "disk": self.disk, **self.result.to_json()}


def mount_backup(config: MountConfig, *, runner: Runner | None = None) -> MountedBackup:
    """Mount a backup's disk read-only: every partition vmsnap can read at ``MOUNTPOINT/p<N>``.

    :raise NotFoundError: no such repository content (VM, backup, disk), or the mountpoint does not exist
    :raise UsageError: the backup has several disks and none was named, the mountpoint is not an empty
        directory, or this backup disk is mounted already
    :raise UnsupportedError: the disk holds no filesystem vmsnap can mount (one line says what it holds)
    """
    backup = config.backup.resolve((config.disk,) if config.disk else ())
    if len(backup.sources) != 1:
        names = ", ".join(backup.sources)
        raise UsageError(
            f"backup {backup.backup_id} of {backup.vm} has {len(backup.sources)} disks ({names})",
            hint="name the one to mount with --disk",
        )
    [(disk, source)] = backup.sources.items()
    result = mount.mount(source, config.mountpoint, run_dir=mounts_dir(config.run_root), runner=runner)
    return MountedBackup(backup.vm, backup.backup_id, disk, result)


def list_mounts(run_root: Path = DEFAULT_RUN_ROOT) -> list[dict[str, Any]]:
    """Every mount vmsnap knows of (its state, with ``healthy``: finished and its servers running)."""
    return mount.mounted(run_dir=mounts_dir(run_root))


def umount_backup(
    mountpoint: Path, *, run_root: Path = DEFAULT_RUN_ROOT, lazy: bool = False, runner: Runner | None = None
) -> None:
    """Undo a mount: nothing of it is left (mounts, loop devices, servers, run directory).

    :raise NotFoundError: vmsnap has nothing mounted there
    :raise VmsnapError: a partition is busy (without ``lazy``)
    """
    mount.umount(mountpoint, run_dir=mounts_dir(run_root), lazy=lazy, runner=runner)


# -- instant restore ----------------------------------------------------------------------------------------

InstantMode = Literal["libvirt", "prepare", "stream", "stream-domain"]


@attrs.frozen
class InstantConfig:
    """``vmsnap instant-restore`` (the mode follows from what is given; see the module docstring).

    :param to: the directory of the new images
    :param backup: the backup to restore (None: copy the rest of a restore prepared in ``to``)
    :param disks: only these disks (bare QEMU; a libvirt domain needs all of them)
    :param define: the new libvirt domain's name
    :param domain: the running libvirt domain of a restore prepared in ``to``
    :param connect: the libvirt URI
    :param qmp: the QMP socket of the QEMU running on the prepared images
    :param speed: bytes per second per disk for the copy (0: unlimited)
    :raise UsageError: a combination that names no mode, or more than one
    """

    to: Path
    backup: BackupRef | None = None
    disks: tuple[str, ...] = ()
    define: str | None = None
    domain: str | None = None
    connect: str | None = None
    qmp: Path | None = None
    speed: int = 0
    run_root: Path = DEFAULT_RUN_ROOT

    def __attrs_post_init__(self) -> None:
        if self.speed < 0:
            raise UsageError(f"--speed {self.speed} is negative")
        if self.backup is not None:
            if self.qmp is not None or self.domain is not None:
                raise UsageError(
                    "--qmp and --domain copy a restore prepared already: leave --repo/--vm out",
                    hint="prepare with --repo/--vm/--to, start the VM, then --to DIR --qmp SOCKET",
                )
            if self.define is not None and self.disks:
                raise UsageError("--define restores every disk of the domain: leave --disk out")
            if self.define is None and self.speed:
                raise UsageError("--speed applies to the copy", hint="give it with --qmp (or with --define)")
        else:
            if (self.qmp is None) == (self.domain is None):
                raise UsageError(
                    "instant-restore needs a backup (--repo, --vm) to prepare, or the VM running on a "
                    "prepared restore (--qmp SOCKET or --domain NAME) to copy into",
                    hint="see `vmsnap instant-restore --help`",
                )
            if self.define is not None or self.disks:
                raise UsageError("--define and --disk need the backup: give --repo and --vm")
        if self.connect is not None and self.define is None and self.domain is None:
            raise UsageError("--connect is for libvirt: give --define (or --domain) with it")

    @property
    def mode(self) -> InstantMode:
        if self.backup is not None:
            return "libvirt" if self.define is not None else "prepare"
        return "stream" if self.qmp is not None else "stream-domain"


@attrs.frozen
class InstantOutcome:
    """What :func:`instant_restore` did.

    :param mode: which of the four shapes ran
    :param restore: the prepared restore (its images, and the QEMU options for them)
    :param vm: the backed-up VM (when a backup was named)
    :param backup_id: the backup (when a backup was named)
    :param domain: the libvirt domain running on the images
    :param stream: the copy (None when only prepared)
    """

    mode: InstantMode
    restore: InstantRestore
    vm: str | None = None
    backup_id: str | None = None
    domain: str | None = None
    stream: StreamResult | None = None

    @property
    def done(self) -> bool:
        """The images are standalone and the servers are stopped."""
        return self.stream is not None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap instant-restore``."""
        payload: dict[str, Any] = {
            "mode": self.mode,
            **self.restore.to_json(),
            "vm": self.vm,
            "backup_id": self.backup_id,
            "domain": self.domain,
            "status": "done" if self.done else "prepared",
        }
        if self.stream is None:
            payload["qemu_args"] = self.restore.qemu_args()
        else:
            payload["streamed"] = list(self.stream.streamed)
            payload["already_done"] = list(self.stream.already_done)
            payload["seconds"] = round(self.stream.seconds, 3)
        return payload


def instant_restore(
    config: InstantConfig, *, progress: StreamProgress = _no_progress, runner: Runner | None = None
) -> InstantOutcome:
    """Run the instant restore ``config`` names (see the module docstring); each mode is safe to repeat.

    :param progress: the copy's (disk, bytes copied, bytes to copy)
    :raise NotFoundError: no such backup or disk; ``define`` and the backup has no saved definition; no
        prepared restore in ``to``; the VM does not run on its images
    :raise UsageError: an image exists in ``to`` that is not this restore's, or the domain name is taken
    :raise BlockJobError: a copy failed (the VM keeps running on the backup; run again to retry)
    :raise LibvirtError: libvirtd refused to define or start the domain
    """
    from vmsnap.restore import instant_libvirt

    run_dir = instant_dir(config.run_root)
    if config.mode == "stream":
        assert config.qmp is not None
        restore = instant.prepared(config.to)
        result = instant.stream(config.to, config.qmp, speed=config.speed, progress=progress)
        return InstantOutcome("stream", restore, stream=result)
    if config.mode == "stream-domain":
        assert config.domain is not None
        restore = instant.prepared(config.to)
        result = instant_libvirt.stream_domain(
            config.to, name=config.domain, uri=config.connect, speed=config.speed, progress=progress
        )
        return InstantOutcome("stream-domain", restore, domain=config.domain, stream=result)
    assert config.backup is not None
    backup = config.backup.resolve(config.disks)
    if config.mode == "prepare":
        restore = instant.prepare(backup.sources, config.to, run_dir=run_dir, runner=runner)
        return InstantOutcome("prepare", restore, backup.vm, backup.backup_id)
    assert config.define is not None
    if backup.domain_xml is None:
        raise NotFoundError(
            f"backup {backup.backup_id} of {backup.vm} has no saved libvirt definition",
            hint="--define needs a backup taken with --domain; leave --define out to prepare for bare QEMU",
        )
    to = config.to.resolve()
    images = {name: to / f"{name}.qcow2" for name in backup.sources}
    instant_libvirt.check_domain_name(config.define, images, uri=config.connect)  # before anything is made
    restore = instant.prepare(backup.sources, config.to, run_dir=run_dir, runner=runner)
    instant_libvirt.start_domain(
        restore, backup.domain_xml, name=config.define, uri=config.connect, state=backup.machine
    )
    result = instant_libvirt.stream_domain(
        restore.to, name=config.define, uri=config.connect, speed=config.speed, progress=progress
    )
    return InstantOutcome("libvirt", restore, backup.vm, backup.backup_id, config.define, result)


# -- recover ------------------------------------------------------------------------------------------------


def recover_restores(run_root: Path = DEFAULT_RUN_ROOT, *, runner: Runner | None = None) -> list[str]:
    """Clean what dead mounts and finished or abandoned instant restores left on this host: mounts whose
    process died half-way or whose servers died (healthy mounts are kept), the servers of instant
    restores whose images no longer read from the backup, and every boot verification whose process died
    (its copy, overlays, servers and sockets). Returns one line per thing undone."""
    done = mount.recover(run_dir=mounts_dir(run_root), runner=runner)
    done += instant.recover(run_dir=instant_dir(run_root), runner=runner)
    done += boot_session.recover(run_root, runner=runner)
    return done


def recover_host(
    machine: Machine | None,
    repo_root: Path | str | None,
    *,
    key_file: Path | None = None,
    run_root: Path = DEFAULT_RUN_ROOT,
) -> RecoveryReport:
    """``vmsnap recover``: undo what a dead backup of ``machine`` left (see :func:`vmsnap.backup.recover`);
    then, with or without a machine, clean what dead mounts and finished instant restores left on this host.

    :param machine: the VM whose dead backup to undo; None: only this host's restore leftovers
    :param run_root: where mounts and instant restores keep their state (``$VMSNAP_RUN_DIR``)
    :raise UsageError: ``repo_root`` without a machine
    :raise RepositoryError: the repository is missing or a backup of the VM is running right now
    :raise RecoveryError: something could not be undone (the journal is kept for another try)
    """
    if machine is None and repo_root is not None:
        raise UsageError(
            "--repo needs the VM whose dead backup to undo",
            hint="name it (--qmp, --domain, --image or --name)",
        )
    actions: list[str] = []
    found: tuple[str, ...] = ()
    vm = ""
    if machine is not None:
        report = recover_backup(machine, repo_root, key_file=key_file)
        actions += report.actions
        found = report.found
        vm = report.vm
    actions += recover_restores(run_root)  # this host's: mounts and servers are always local
    return RecoveryReport(vm, tuple(actions), found)
