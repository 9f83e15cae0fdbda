"""The ``vmsnap`` command: parse arguments into frozen config, call the library, print the outcome.

This is the only module that prints. Exit status: 0 success, 2 usage error, 1 any other failure, with one
line saying what failed and what to do (``--debug`` adds the traceback). ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap import __version__
from vmsnap.errors import UsageError, VmsnapError
from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine

# -- the VM selector shared by every command that takes a VM ---------------------------------------


@attrs.frozen
class VmSelector:
    """Which VM a command acts on: a bare QEMU, a libvirt domain, or powered-off images."""

    qmp: Path | None = None
    agent: Path | None = None
    name: str | None = None
    domain: str | None = None
    connect: str | None = None
    images: tuple[Path, ...] = ()

    def open(self) -> Machine:
        """Build the machine this selector names.

        :raise UsageError: no selector, or two at once
        """
        chosen = sum(bool(x) for x in (self.qmp, self.domain, self.images))
        if chosen != 1:
            raise UsageError(
                "name exactly one VM",
                hint="use --qmp SOCKET [--agent SOCKET], --domain NAME, or --image FILE ...",
            )
        if self.qmp is not None:
            return QemuMachine(self.qmp, self.agent, name=self.name)
        if self.domain is not None:
            from vmsnap.vm.libvirt.machine import LibvirtMachine  # needs the optional libvirt extra

            return LibvirtMachine(self.domain, uri=self.connect)
        return OfflineMachine(list(self.images), name=self.name)


def add_vm_arguments(parser: argparse.ArgumentParser) -> None:
    """--qmp/--agent/--name | --domain/--connect | --image ..."""
    group = parser.add_argument_group("VM (one of)")
    group.add_argument("--qmp", type=Path, metavar="SOCKET", help="QMP unix socket of a running QEMU")
    group.add_argument("--agent", type=Path, metavar="SOCKET", help="guest agent socket of that QEMU")
    group.add_argument(
        "--name", help="the VM's name in the repository (default: QEMU's -name, or the image stem)"
    )
    group.add_argument("--domain", metavar="NAME", help="a libvirt domain")
    group.add_argument("--connect", metavar="URI", help="libvirt connection URI (default: qemu:///system)")
    group.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a powered-off disk image (repeat)",
    )


def vm_selector(args: argparse.Namespace) -> VmSelector:
    """The frozen selector from parsed arguments."""
    return VmSelector(
        qmp=args.qmp,
        agent=args.agent,
        name=args.name,
        domain=args.domain,
        connect=args.connect,
        images=tuple(args.image),
    )


# -- output -----------------------------------------------------------------------------------------


def emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    """Print ``payload`` as one JSON object with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, sort_keys=True, default=str))
    else:
        print(human)


