"""The commands that give a backup back without waiting for a full restore: mount, umount, instant-restore.

Each builds a frozen config from :mod:`vmsnap.restore.commands` and calls one function there. Their run
state lives under ``$VMSNAP_RUN_DIR`` (default ``/run/vmsnap``), the same for every command, so that
``umount``, ``mount --list`` and ``recover`` find what ``mount`` and ``instant-restore`` started.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

from vmsnap.cli.common import (
    Command,
    add_as_of_option,
    add_repo_option,
    as_of_location,
    emit,
    mib,
    render_table,
    sigterm_interrupts,
)
from vmsnap.cli.progress import disk_progress
from vmsnap.errors import UsageError
from vmsnap.restore.commands import (
    DEFAULT_RUN_ROOT,
    BackupRef,
    InstantConfig,
    InstantOutcome,
    MountConfig,
    instant_restore,
    list_mounts,
    mount_backup,
    umount_backup,
)

RUN_DIR_ENV = "VMSNAP_RUN_DIR"


def run_root() -> Path:
    """``$VMSNAP_RUN_DIR``, else ``/run/vmsnap``."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else DEFAULT_RUN_ROOT


def _backup_ref(args: argparse.Namespace) -> BackupRef | None:
    """The backup the options name; None when neither --repo nor --vm is given.

    :raise UsageError: only one of them is given
    """
    named = (args.repo, args.vm, args.backup, args.key_file, args.as_of)
    if all(value is None for value in named):
        return None
    if args.repo is None or args.vm is None:
        raise UsageError("a backup is named by --repo and --vm (and --backup ID for one but the latest)")
    return BackupRef(as_of_location(args.repo, args.as_of) or args.repo, args.vm, args.backup, args.key_file)


def _add_backup_options(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser, required=False)
    parser.add_argument("--vm", metavar="NAME", help="the VM's name in the repository")
    parser.add_argument("--backup", metavar="ID", help="the backup id (default: the latest)")
    parser.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        help="an encrypted repository's key file (default: $VMSNAP_KEY_FILE)",
    )
    add_as_of_option(parser)


# -- mount, umount ------------------------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount a backup's disk read-only (each partition at MOUNTPOINT/p<N>), or list vmsnap's mounts."""
    if args.list:
        return _list(args)
    backup = _backup_ref(args)
    if backup is None or args.mountpoint is None:
        raise UsageError("mount needs --repo, --vm and a MOUNTPOINT (or --list)")
    config = MountConfig(backup, args.mountpoint, args.disk, run_root())
    with sigterm_interrupts():  # `kill PID` undoes a half-made mount like Ctrl-C does
        mounted = mount_backup(config)
    result = mounted.result
    human = [f"mounted {mounted.vm}/{mounted.backup_id} disk {mounted.disk} read-only at {result.mountpoint}"]
    rows = [[p.name, p.fstype, p.label or "-", mib(p.size), str(p.path)] for p in result.partitions]
    human.append(render_table(["partition", "filesystem", "label", "size", "files at"], rows))
    human += [f"  not mounted: {s.reason}" for s in result.skipped]
    human.append(f"`vmsnap umount {result.mountpoint}` when done")
    emit(args, mounted.to_json(), "\n".join(human))
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.mountpoint is not None or args.repo is not None or args.vm is not None:
        raise UsageError("--list takes no backup and no mountpoint")
    mounts = list_mounts(run_root())
    rows = [[m.get("mountpoint", "?"), m.get("source", {}).get("identity", "?"), _health(m)] for m in mounts]
    emit(
        args,
        {"mounts": mounts},
        render_table(["mountpoint", "backup disk", "state"], rows) if rows else "no vmsnap mounts",
    )
    return 0


def _health(state: dict[str, object]) -> str:
    if state.get("healthy"):
        return "mounted"
    return f"{state.get('status', '?')}, servers gone (`vmsnap recover` cleans it)"


