"""The repository commands: backup, restore, list, verify, prune and recover."""

from __future__ import annotations

import argparse
from pathlib import Path

import attrs

from vmsnap.backup import Backup, BackupConfig, recover
from vmsnap.cli.common import (
    Command,
    add_disk_option,
    add_repo_option,
    add_vm_arguments,
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
from vmsnap.errors import ChainError, ChecksumMismatchError, RepositoryError
from vmsnap.repo.manifest import Damaged
from vmsnap.repo.repository import Repository
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
    )
    with (
        opened_machine(machine_spec(args)) as machine,
        sigterm_interrupts(),  # `kill PID` undoes the run like Ctrl-C does
        disk_progress(not args.json) as progress,
    ):
        result = Backup(machine, config, progress=progress, note=note).run()
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


# -- restore ------------------------------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace) -> int:
    """Write standalone, verified ``--to/<disk>.qcow2`` images of a backup (and define a domain on them)."""
    with disk_progress(not args.json) as progress:
        result = restore_images(
            args.repo,
            args.vm,
            args.backup,
            args.to,
            disks=tuple(args.disk),
            define=args.define,
            connect=args.connect,
            progress=progress,
        )
    human = [f"restored {result.vm}/{result.backup_id} ({result.kind}); every sha256 matches the manifest"]
    human += [f"  {d.path}  {mib(d.virtual_size)}" for d in result.disks]
    if result.defined is not None:
        human.append(f"defined libvirt domain {result.defined} on the restored images (not started)")
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


# -- list, verify, prune ------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """List the backups in --repo (of one VM with --vm), oldest first; exit 1 if a manifest is damaged."""
    repo = Repository.open(args.repo)
    damaged: list[Damaged] = []
    backups = repo.backups(args.vm, damaged=damaged)
    if args.vm is not None and not backups and not damaged:
        repo.get(args.vm)  # raises NotFoundError naming the VMs that exist
    rows = [
        [m.vm, m.backup_id, m.kind, m.parent or "-", m.strategy, m.transport, m.created[:19], mib(m.size)]
        for m in backups
    ]
    human = (
        render_table(["vm", "backup", "kind", "parent", "strategy", "transport", "created", "written"], rows)
        if rows
        else f"no backups in {repo.root}"
    )
    payload = {
        "backups": [m.to_json() for m in backups],
        "damaged": [{"vm": d.vm, "backup_id": d.backup_id, "error": d.error.message} for d in damaged],
    }
    emit(args, payload, human)
    if damaged:
        raise RepositoryError(
            f"{len(damaged)} backup(s) have a damaged manifest; first: "
            f"{damaged[0].vm}/{damaged[0].backup_id}: {damaged[0].error.message}",
            hint="run `vmsnap verify`; the other backups are listed and usable",
        )
    return 0


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument("--vm", metavar="NAME", help="only this VM")


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read backups, check every checksum and chain link; exit 1 naming the first problem."""
    repo = Repository.open(args.repo)
    with disk_progress(not args.json) as progress:
        report = repo.verify(args.vm, args.backup, reader=args.reader, progress=progress)
    payload = {
        "ok": report.ok,
        "reader": report.reader,
        "checked": [{"vm": vm, "backup_id": backup_id} for vm, backup_id in report.checked],
        "problems": [attrs.asdict(p) for p in report.problems],
    }
    human = [f"verified {len(report.checked)} backup(s) with the {report.reader} reader"]
    human += [f"  PROBLEM {p}" for p in report.problems]
    if report.ok:
        human.append("  all checksums and chain links are good")
    emit(args, payload, "\n".join(human))
    if not report.ok:
        first = report.problems[0]
        error = ChecksumMismatchError if "sha256" in first.message else ChainError
        raise error(
            f"verify found {len(report.problems)} problem(s); first: {first}",
            hint="restore from a backup that verifies, and take a new full backup",
        )
    return 0


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _list_arguments(parser)
    parser.add_argument("--backup", metavar="ID", help="only this backup (with --vm)")
    parser.add_argument(
        "--reader",
        choices=("auto", "qemu", "libqcow"),
        default="auto",
        help="read images with qemu or with libqcow, independent of QEMU (auto: libqcow when installed)",
    )


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove all but the last --keep-last backups per VM, keeping the parents kept ones need."""
    repo = Repository.open(args.repo)
    vms = [args.vm] if args.vm else repo.vms()
    results = [repo.prune(vm, args.keep_last, dry_run=args.dry_run) for vm in vms]
    verb = "would remove" if args.dry_run else "removed"
    human = [
        f"{r.vm}: {verb} {len(r.removed)}, kept {len(r.kept)}"
        + (f" (+{len(r.needed)} parent(s) they need)" if r.needed else "")
        + "".join(f"\n  {verb} {b}" for b in r.removed)
        for r in results
    ]
    payload = {"dry_run": args.dry_run, "pruned": [attrs.asdict(r) for r in results]}
    emit(args, payload, "\n".join(human) or f"no backups in {repo.root}")
    return 0


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument("--vm", metavar="NAME", help="only this VM (default: every VM)")
    parser.add_argument(
        "--keep-last", type=int, required=True, metavar="N", help="backups to keep per VM (>= 1)"
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")


# -- recover ------------------------------------------------------------------------------------------------


def cmd_recover(args: argparse.Namespace) -> int:
    """Undo what a dead backup of a VM left (snapshots, overlays, staging; thaw the guest) and, with or
    without a VM, what dead mounts and finished instant restores left on this host."""
    named = (args.qmp, args.agent, args.name, args.domain, args.connect, *args.image)
    if any(value is not None for value in named):
        with opened_machine(machine_spec(args)) as machine:
            report = recover(machine, args.repo, run_root=run_root())
    else:
        report = recover(None, args.repo, run_root=run_root())
    what = report.vm or "this host's mounts and instant restores"
    human = "\n".join(report.actions) if report.actions else f"{what}: nothing to recover"
    if args.repo is None and report.vm:
        human += "\n(pass --repo DIR to undo a dead backup's snapshots from its journal)"
    payload = {"vm": report.vm or None, "clean": report.clean, "actions": list(report.actions)}
    emit(args, payload, human)
    return 0


def _recover_arguments(parser: argparse.ArgumentParser) -> None:
    add_vm_arguments(parser)
    add_repo_option(parser, required=False, help="the repository the dead backup wrote to")


COMMANDS = (
    Command(
        "backup",
        "back up a VM into a repository (made when the directory is new or empty)",
        "vmsnap backup --repo /backups --qmp /run/vm1.qmp --agent /run/vm1.qga --incremental",
        cmd_backup,
        _backup_arguments,
    ),
    Command(
        "restore",
        "restore a backup into standalone, verified DIR/<disk>.qcow2 images",
        "vmsnap restore --repo /backups --vm web1 --to /restore",
        cmd_restore,
        _restore_arguments,
    ),
    Command(
        "list",
        "list the backups in a repository",
        "vmsnap list --repo /backups --vm web1",
        cmd_list,
        _list_arguments,
    ),
    Command(
        "verify",
        "re-read backups and check every checksum and chain link",
        "vmsnap verify --repo /backups --vm web1 --reader libqcow",
        cmd_verify,
        _verify_arguments,
    ),
    Command(
        "prune",
        "delete old backups, never breaking a chain a kept backup needs",
        "vmsnap prune --repo /backups --vm web1 --keep-last 7",
        cmd_prune,
        _prune_arguments,
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