def render_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable on a terminal, pasteable into docs)."""
    cells = [list(headings), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------------


def cmd_strategies(args: argparse.Namespace) -> int:
    """Print the comparison table from each strategy's Traits."""
    from vmsnap.model import Traits
    from vmsnap.strategies import strategy_class, strategy_names

    columns = Traits.columns()
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    for name in strategy_names():
        try:
            traits = strategy_class(name).traits
        except VmsnapError as err:
            data[name] = {"error": str(err)}
            continue
        values = attrs.asdict(traits)
        data[name] = values
        rows.append([name, *[str(values[field]) for field, _ in columns]])
    emit(args, {"strategies": data}, render_table(["strategy", *[h for _, h in columns]], rows))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    """Run one guest-* command through the VM's agent and print its answer."""
    try:
        arguments = json.loads(args.arguments) if args.arguments else None
    except json.JSONDecodeError as err:
        raise UsageError(
            f"JSON-ARGS is not valid JSON: {err}", hint='e.g. \'{"mountpoints": ["/"]}\''
        ) from err
    if not args.command.startswith("guest-"):
        raise UsageError(
            f"{args.command!r} is not a guest agent command", hint="agent commands start with guest-"
        )
    machine = vm_selector(args).open()
    try:
        agent = machine.agent()
        if agent is None:
            raise UsageError(f"{machine.name} has no guest agent channel", hint="pass --agent SOCKET")
        answer = agent.execute(args.command, arguments, timeout=args.timeout)
    finally:
        machine.close()
    print(json.dumps({"return": answer}, sort_keys=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure each strategy's costs; write JSON, Markdown and PNG into --out."""
    from vmsnap.benchmark import run_cost_bench

    quiet = bool(args.json)
    result, paths = run_cost_bench(
        args.out,
        quick=args.quick,
        runs=args.runs,
        progress=(lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True)),
    )
    payload: dict[str, Any] = {
        "results": {k: str(v) for k, v in paths.items()},
        "table": result.to_json()["table"],
    }
    human = paths["markdown"].read_text()
    if args.throughput or args.peers:
        from vmsnap.benchmark.report import write_throughput
        from vmsnap.benchmark.throughput import run_throughput

        document = run_throughput(
            quick=args.quick,
            runs=args.runs,
            peers=args.peers,
            progress=(lambda line: None)
            if quiet
            else (lambda line: print(line, file=sys.stderr, flush=True)),
        )
        for kind, path in write_throughput(document, args.out).items():
            paths[f"throughput_{kind}"] = path
        payload["throughput"] = document["ratios"]
        if document.get("peers"):
            payload["peers"] = document["peers"].get("ratios", {})
        human += "\n" + paths["throughput_markdown"].read_text()
    payload["results"] = {k: str(v) for k, v in paths.items()}
    emit(args, payload, human + "\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def cmd_guest_install_hooks(args: argparse.Namespace) -> int:
    """Write the fsfreeze-hook dispatcher and vmsnap's hook scripts under --root."""
    from vmsnap.guest.install import install_hooks

    installed = install_hooks(args.root)
    emit(
        args,
        {"installed": [{"path": str(f.path), "mode": f"{f.mode:04o}"} for f in installed]},
        "\n".join(f"installed {f.path} (mode {f.mode:04o})" for f in installed),
    )
    return 0


# -- backup, restore, list, verify, prune, recover (the repository commands) -------------------------------


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (never with --json)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = ""

    def __call__(self, disk: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        fraction = min(max(done / total, 0.0), 1.0)
        filled = int(fraction * 30)
        line = (
            f"\r{disk:<12.12} [{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% "
            f"{done / 2**20:,.1f}/{total / 2**20:,.1f} MiB"
        )
        if line != self._last:
            print(line, end="" if done < total else "\n", file=sys.stderr, flush=True)
            self._last = line


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt for the body, so a terminated backup undoes what it did."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _note(message: str) -> None:
    print(f"vmsnap: {message}", file=sys.stderr)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up a VM into --repo and print what was written (``--json``: the object in DESIGN.md)."""
    from vmsnap.backup.run import Backup, BackupConfig

    config = BackupConfig(
        repo=args.repo,
        strategy=args.strategy,
        transport=args.transport,
        incremental=args.incremental,
        quiesce=args.quiesce,
        disks=tuple(args.disk),
        bitmap=args.bitmap,
    )
    machine = vm_selector(args).open()
    try:
        with _sigterm_interrupts():  # `kill PID` undoes the run like Ctrl-C does
            result = Backup(machine, config, progress=ProgressBar(not args.json), note=_note).run()
    finally:
        machine.close()
    lines = [
        f"backed up {result.vm} as {result.backup_id}: {result.kind}"
        + (f" on {result.parent}" if result.parent else "")
        + f", strategy {result.strategy}, transport {result.transport}, "
        + ("quiesced" if result.quiesced else "not quiesced")
        + f", {result.seconds:.1f} s"
    ]
    rows = [[d.name, _mib(d.virtual_size), _mib(d.bytes_written), d.sha256[:16]] for d in result.disks]
    lines.append(render_table(["disk", "size", "written", "sha256"], rows))
    emit(args, result.to_json(), "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Write standalone, verified ``--to/<disk>.qcow2`` images of a backup."""
    from vmsnap.repo.repository import Repository

    repo = Repository.open(args.repo)
    if args.define:  # before anything is written: the definition must exist and the name be free
        _check_define(args, repo)
    manifest, restored = repo.restore(
        args.vm, args.backup, args.to, disks=tuple(args.disk), progress=ProgressBar(not args.json)
    )
    payload = {
        "vm": manifest.vm,
        "backup_id": manifest.backup_id,
        "kind": manifest.kind,
        "disks": [
            {"name": d.name, "file": str(d.path), "virtual_size": d.virtual_size, "sha256": d.sha256}
            for d in restored
        ],
    }
    human = [
        f"restored {manifest.vm}/{manifest.backup_id} ({manifest.kind}); every sha256 matches the manifest"
    ]
    human += [f"  {d.path}  {_mib(d.virtual_size)}" for d in restored]
    if args.define:
        defined = _define_restored_domain(args, repo, manifest, {d.name: d.path for d in restored})
        payload["defined"] = defined
        human.append(f"defined libvirt domain {defined} on the restored images (not started)")
    emit(args, payload, "\n".join(human))
    return 0


def _saved_definition(repo: Any, manifest: Any) -> Path:
    from vmsnap.backup.run import DOMAIN_XML
    from vmsnap.errors import NotFoundError

    saved = Path(repo.backup_dir(manifest.vm, manifest.backup_id)) / DOMAIN_XML
    if not saved.is_file():
        raise NotFoundError(
            f"backup {manifest.backup_id} of {manifest.vm} has no saved libvirt definition",
            hint="--define needs a backup taken with --domain; restore without it and define the VM yourself",
        )
    return saved


def _check_define(args: argparse.Namespace, repo: Any) -> None:
    """``restore --define NAME`` pre-flight: a saved definition, a valid name no domain has yet."""
    from vmsnap.model import validate_name
    from vmsnap.vm.libvirt.machine import open_connection

    validate_name(args.define, "domain name")
    _saved_definition(repo, repo.get(args.vm, args.backup))
    conn = open_connection(args.connect)
    try:
        taken = args.define in {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()
    if taken:
        raise UsageError(
            f"a libvirt domain {args.define!r} exists already", hint="choose another --define name"
        )


def _define_restored_domain(
    args: argparse.Namespace, repo: Any, manifest: Any, images: dict[str, Path]
) -> str:
    """``restore --define NAME``: a new libvirt domain from the definition saved with the backup."""
    from vmsnap.vm.libvirt.definition import define_restored_domain

    saved = _saved_definition(repo, manifest)
    return define_restored_domain(args.connect, saved.read_text(), name=args.define, images=images)


def cmd_list(args: argparse.Namespace) -> int:
    """List the backups in --repo (of one VM with --vm), oldest first; exit 1 if a manifest is damaged."""
    from vmsnap.errors import RepositoryError
    from vmsnap.repo.repository import Damaged, Repository

    repo = Repository.open(args.repo)
    damaged: list[Damaged] = []
    backups = repo.backups(args.vm, damaged=damaged)
    if args.vm is not None and not backups and not damaged:
        repo.get(args.vm)  # raises NotFoundError naming the VMs that exist
    rows = [
        [m.vm, m.backup_id, m.kind, m.parent or "-", m.strategy, m.transport, m.created[:19], _mib(m.size)]
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


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read backups, check every checksum and chain link; exit 1 naming the first problem."""
    from vmsnap.errors import ChainError, ChecksumMismatchError
    from vmsnap.repo.repository import Repository

    repo = Repository.open(args.repo)
    report = repo.verify(args.vm, args.backup, reader=args.reader, progress=ProgressBar(not args.json))
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


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove all but the last --keep-last backups per VM, keeping the parents kept ones need."""
    from vmsnap.repo.repository import Repository

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


def cmd_recover(args: argparse.Namespace) -> int:
    """Undo what a dead backup of a VM left: snapshots, overlays, staging; thaw the guest."""
    from vmsnap.backup.run import recover

    machine = vm_selector(args).open()
    try:
        report = recover(machine, args.repo)
    finally:
        machine.close()
    human = "\n".join(report.actions) if report.actions else f"{report.vm}: nothing to recover"
    if args.repo is None:
        human += "\n(pass --repo DIR to undo a dead backup's snapshots from its journal)"
    emit(args, {"vm": report.vm, "clean": report.clean, "actions": list(report.actions)}, human)
    return 0


def _add_repository_commands(
    command: Callable[[str, str, str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser],
) -> None:
    """Parser sections of backup, restore, list, verify, prune and recover."""
    p = command(
        "backup",
        "back up a VM into a repository (made when the directory is new or empty)",
        "vmsnap backup --repo /backups --qmp /run/vm1.qmp --agent /run/vm1.qga --incremental",
        cmd_backup,
    )
    add_vm_arguments(p)
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the backup repository")
    p.add_argument("--strategy", default="auto", help="backup|external|internal|lvm|btrfs (default: backup)")
    p.add_argument(
        "--transport", default="auto", help="copy|nbd|rsync (default: copy; strategy backup: QEMU writes it)"
    )
    p.add_argument("--incremental", action="store_true", help="only what changed since the latest backup")
    p.add_argument("--quiesce", choices=("auto", "on", "off"), default="auto", help="freeze the guest (auto)")
    p.add_argument("--disk", action="append", default=[], metavar="NAME", help="only this disk (repeat)")
    p.add_argument("--bitmap", default="vmsnap", help="dirty bitmap name for incrementals (default vmsnap)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "restore",
        "restore a backup into standalone, verified DIR/<disk>.qcow2 images",
        "vmsnap restore --repo /backups --vm web1 --to /restore",
        cmd_restore,
    )
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the backup repository")
    p.add_argument("--vm", required=True, metavar="NAME", help="the VM's name in the repository")
    p.add_argument("--backup", metavar="ID", help="the backup id (default: the latest)")
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="where the images go")
    p.add_argument("--disk", action="append", default=[], metavar="NAME", help="only this disk (repeat)")
    p.add_argument(
        "--define",
        metavar="NAME",
        help="also define libvirt domain NAME (saved definition, restored images; not started)",
    )
    p.add_argument("--connect", metavar="URI", help="libvirt URI for --define (default: qemu:///system)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("list", "list the backups in a repository", "vmsnap list --repo /backups --vm web1", cmd_list)
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the backup repository")
    p.add_argument("--vm", metavar="NAME", help="only this VM")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "verify",
        "re-read backups and check every checksum and chain link",
        "vmsnap verify --repo /backups --vm web1 --reader libqcow",
        cmd_verify,
    )
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the backup repository")
    p.add_argument("--vm", metavar="NAME", help="only this VM")
    p.add_argument("--backup", metavar="ID", help="only this backup (with --vm)")
    p.add_argument(
        "--reader",
        choices=("auto", "qemu", "libqcow"),
        default="auto",
        help="read images with qemu or with libqcow, independent of QEMU (auto: libqcow when installed)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "prune",
        "delete old backups, never breaking a chain a kept backup needs",
        "vmsnap prune --repo /backups --vm web1 --keep-last 7",
        cmd_prune,
    )
    p.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the backup repository")
    p.add_argument("--vm", metavar="NAME", help="only this VM (default: every VM)")
    p.add_argument("--keep-last", type=int, required=True, metavar="N", help="backups to keep per VM (>= 1)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "recover",
        "undo what a dead backup left: snapshots, overlays, fleecing nodes, staging; thaw the guest",
        "vmsnap recover --qmp /run/vm1.qmp --agent /run/vm1.qga --repo /backups",
        cmd_recover,
    )
    add_vm_arguments(p)
    p.add_argument("--repo", type=Path, metavar="DIR", help="the repository the dead backup wrote to")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_demo(args: argparse.Namespace) -> int:
    """Back up and restore the built-in tiny VM, and prove the restored data is right."""
    from vmsnap.demo import run_demo

    quiet = bool(args.json)
    say = (lambda line: None) if quiet else (lambda line: print(f"demo: {line}", flush=True))
    report = run_demo(args.workdir, keep=args.keep, say=say)
    human = (
        f"demo: OK in {report.seconds:.0f} s — the restored filesystem is clean (e2fsck -fn) and "
        f"{report.files_matching}/{report.files_compared} files are byte-identical to the guest's at backup "
        f"time, although {report.changed_after_backup} changed afterwards"
    )
    emit(args, attrs.asdict(report), human)
    return 0


def _not_built_yet(what: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise VmsnapError(f"'vmsnap {what}' is not available in this version")

    return run


# -- parser -----------------------------------------------------------------------------------------

EPILOG = """examples:
  vmsnap backup --repo /backups --qmp /run/vm1.qmp --agent /run/vm1.qga
  vmsnap backup --repo /backups --domain web1 --incremental
  vmsnap restore --repo /backups --vm web1 --to /restore
  vmsnap strategies
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command has an example in its --help)."""
    parser = argparse.ArgumentParser(
        prog="vmsnap",
        description="Consistent backups of QEMU/KVM virtual machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmsnap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def command(
        name: str, help: str, example: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
        )
        return p

    p = command(
        "strategies",
        "print the snapshot strategies' comparison table",
        "vmsnap strategies --json",
        cmd_strategies,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "agent",
        "run one guest agent command (guest-*) and print its answer as JSON",
        "vmsnap agent --qmp vm.qmp --agent vm.qga guest-fsfreeze-status",
        cmd_agent,
    )
    add_vm_arguments(p)
    p.add_argument("command", metavar="COMMAND", help="a guest-* command, e.g. guest-ping")
    p.add_argument("arguments", nargs="?", metavar="JSON-ARGS", help="its arguments as a JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")

    p = command(
        "bench",
        "measure each strategy's write, delete and rollback costs on this machine",
        "vmsnap bench --quick --out benchmarks/results",
        cmd_bench,
    )
    p.add_argument("--quick", action="store_true", help="smaller images, fewer sizes (about 1-2 minutes)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where results go")
    p.add_argument(
        "--throughput",
        action="store_true",
        help="also measure backup/incremental/restore throughput against qemu-img convert and cp",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also measure virtnbdbackup (needs libvirt; implies --throughput)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command(
        "guest",
        "guest-side set-up (run inside the guest, or on its mounted root)",
        "vmsnap guest install-hooks --root /",
        _not_built_yet("guest"),
    )
    guest_sub = p.add_subparsers(dest="guest_command", metavar="GUEST-COMMAND", required=True)
    p = guest_sub.add_parser(
        "install-hooks",
        help="install the fsfreeze-hook dispatcher and the database lock hook",
        description="Write /etc/qemu/fsfreeze-hook and /etc/qemu/fsfreeze-hook.d/50-vmsnap-dblock under "
        "--root (mode 0755). The database hook does nothing until /etc/vmsnap/dblock.cnf exists.",
        epilog="example:\n  vmsnap guest install-hooks --root /",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_guest_install_hooks)
    p.add_argument("--root", type=Path, required=True, help="the guest's root directory (/ inside it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    _add_repository_commands(command)

    p = command(
        "demo",
        "boot the built-in tiny VM, back it up (frozen), change it, restore, and prove the restore is exact",
        "vmsnap demo --workdir /tmp/vmsnap-demo --keep",
        cmd_demo,
    )
    p.add_argument(
        "--workdir", type=Path, help="where the VM, repository and restore go (default: a temp dir)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    _add_snapshot_command(command)
    return parser


# -- vmsnap snapshot ------------------------------------------------------------------------------------


def _snapshot_options(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The strategy options the user set, checked against what the strategy's constructor takes."""
    import inspect

    given = {
        "vm_state": (args.vm_state, "--vm-state"),
        "drop_bitmaps": (args.drop_bitmaps, "--drop-bitmaps"),
        "merge": (args.merge, "--merge"),
    }
    accepted = inspect.signature(cls).parameters
    options: dict[str, Any] = {}
    for key, (value, flag) in given.items():
        if value in (None, False):
            continue
        if key not in accepted:
            raise UsageError(f"strategy {cls.name!r} does not take {flag}", hint="see docs/strategies.md")
        options[key] = value
    return options


def _snapshot_json(ref: Any) -> dict[str, Any]:
    return {
        "disk": ref.disk.name,
        "name": ref.name,
        "file": str(ref.disk.file),
        "location": ref.location,
        "details": dict(ref.details),
    }


def cmd_snapshot(args: argparse.Namespace) -> int:
    """create | list | delete | rollback snapshots of one VM with one strategy."""
    import time
    import warnings

    from vmsnap.model import validate_name
    from vmsnap.strategies import strategy_class
    from vmsnap.vm.machine import find_disk

    cls = strategy_class(args.strategy)
    options = _snapshot_options(args, cls)
    if args.action in ("delete", "rollback") and not args.snapshot_name:
        raise UsageError(f"snapshot {args.action} needs --snapshot NAME", hint="see `vmsnap snapshot list`")
    name = args.snapshot_name or time.strftime("snap-%Y%m%dT%H%M%SZ", time.gmtime())
    validate_name(name, "snapshot name")
    machine = vm_selector(args).open()
    try:
        strategy = cls(machine, **options)
        payload: dict[str, Any] = {"vm": machine.name, "strategy": cls.name, "action": args.action}
        if args.action == "list":
            refs = [r for r in strategy.list() if not args.disk or r.disk.name in args.disk]
            payload["snapshots"] = [_snapshot_json(r) for r in refs]
            rows = [[r.disk.name, r.name, r.location] for r in refs]
            human = render_table(["disk", "snapshot", "location"], rows) if rows else "no snapshots"
            emit(args, payload, human)
            return 0
        if args.action == "create":
            disks = machine.disks()
            if args.disk:
                disks = [find_disk(disks, d) for d in args.disk]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                refs = list(strategy.create(disks, name=name))
            for warning in caught:
                _note(f"warning: {warning.message}")
            payload["warnings"] = [str(w.message) for w in caught]
            paused = getattr(strategy, "last_pause_ms", None)
            if paused is not None:
                payload["paused_ms"] = round(float(paused), 3)
            payload["snapshots"] = [_snapshot_json(r) for r in refs]
            human = f"created {cls.name} snapshot {name!r} of " + ", ".join(r.disk.name for r in refs)
            if paused is not None:
                human += f" (VM paused {paused:.0f} ms)"
            emit(args, payload, human)
            return 0
        refs = [r for r in strategy.list() if r.name == name and (not args.disk or r.disk.name in args.disk)]
        if not refs:
            from vmsnap.errors import NotFoundError

            raise NotFoundError(
                f"{machine.name} has no {cls.name} snapshot {name!r}",
                hint=f"list them with `vmsnap snapshot list --strategy {cls.name}`",
            )
        with_ram = [r for r in refs if r.details.get("vm_state_size", "0") not in ("", "0")]
        if args.action == "rollback" and machine.is_running and with_ram:
            strategy.rollback(with_ram[0])  # loading a snapshot with VM state reverts every disk at once
        else:
            for ref in refs:
                if args.action == "delete":
                    strategy.delete(ref)
                else:
                    strategy.rollback(ref)
        payload["snapshots"] = [_snapshot_json(r) for r in refs]
        verb = "deleted" if args.action == "delete" else "rolled back to"
        emit(args, payload, f"{verb} {cls.name} snapshot {name!r} on " + ", ".join(r.disk.name for r in refs))
        return 0
    finally:
        machine.close()


def _add_snapshot_command(
    command: Callable[[str, str, str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser],
) -> None:
    """Parser section of ``vmsnap snapshot``."""
    p = command(
        "snapshot",
        "create, list, delete or roll back snapshots of a VM with one strategy",
        "vmsnap snapshot create --image disk0.qcow2 --strategy internal --snapshot before-upgrade",
        cmd_snapshot,
    )
    p.add_argument("action", choices=("create", "list", "delete", "rollback"), help="what to do")
    add_vm_arguments(p)
    p.add_argument("--strategy", required=True, help="internal|external|backup|lvm|btrfs (vmsnap strategies)")
    p.add_argument(
        "--snapshot",
        dest="snapshot_name",
        metavar="SNAP",
        help="the snapshot's name (create: default snap-<UTC time>)",
    )
    p.add_argument("--disk", action="append", default=[], metavar="NAME", help="only this disk (repeat)")
    p.add_argument("--vm-state", action="store_true", help="internal: also save the VM's RAM (VM pauses)")
    p.add_argument(
        "--drop-bitmaps",
        action="store_true",
        help="internal rollback: remove dirty bitmaps first (the next backup is full)",
    )
    p.add_argument(
        "--merge", choices=("auto", "commit", "stream"), help="external delete: how to merge (default auto)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsnap`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except VmsnapError as err:
        if debug:
            traceback.print_exc()
        print(f"vmsnap: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the library wraps what it expects; this is the net for the rest (disk full …)
        if debug:
            traceback.print_exc()
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"vmsnap: error: {err.strerror or err}{where} — nothing was lost; fix that and retry",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("vmsnap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