def _mount_arguments(parser: argparse.ArgumentParser) -> None:
    _add_backup_options(parser)
    parser.add_argument(
        "--disk", metavar="NAME", help="the disk to mount (needed when the backup has several)"
    )
    parser.add_argument("--list", action="store_true", help="list vmsnap's mounts instead")
    parser.add_argument("mountpoint", type=Path, nargs="?", metavar="MOUNTPOINT", help="an empty directory")


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount a backup mounted by ``vmsnap mount``; nothing of it is left."""
    umount_backup(args.mountpoint, run_root=run_root(), lazy=args.lazy)
    emit(args, {"mountpoint": str(args.mountpoint), "unmounted": True}, f"unmounted {args.mountpoint}")
    return 0


def _umount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="where `vmsnap mount` mounted it")
    parser.add_argument(
        "--lazy", action="store_true", help="detach busy filesystems now, let go when their files close"
    )


# -- instant-restore ----------------------------------------------------------------------------------------

_RATE = re.compile(r"^(\d+)\s*([kKmMgG]?)(?:i?B)?(?:/s)?$")


def bytes_per_second(text: str) -> int:
    """``--speed``: bytes per second, with an optional K, M or G (powers of 1024): ``50M``."""
    match = _RATE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 52428800 or 50M")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * factor


def cmd_instant_restore(args: argparse.Namespace) -> int:
    """Run a VM on its backup now, copying the data in the background (see DESCRIPTION)."""
    config = InstantConfig(
        to=args.to,
        backup=_backup_ref(args),
        disks=tuple(args.disk),
        define=args.define,
        domain=args.domain,
        connect=args.connect,
        qmp=args.qmp,
        speed=args.speed,
        run_root=run_root(),
    )
    with disk_progress(not args.json) as progress:
        outcome = instant_restore(config, progress=progress)
    emit(args, outcome.to_json(), _instant_human(outcome))
    return 0


def _instant_human(outcome: InstantOutcome) -> str:
    restore = outcome.restore
    rows = [[d.name, str(d.image), mib(d.virtual_size)] for d in restore.disks]
    table = render_table(["disk", "image", "size"], rows)
    if outcome.stream is None:
        again = " (resumed: servers checked)" if restore.resumed else ""
        return "\n".join(
            [
                f"prepared {restore.to} from {outcome.vm}/{outcome.backup_id}{again}; the backup is served "
                "read-only until the copy ends",
                table,
                "start QEMU on these images, e.g. with:",
                "  " + shlex.join(restore.qemu_args()),
                "then copy the rest in the background (run it again to resume):",
                f"  vmsnap instant-restore --to {shlex.quote(str(restore.to))} --qmp QMP-SOCKET",
            ]
        )
    stream = outcome.stream
    where = f"domain {outcome.domain} runs" if outcome.domain else "the VM runs"
    copied = ", ".join(stream.streamed) or "none (all were copied already)"
    return (
        f"{where} on standalone images in {restore.to}; copied {copied} in {stream.seconds:.1f} s; "
        f"the backup's servers are stopped\n{table}"
    )


def _instant_arguments(parser: argparse.ArgumentParser) -> None:
    _add_backup_options(parser)
    parser.add_argument("--disk", action="append", default=[], metavar="NAME", help="only this disk (repeat)")
    parser.add_argument(
        "--to", type=Path, required=True, metavar="DIR", help="the directory of the new images"
    )
    parser.add_argument("--define", metavar="NEWNAME", help="libvirt: define and start this domain")
    parser.add_argument(
        "--qmp", type=Path, metavar="SOCKET", help="bare QEMU: the QMP socket of the QEMU on the images"
    )
    parser.add_argument(
        "--domain", metavar="NAME", help="libvirt: the domain on the images (resume without --repo)"
    )
    parser.add_argument("--connect", metavar="URI", help="libvirt URI (default: qemu:///system)")
    parser.add_argument(
        "--speed",
        type=bytes_per_second,
        default=0,
        metavar="RATE",
        help="limit the copy per disk, bytes/s (K/M/G suffixes; default unlimited)",
    )


INSTANT_DESCRIPTION = """\
Run a VM on a backup within seconds: new qcow2 images in --to read what they do not hold yet from the
backup (served read-only over NBD by a server that outlives vmsnap), and the data is copied into them in
the background until they no longer need it; then the server stops. Killing vmsnap during the copy
leaves the VM running and the copy going: run the same command again to resume and finish it.

libvirt, one command:
  vmsnap instant-restore --repo R --vm web1 --to DIR --define web1-restored [--connect URI] [--speed RATE]
bare QEMU, two steps:
  vmsnap instant-restore --repo R --vm vm1 --to DIR         prepare; prints the QEMU options for the images
  vmsnap instant-restore --to DIR --qmp SOCKET [--speed RATE]   after QEMU started on them: copy, finish
resume a libvirt restore without the repository:
  vmsnap instant-restore --to DIR --domain web1-restored [--connect URI]
"""

COMMANDS = (
    Command(
        "mount",
        "mount a backup's disk read-only: each partition at MOUNTPOINT/p<N> (--list: vmsnap's mounts)",
        "vmsnap mount --repo /backups --vm web1 --disk vda /mnt/web1",
        cmd_mount,
        _mount_arguments,
    ),
    Command(
        "umount",
        "unmount a backup mounted by vmsnap mount; nothing of it is left",
        "vmsnap umount /mnt/web1",
        cmd_umount,
        _umount_arguments,
    ),
    Command(
        "instant-restore",
        "run a VM on its backup now; the data is copied in the background (repeat to resume)",
        "vmsnap instant-restore --repo /backups --vm web1 --to /var/lib/libvirt/images/web1r --define web1r",
        cmd_instant_restore,
        _instant_arguments,
        description=INSTANT_DESCRIPTION,
    ),
)
"""The restore-without-waiting commands, in the order ``vmsnap --help`` lists them."""
