"""The commands that move a VM's data: backup, restore and recover (the repository's own upkeep is in
:mod:`vmsnap.cli.upkeep`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vmsnap.backup import Backup, BackupConfig
from vmsnap.cli.common import (
    Command,
    add_as_of_option,
    add_disk_option,
    add_key_option,
    add_repo_option,
    add_vm_arguments,
    as_of_location,
    emit,
    machine_spec,
    mib,
    note,
    opened_machine,
    render_table,
    sigterm_interrupts,
)
from vmsnap.cli.progress import disk_progress
from vmsnap.cli.restore import run_root
from vmsnap.errors import UsageError
from vmsnap.restore.commands import recover_host
from vmsnap.restore.images import restore_images

# -- backup -------------------------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up a VM into --repo and print what was written (``--json``: the object in DESIGN.md)."""
    config = BackupConfig(
        repo=args.repo,
        strategy=args.strategy,
        transport=args.transport,
        incremental=args.incremental,
        quiesce=args.quiesce,
        disks=tuple(args.disk),
        bitmap=args.bitmap,
        key_file=args.key_file,
    )
    with (
        opened_machine(machine_spec(args)) as machine,
        sigterm_interrupts(),  # `kill PID` undoes the run like Ctrl-C does
        disk_progress(not args.json) as progress,
    ):
        result = Backup(machine, config, progress=progress, transfer=progress.transfer, note=note).run()
    lines = [
        f"backed up {result.vm} as {result.backup_id}: {result.kind}"
        + (f" on {result.parent}" if result.parent else "")
        + f", strategy {result.strategy}, transport {result.transport}, "
        + ("quiesced" if result.quiesced else "not quiesced")
        + f", {result.seconds:.1f} s"
    ]
    rows = [[d.name, mib(d.virtual_size), mib(d.bytes_written), d.sha256[:16]] for d in result.disks]
    lines.append(render_table(["disk", "size", "written", "sha256"], rows))
    emit(args, result.to_json(), "\n".join(lines))
    return 0


def _backup_arguments(parser: argparse.ArgumentParser) -> None:
    add_vm_arguments(parser)
    add_repo_option(parser)
    parser.add_argument(
        "--strategy", default="auto", help="backup|external|internal|lvm|btrfs (default: backup)"
    )
    parser.add_argument(
        "--transport", default="auto", help="copy|nbd|rsync (default: copy; strategy backup: QEMU writes it)"
    )
    parser.add_argument(
        "--incremental", action="store_true", help="only what changed since the latest backup"
    )
    parser.add_argument(
        "--quiesce", choices=("auto", "on", "off"), default="auto", help="freeze the guest (auto)"
    )
    add_disk_option(parser)
    parser.add_argument(
        "--bitmap", default="vmsnap", help="dirty bitmap name for incrementals (default vmsnap)"
    )
    add_key_option(parser)


# -- restore ------------------------------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace) -> int:
    """Write standalone, verified ``--to/<disk>.qcow2`` images of a backup (and define a domain on them)."""
    with disk_progress(not args.json) as progress:
        result = restore_images(
            as_of_location(args.repo, args.as_of) or args.repo,
            args.vm,
            args.backup,
            args.to,
            disks=tuple(args.disk),
            define=args.define,
            connect=args.connect,
            progress=progress,
            format=args.format,
            devices=_devices(args.device),
            key_file=args.key_file,
        )
    human = [f"restored {result.vm}/{result.backup_id} ({result.kind}); every sha256 matches the manifest"]
    human += [f"  {d.path}  {mib(d.virtual_size)}" for d in result.disks]
    if result.defined is not None:
        human.append(f"defined libvirt domain {result.defined} on the restored images (not started)")
    if result.firmware_variables is not None:
        human.append(f"  {result.firmware_variables}  the UEFI variables as of the backup (its pflash)")
    emit(args, result.to_json(), "\n".join(human))
    return 0


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument("--vm", required=True, metavar="NAME", help="the VM's name in the repository")
    parser.add_argument("--backup", metavar="ID", help="the backup id (default: the latest)")
    parser.add_argument("--to", type=Path, required=True, metavar="DIR", help="where the images go")
    add_disk_option(parser)
    parser.add_argument(
        "--define",
        metavar="NAME",
        help="also define libvirt domain NAME (saved definition, restored images; not started)",
    )
    parser.add_argument("--connect", metavar="URI", help="libvirt URI for --define (default: qemu:///system)")
    parser.add_argument(
        "--format", choices=("qcow2", "raw"), default="qcow2", help="image format in DIR (raw: sparse)"
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="DISK=DEV",
        help="write disk DISK onto block device DEV instead of a file (repeat)",
    )
    add_key_option(parser)
    add_as_of_option(parser)


