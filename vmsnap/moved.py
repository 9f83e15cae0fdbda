"""Where the first two rounds' public names went: a name a module of vmsnap 0.1 or of the second round
defined still imports from its old module, with a :class:`DeprecationWarning` that names its new home —
all but the few in :data:`REMOVED`, whose error says what to use instead.

The old modules (``vmsnap.machine``, ``vmsnap.repository``, ``vmsnap.qmp``, …) are shims whose
``__getattr__`` is :func:`old_names` (which calls :func:`resolve`); modules that still exist but lost names
to others (``vmsnap.runner``, ``vmsnap.backup``, ``vmsnap.cli``, …) have the same ``__getattr__``.
:data:`MOVED` maps each old name to its new home (``module`` when the name is the same there,
``module:name`` when it is not; a few old signatures live on in :mod:`vmsnap.legacy`); :data:`REMOVED`
names the few that have no equivalent and says what to use instead. New names are imported lazily by
their module's name (``importlib``), so no shim adds an import edge.
The public API and these tables are described in docs/api.md.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

MOVED: dict[str, dict[str, str]] = {
    "vmsnap.agent": {
        "AgentChannel": "vmsnap.vm.agent",
        "DEFAULT_TIMEOUT": "vmsnap.vm.agent",
        "ExecResult": "vmsnap.vm.agent",
        "FREEZE_TIMEOUT": "vmsnap.vm.agent",
        "FreezeReport": "vmsnap.vm.agent",
        "GuestAgent": "vmsnap.vm.agent",
        "NO_REPLY_COMMANDS": "vmsnap.vm.agent",
        "SocketAgentChannel": "vmsnap.vm.agent",
        "frozen": "vmsnap.vm.freeze",
    },
    "vmsnap.backup": {
        "CRASH_ENV": "vmsnap.processes",
        "CRASH_POINTS": "vmsnap.backup.config",
        "ORPHAN_PROGRAMS": "vmsnap.backup.recover",
        "PUSH": "vmsnap.backup.config",
        "Quiesce": "vmsnap.backup.config",
        "crash_point": "vmsnap.processes",
        "recover_leftovers": "vmsnap.backup.recover",
        "stop_orphans": "vmsnap.backup.recover",
        "undo_run": "vmsnap.backup.recover",
    },
    "vmsnap.benchmark.peers": {
        "CHUNK": "vmsnap.benchmark.workload",
    },
    "vmsnap.benchmark.throughput": {
        "CHUNK": "vmsnap.benchmark.workload",
    },
    "vmsnap.cli": {
        "add_vm_arguments": "vmsnap.cli.common",
        "cmd_agent": "vmsnap.cli.snapshots",
        "cmd_backup": "vmsnap.cli.repository",
        "cmd_bench": "vmsnap.cli.tools",
        "cmd_demo": "vmsnap.cli.tools",
        "cmd_guest_install_hooks": "vmsnap.cli.tools",
        "cmd_list": "vmsnap.cli.upkeep",
        "cmd_prune": "vmsnap.cli.upkeep",
        "cmd_recover": "vmsnap.cli.repository",
        "cmd_restore": "vmsnap.cli.repository",
        "cmd_snapshot": "vmsnap.cli.snapshots",
        "cmd_strategies": "vmsnap.cli.snapshots",
        "cmd_verify": "vmsnap.cli.upkeep",
        "emit": "vmsnap.cli.common",
        "render_table": "vmsnap.cli.common",
    },
    "vmsnap.digest": {
        "ALGORITHM": "vmsnap.image.digest",
        "CHUNK_SIZE": "vmsnap.image.digest",
        "ChunkDigests": "vmsnap.image.digest",
        "DIGEST_SIZE": "vmsnap.image.digest",
        "Extent": "vmsnap.image.digest",
        "ImageMap": "vmsnap.image.digest",
        "WORKERS": "vmsnap.image.digest",
        "chunk_count": "vmsnap.image.digest",
        "chunk_offset_text": "vmsnap.image.digest",
        "guest_digest": "vmsnap.legacy:guest_digest",
        "hash_chunks": "vmsnap.image.digest",
        "image_chunks": "vmsnap.image.digest",
        "nbd_map": "vmsnap.image.digest",
        "overlay_map": "vmsnap.image.digest",
        "plain_sha256": "vmsnap.image.digest",
        "qemu_img_map": "vmsnap.image.digest",
        "read_chunks_file": "vmsnap.image.digest",
        "uri_chunks": "vmsnap.image.digest",
        "write_chunks_file": "vmsnap.image.digest",
        "zero_digest": "vmsnap.image.digest",
    },
    "vmsnap.image.storage_daemon": {
        "RECORD_FORMAT": "vmsnap.image.daemon",
        "process_matches": "vmsnap.legacy:process_matches",
        "process_start_time": "vmsnap.processes:start_time",
        "read_record": "vmsnap.image.daemon",
        "stop_process": "vmsnap.legacy:stop_recorded_process",
        "stop_recorded": "vmsnap.image.daemon",
        "write_private_json": "vmsnap.files:write_json_atomic",
    },
    "vmsnap.imageio": {
        "CHUNK": "vmsnap.image.nbd",
        "DIRTY": "vmsnap.image.nbd",
        "LOCKED_HINT": "vmsnap.image.qemu_img",
        "QemuNbdServer": "vmsnap.image.nbd",
        "STATE_HOLE": "vmsnap.image.nbd",
        "STATE_ZERO": "vmsnap.image.nbd",
        "ThrottledProgress": "vmsnap.model",
        "allocated_bytes": "vmsnap.files",
        "atomic_target": "vmsnap.files",
        "bitmap_name": "vmsnap.image.nbd",
        "check_source": "vmsnap.image.qemu_img",
        "check_target_dir": "vmsnap.files",
        "cluster_size": "vmsnap.image.qemu_img",
        "extents": "vmsnap.image.nbd",
        "fsync_path": "vmsnap.files:fsync_file",
        "guest_sha256": "vmsnap.image.digest",
        "image_info": "vmsnap.legacy:imageio_image_info",
        "nbd_connection": "vmsnap.image.nbd",
        "nbd_sha256": "vmsnap.image.nbd",
        "no_space": "vmsnap.transports.base",
        "oserror_is_full": "vmsnap.files:is_full",
        "pread": "vmsnap.image.nbd",
        "qemu_img_source_args": "vmsnap.image.qemu_img:image_args",
        "source_args": "vmsnap.image.qemu_img",
        "source_sha256": "vmsnap.image.digest",
        "write_failed": "vmsnap.transports.base",
    },
    "vmsnap.jobs.default": {},
    "vmsnap.jobs.hosts": {
        "HostSpec": "vmsnap.vm.hosts",
    },
    "vmsnap.journal": {
        "JOURNAL_FORMAT": "vmsnap.repo.journal",
        "Journal": "vmsnap.repo.journal",
        "JournalEntry": "vmsnap.repo.journal",
        "STEPS": "vmsnap.repo.journal",
        "disk_from_json": "vmsnap.repo.journal",
        "disk_to_json": "vmsnap.repo.journal",
        "snapshot_from_json": "vmsnap.repo.journal",
        "snapshot_to_json": "vmsnap.repo.journal",
    },
    "vmsnap.lab.image": {
        "INITTAB": "vmsnap.lab.image.contents",
        "INIT_SCRIPT": "vmsnap.lab.image.contents",
        "LINKS_SCRIPT": "vmsnap.lab.image.contents",
        "LVM_CONF": "vmsnap.lab.image.contents",
        "SHUTDOWN_SCRIPT": "vmsnap.lab.image.contents",
    },
    "vmsnap.lab.libvirtd": {
        "alive": "vmsnap.processes",
    },
    "vmsnap.libvirt_machine": {
        "AGENT_CHANNEL": "vmsnap.vm.libvirt.domain",
        "DEFAULT_URI": "vmsnap.vm.libvirt.domain",
        "IMAGE_FORMATS": "vmsnap.vm.libvirt.domain",
        "LibvirtAgentChannel": "vmsnap.vm.libvirt.domain",
        "LibvirtMachine": "vmsnap.vm.libvirt.machine",
        "LibvirtMonitor": "vmsnap.vm.libvirt.domain",
        "libvirt_message": "vmsnap.vm.libvirt.domain",
        "open_connection": "vmsnap.vm.libvirt.domain",
    },
    "vmsnap.libvirt_ops": {
        "define_restored_domain": "vmsnap.vm.libvirt.definition",
        "restored_domain_xml": "vmsnap.vm.libvirt.definition",
        "saved_domain_xml": "vmsnap.vm.libvirt.definition",
    },
    "vmsnap.machine": {
        "Machine": "vmsnap.vm.machine",
        "OfflineMachine": "vmsnap.vm.machine",
        "QemuMachine": "vmsnap.vm.machine",
        "find_disk": "vmsnap.vm.machine",
        "image_chain": "vmsnap.legacy:image_chain",
        "image_info": "vmsnap.legacy:image_info",
        "offline_disk": "vmsnap.vm.machine",
    },
    "vmsnap.qcow2": {
        "ChainMap": "vmsnap.image.qcow2",
        "Layer": "vmsnap.image.qcow2",
        "MAGIC": "vmsnap.image.qcow2",
        "Placed": "vmsnap.image.geometry:Extent",
        "read_chain": "vmsnap.image.qcow2",
        "read_layer": "vmsnap.image.qcow2",
    },
    "vmsnap.qmp": {
        "JobInfo": "vmsnap.vm.qmp",
        "JobState": "vmsnap.vm.qmp",
        "QMPMonitor": "vmsnap.vm.qmp",
        "T": "vmsnap.vm.qmp",
        "disks_from_query_block": "vmsnap.vm.qmp",
    },
    "vmsnap.registry": {
        "strategy_class": "vmsnap.strategies",
        "transport_class": "vmsnap.transports",
    },
    "vmsnap.repository": {
        "CHUNKS_SUFFIX": "vmsnap.repo.manifest",
        "DELETING_PREFIX": "vmsnap.repo.qcow2_layout",
        "DIR_MODE": "vmsnap.files",
        "Damaged": "vmsnap.repo.manifest",
        "DiskProgress": "vmsnap.repo.progress",
        "DiskRecord": "vmsnap.repo.manifest",
        "FILE_MODE": "vmsnap.files",
        "Kind": "vmsnap.repo.manifest",
        "LOCK": "vmsnap.repo.qcow2_repo",
        "MANIFEST": "vmsnap.repo.manifest",
        "MARKER": "vmsnap.repo.marker",
        "Manifest": "vmsnap.repo.manifest",
        "NEEDS_FULL": "vmsnap.repo.qcow2_repo",
        "PARTIAL_PREFIX": "vmsnap.repo.qcow2_layout",
        "PruneResult": "vmsnap.repo.reports",
        "REPO_FORMAT": "vmsnap.repo.manifest",
        "Reader": "vmsnap.repo.verify",
        "Repository": "vmsnap.repo.repository",
        "RestoredDisk": "vmsnap.repo.reports",
        "VerifyProblem": "vmsnap.repo.reports",
        "VerifyReport": "vmsnap.repo.reports",
        "fsync_dir": "vmsnap.files",
        "fsync_file": "vmsnap.files",
        "libqcow_chunks": "vmsnap.image.libqcow",
        "make_private_dir": "vmsnap.files",
        "new_backup_id": "vmsnap.repo.manifest",
        "plan_retention": "vmsnap.repo.prune",
        "qcow2_backing_file": "vmsnap.repo.qcow2_layout",
        "utc_now_iso": "vmsnap.repo.manifest",
        "write_json_atomic": "vmsnap.files",
    },
    "vmsnap.restore.backups": {
        "DOMAIN_XML": "vmsnap.backup.run",
    },
    "vmsnap.restore.host": {},
    "vmsnap.restore.nbdkit": {
        "NbdkitServer": "vmsnap.image.nbdkit",
        "PLUGIN": "vmsnap.image.nbdkit",
        "PRIVATE_PREFIX": "vmsnap.image.nbdkit",
        "PROGRAM": "vmsnap.image.nbdkit",
        "default_syspath": "vmsnap.image.nbdkit",
    },
    "vmsnap.restore.readers": {
        "BlockReader": "vmsnap.image.readers",
        "ExtentReader": "vmsnap.image.readers",
        "RESERVED_KEYS": "vmsnap.image.readers",
        "RawFileReader": "vmsnap.image.readers",
        "ReaderFactory": "vmsnap.image.readers",
        "VerifiedRawReader": "vmsnap.image.readers",
        "load_factory": "vmsnap.image.readers",
        "open_reader": "vmsnap.image.readers",
        "reader_options": "vmsnap.image.readers",
    },
    "vmsnap.restore.state": {
        "CRASH_ENV": "vmsnap.processes",
        "DIR_MODE": "vmsnap.files",
        "crash_point": "vmsnap.processes",
        "write_state": "vmsnap.files:write_json_atomic",
    },
    "vmsnap.runner": {
        "AgentRunner": "vmsnap.vm.agent_runner",
    },
    "vmsnap.storage": {
        "BTRFS_SUBVOLUME_ROOT_INODE": "vmsnap.strategies.btrfs_tool",
        "BtrfsLocation": "vmsnap.strategies.btrfs_tool",
        "LVS_FIELDS": "vmsnap.strategies.lvm_tool",
        "LogicalVolume": "vmsnap.strategies.lvm_tool",
        "LvmLocation": "vmsnap.strategies.lvm_tool",
        "Mount": "vmsnap.mounts",
        "StorageNoteWarning": "vmsnap.strategies.storage",
        "StorageScopeWarning": "vmsnap.strategies.storage",
        "VolumeGroupSpace": "vmsnap.strategies.lvm_tool",
        "btrfs_location": "vmsnap.strategies.btrfs_tool",
        "is_btrfs_subvolume": "vmsnap.strategies.btrfs_tool",
        "list_logical_volumes": "vmsnap.legacy:list_logical_volumes",
        "logical_volume": "vmsnap.legacy:logical_volume",
        "lvm_location": "vmsnap.strategies.lvm_tool",
        "mount_of": "vmsnap.strategies.storage",
        "mount_of_path": "vmsnap.strategies.storage",
        "parse_lvs_json": "vmsnap.strategies.lvm_tool",
        "parse_mountinfo": "vmsnap.mounts",
        "parse_vgs_json": "vmsnap.strategies.lvm_tool",
        "resolve_path": "vmsnap.strategies.storage",
        "volume_group_space": "vmsnap.legacy:volume_group_space",
    },
    "vmsnap.strategies.backup": {
        "BitmapState": "vmsnap.strategies.blockdev_backup.bitmaps",
        "BlockdevBackupStrategy": "vmsnap.strategies.blockdev_backup.strategy",
        "Fleecing": "vmsnap.strategies.blockdev_backup.fleecing",
        "IncrementalFallbackWarning": "vmsnap.strategies.base",
        "Mode": "vmsnap.strategies.blockdev_backup.plan",
        "PENDING_SUFFIX": "vmsnap.strategies.blockdev_backup.bitmaps",
        "SIDECAR_SUFFIX": "vmsnap.strategies.blockdev_backup.plan",
        "fleece_nodes": "vmsnap.strategies.blockdev_backup.plan",
        "overlay_bitmap_actions": "vmsnap.strategies.blockdev_backup.bitmaps",
        "qcow2_virtual_size": "vmsnap.legacy:qcow2_virtual_size",
        "target_node": "vmsnap.strategies.blockdev_backup.plan",
    },
    "vmsnap.strategies.base": {},
    "vmsnap.strategies.qemu_common": {
        "OVERLAY_MARK": "vmsnap.strategies.external",
        "allocated_fraction": "vmsnap.image.qemu_img",
        "convert_argv": "vmsnap.image.qemu_img",
        "distinct_names": "vmsnap.strategies.base",
        "file_source": "vmsnap.strategies.base",
        "internal_snapshots": "vmsnap.legacy:internal_snapshots",
        "lazy_refcounts": "vmsnap.image.qemu_img",
        "overlay_path": "vmsnap.strategies.external",
        "parse_overlay_path": "vmsnap.strategies.external",
        "qemu_img_info": "vmsnap.legacy:image_info",
        "qemu_img_source_args": "vmsnap.image.qemu_img:source_args",
        "require_qcow2": "vmsnap.strategies.base",
        "stop_process": "vmsnap.processes:stop",
    },
    "vmsnap.thawguard": {
        "DEFAULT_GIVE_UP": "vmsnap.vm.thawguard",
        "READY_TIMEOUT": "vmsnap.vm.guards",
        "ThawGuard": "vmsnap.vm.guards",
        "main": "vmsnap.vm.thawguard",
        "thaw_when_possible": "vmsnap.vm.thawguard",
        "wait_for_parent": "vmsnap.vm.thawguard",
    },
}
"""Old module → old name → its new home: ``module`` (same name) or ``module:name``."""

ADVICE_LIBVIRT_NATIVE = (
    "the passthrough strategies over --domain (internal, external, backup in vmsnap.strategies), which "
    "vmsnap's backups use: the libvirt-native snapshot and backup code was removed in the third round"
)

REMOVED: dict[str, dict[str, str]] = {
    "vmsnap.libvirt_ops": {
        "LibvirtExternalSnapshotStrategy": ADVICE_LIBVIRT_NATIVE,
        "MARK": ADVICE_LIBVIRT_NATIVE,
        "STRATEGY_EXTERNAL": ADVICE_LIBVIRT_NATIVE,
        "STRATEGY_INTERNAL": ADVICE_LIBVIRT_NATIVE,
        "backup_pull": ADVICE_LIBVIRT_NATIVE,
        "backup_push": ADVICE_LIBVIRT_NATIVE,
        "checkpoints": ADVICE_LIBVIRT_NATIVE,
        "commit_external_snapshot": ADVICE_LIBVIRT_NATIVE,
        "create_external_snapshot": ADVICE_LIBVIRT_NATIVE,
        "create_internal_snapshot": ADVICE_LIBVIRT_NATIVE,
        "delete_checkpoint": ADVICE_LIBVIRT_NATIVE,
        "delete_snapshot": ADVICE_LIBVIRT_NATIVE,
        "external_overlays": ADVICE_LIBVIRT_NATIVE,
        "external_snapshot_source": ADVICE_LIBVIRT_NATIVE,
        "internal_snapshot_source": ADVICE_LIBVIRT_NATIVE,
        "link_incremental": ADVICE_LIBVIRT_NATIVE,
        "recover": ADVICE_LIBVIRT_NATIVE,
        "revert_snapshot": ADVICE_LIBVIRT_NATIVE,
        "rollback_external_snapshot": ADVICE_LIBVIRT_NATIVE,
        "snapshots": ADVICE_LIBVIRT_NATIVE,
    },
    "vmsnap.strategies.libvirt_external": {
        "LibvirtExternalSnapshotStrategy": ADVICE_LIBVIRT_NATIVE,
    },
    "vmsnap.vm.libvirt.backups": {
        "backup_pull": ADVICE_LIBVIRT_NATIVE,
        "backup_push": ADVICE_LIBVIRT_NATIVE,
        "checkpoints": ADVICE_LIBVIRT_NATIVE,
        "delete_checkpoint": ADVICE_LIBVIRT_NATIVE,
        "link_incremental": ADVICE_LIBVIRT_NATIVE,
        "recover": ADVICE_LIBVIRT_NATIVE,
    },
    "vmsnap.vm.libvirt.snapshots": {
        "MARK": ADVICE_LIBVIRT_NATIVE,
        "STRATEGY_EXTERNAL": ADVICE_LIBVIRT_NATIVE,
        "STRATEGY_INTERNAL": ADVICE_LIBVIRT_NATIVE,
        "commit_external_snapshot": ADVICE_LIBVIRT_NATIVE,
        "create_external_snapshot": ADVICE_LIBVIRT_NATIVE,
        "create_internal_snapshot": ADVICE_LIBVIRT_NATIVE,
        "delete_snapshot": ADVICE_LIBVIRT_NATIVE,
        "external_overlays": ADVICE_LIBVIRT_NATIVE,
        "external_snapshot_source": ADVICE_LIBVIRT_NATIVE,
        "internal_snapshot_source": ADVICE_LIBVIRT_NATIVE,
        "revert_snapshot": ADVICE_LIBVIRT_NATIVE,
        "rollback_external_snapshot": ADVICE_LIBVIRT_NATIVE,
        "snapshots": ADVICE_LIBVIRT_NATIVE,
    },
    "vmsnap.cli": {
        "ProgressBar": "a DiskProgress callback (vmsnap.repo.progress)",
        "VmSelector": "vmsnap.vm.select.MachineSpec",
        "vm_selector": "vmsnap.vm.select.MachineSpec and vmsnap.vm.select.open_machine()",
    },
    "vmsnap.jobs.default": {
        "LOCK_WAIT": "vmsnap.jobs.run (a job waits for a VM's lock there)",
        "LegacyJobFunctions": "vmsnap.jobs.default.run_job_file() or vmsnap.jobs.run",
    },
    "vmsnap.restore.host": {
        "MountEntry": "vmsnap.mounts.Mount (one line of /proc/self/mountinfo)",
        "mounts": "vmsnap.mounts.local_mounts()",
        "parse_mounts": "vmsnap.mounts.parse_mountinfo() (of /proc/self/mountinfo)",
    },
    "vmsnap.runner": {
        "RecordingRunner": "a Runner of your own (protocol vmsnap.runner.Runner)",
    },
    "vmsnap.strategies.base": {
        "TransactionalStrategy": "Capabilities(instant='transaction') (vmsnap.strategies.base)",
    },
    "vmsnap.strategies.qemu_common": {
        "private_directory": "vmsnap.files.make_private_dir() here, or `mktemp -d` through your Runner",
        "image_opts_escape": (
            "the image's options as a JSON blockdev spec (QEMU's json: filename); vmsnap no longer builds "
            "--image-opts strings"
        ),
        "qemu_img_check": "`qemu-img check` through a Runner (vmsnap.runner.LocalRunner)",
        "qemu_nbd_export": "vmsnap.image.nbd.QemuNbdServer",
    },
}
"""Old module → old name → what to use instead (no equivalent with the old behaviour exists)."""


class RemovedNameError(ImportError):
    """A name of an older vmsnap that has no equivalent; the message says what to use instead (raised by
    ``from OLD import NAME`` and by ``getattr``)."""


def new_home(module: str, name: str) -> str | None:
    """``new.module.name`` of an old module's name, or None when it did not move."""
    target = MOVED.get(module, {}).get(name)
    if target is None:
        return None
    new_module, _, new_name = target.partition(":")
    return f"{new_module}.{new_name or name}"


def old_names(module: str) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``module``, a module some of whose names moved or were removed
    (``__getattr__ = old_names(__name__)``): each call is :func:`resolve` of that module."""

    def __getattr__(name: str) -> Any:
        return resolve(module, name)

    return __getattr__


def resolve(module: str, name: str) -> Any:
    """The module ``__getattr__`` of an old module: the moved name's object, after a DeprecationWarning
    naming its new home.

    :raise RemovedNameError: the name has no equivalent (the message says what to use instead)
    :raise AttributeError: the module never had that name
    """
    target = MOVED.get(module, {}).get(name)
    if target is None:
        advice = REMOVED.get(module, {}).get(name)
        if advice is not None:
            raise RemovedNameError(f"{module}.{name} was removed: use {advice}", name=name, path=None)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, _, new_name = target.partition(":")
    value = getattr(importlib.import_module(new_module), new_name or name)
    warnings.warn(
        f"{module}.{name} is deprecated: import {new_name or name} from {new_module}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