def _devices(pairs: list[str]) -> dict[str, Path]:
    """``--device DISK=DEV`` pairs.

    :raise UsageError: a pair without ``=``
    """
    devices: dict[str, Path] = {}
    for pair in pairs:
        disk, sep, device = pair.partition("=")
        if not sep or not disk or not device:
            raise UsageError(
                f"--device {pair!r}", hint="write --device DISK=/dev/DEVICE, e.g. vda=/dev/vg/restored"
            )
        devices[disk] = Path(device)
    return devices


# -- recover ------------------------------------------------------------------------------------------------


def cmd_recover(args: argparse.Namespace) -> int:
    """Undo what a dead backup of a VM left (snapshots, overlays, staging; thaw the guest) and, with or
    without a VM, what dead mounts and finished instant restores left on this host."""
    named = (args.qmp, args.agent, args.name, args.domain, args.connect, *args.image)
    if any(value is not None for value in named):
        with opened_machine(machine_spec(args)) as machine:
            report = recover_host(machine, args.repo, key_file=args.key_file, run_root=run_root())
    else:
        report = recover_host(None, args.repo, key_file=args.key_file, run_root=run_root())
    what = report.vm or "this host's mounts, instant restores and boot verifications"
    lines = [*report.actions, *report.found]
    if not report.actions:
        lines.append(f"{what}: nothing to recover")
    human = "\n".join(lines)
    if args.repo is None and report.vm:
        human += "\n(pass --repo DIR to undo a dead backup's snapshots from its journal)"
    payload = {
        "vm": report.vm or None,
        "clean": report.clean,
        "actions": list(report.actions),
        "found": list(report.found),
    }
    emit(args, payload, human)
    return 0


def _recover_arguments(parser: argparse.ArgumentParser) -> None:
    add_vm_arguments(parser)
    add_repo_option(parser, required=False, help="the repository the dead backup wrote to")
    add_key_option(parser)


COMMANDS = (
    Command(
        "backup",
        "back up a VM into a repository (made when the directory is new or empty)",
        "vmsnap backup --repo /backups --qmp /run/vm1.qmp --agent /run/vm1.qga --incremental",
        cmd_backup,
        _backup_arguments,
        more_examples=(
            "vmsnap backup --repo /backups --host root@hv2 --qmp /run/qemu/db.qmp --incremental",
            "vmsnap backup --repo s3://bucket/vmsnap --key-file /etc/vmsnap/key --domain web1",
        ),
    ),
    Command(
        "restore",
        "restore a backup into standalone, verified images (qcow2, sparse raw, or block devices)",
        "vmsnap restore --repo /backups --vm web1 --to /restore",
        cmd_restore,
        _restore_arguments,
    ),
    Command(
        "recover",
        "undo what a dead backup left (snapshots, overlays, fleecing nodes, staging; thaw the guest) and "
        "what dead mounts and instant restores left on this host (no VM: only those)",
        "vmsnap recover --qmp /run/vm1.qmp --agent /run/vm1.qga --repo /backups",
        cmd_recover,
        _recover_arguments,
    ),
)
"""The repository commands, in the order ``vmsnap --help`` lists them."""
