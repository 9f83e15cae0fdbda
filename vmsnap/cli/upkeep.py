"""The repository's upkeep: init, list, verify, prune, gc and copy."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import attrs

from vmsnap.backup.repair import repair
from vmsnap.cli import boot
from vmsnap.cli.boot import boot_cell
from vmsnap.cli.common import (
    Command,
    add_as_of_option,
    add_key_option,
    add_repo_option,
    add_vm_arguments,
    as_of_location,
    count,
    emit,
    finite_seconds,
    machine_spec,
    mib,
    note,
    opened_machine,
    render_table,
)
from vmsnap.cli.progress import disk_progress
from vmsnap.errors import ChainError, ChecksumMismatchError, RepositoryError, UsageError
from vmsnap.repo.copy import copy_backups
from vmsnap.repo.layout import RepositoryLayout, layout_class, layout_names
from vmsnap.repo.locking import LockPolicy
from vmsnap.repo.manifest import Damaged, Manifest
from vmsnap.repo.marker import COMPRESSIONS, DEFAULT_LAYOUT
from vmsnap.repo.reports import GcReport, VerifyProblem, VerifyReport
from vmsnap.repo.repository import Repository, key_file_path
from vmsnap.repo.retention import RetentionPolicy
from vmsnap.repo.verify_records import record_verification
from vmsnap.verify_boot.result import BootResult, latest_boot

KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

# -- init ---------------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Create a repository (chunks by default); with --encrypt, its key file too (0600) when missing."""
    key_file = key_file_path(args.key_file)  # --key-file, else $VMSNAP_KEY_FILE
    if args.encrypt and key_file is None:
        raise UsageError(
            "--encrypt needs --key-file FILE (or VMSNAP_KEY_FILE)",
            hint="the key is written there (0600) if missing",
        )
    lock = None
    if args.lock_days is not None:
        lock = LockPolicy.of(args.lock_days, args.lock_mode or "compliance", args.lock_extend_days)
    elif args.lock_mode is not None or args.lock_extend_days is not None:
        raise UsageError("--lock-mode and --lock-extend-days need --lock-days N", hint="e.g. --lock-days 30")
    repo = Repository.init(
        args.repo,
        layout=args.layout,
        encrypt=args.encrypt,
        key_file=key_file,
        compression=args.compression,
        chunk_id=args.chunk_id,
        lock=lock,
    )
    human = f"created a {repo.name} repository at {repo.location}" + (
        f", encrypted with the key in {key_file}: keep a copy of it elsewhere — without it the backups "
        "cannot be read"
        if args.encrypt
        else ""
    )
    if lock is not None:
        human += (
            f"; locked ({lock.describe()}): what a backup writes cannot be deleted or overwritten for "
            f"{lock.days:g} day(s), chunks for {lock.days + lock.extend_days:g}"
        )
    payload: dict[str, Any] = {
        "repo": str(repo.location),
        "layout": repo.name,
        "encrypted": bool(args.encrypt),
    }
    if lock is not None:
        payload["lock"] = lock.to_json()
    if args.encrypt:
        payload["key_file"] = str(key_file)
    emit(args, payload, human)
    return 0


def _chunk_ids() -> list[str]:
    """The chunk id hashes of every registered layout that has some (``--chunk-id``'s choices)."""
    return list(dict.fromkeys(h for n in layout_names() for h in layout_class(n).chunk_ids))


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument(
        "--layout",
        choices=layout_names(),
        default=DEFAULT_LAYOUT,
        help="chunks: deduplicated, compressed, optionally encrypted (default); qcow2: plain qcow2 chains",
    )
    parser.add_argument("--encrypt", action="store_true", help="encrypt (chunks only): AES-256-GCM")
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=COMPRESSIONS[0],
        help="chunk compression (default zstd)",
    )
    parser.add_argument(
        "--chunk-id",
        choices=_chunk_ids(),
        help="chunk id hash (chunks only): blake3 (default; ~4x faster than sha256 here) or sha256 "
        "(unencrypted: format 2, which vmsnap before format 3 can read; encrypted: format 4 either way)",
    )
    add_key_option(parser, what="with --encrypt: the key file, created 0600 when missing")
    parser.add_argument(
        "--lock-days",
        metavar="N",
        help="lock what every backup writes for N days (S3 Object Lock: nobody can delete or overwrite it, "
        "not even with the host's credentials); the bucket needs Object Lock",
    )
    parser.add_argument(
        "--lock-mode",
        metavar="MODE",
        help="compliance (default: nobody can lift a lock) or governance (an identity allowed to bypass "
        "locks can)",
    )
    parser.add_argument(
        "--lock-extend-days",
        metavar="M",
        help="chunks are locked M days longer, so a reused chunk's lock is extended at most every M days "
        "(default: N, at most 7)",
    )


# -- list ---------------------------------------------------------------------------------------------------


def _listed(manifest: Manifest, boot: BootResult | RepositoryError | None) -> dict[str, Any]:
    """A backup as ``list --json`` shows it: the manifest plus its cost (logical size, bytes newly stored,
    chunks reused) and its latest boot verification (``boot``: null when it was never booted;
    ``{"verdict": "damaged", "reason": …}`` when its record cannot be read)."""
    if isinstance(boot, RepositoryError):
        shown: dict[str, Any] | None = {"verdict": "damaged", "reason": boot.message}
    else:
        shown = boot.summary() if boot else None
    return {**manifest.to_json(), **manifest.summary(), "boot": shown}


def _latest_boot(repo: RepositoryLayout, manifest: Manifest) -> BootResult | RepositoryError | None:
    """A backup's latest boot verification, or the error that says its record is damaged (one damaged
    record does not hide the other backups)."""
    try:
        return latest_boot(repo, manifest)
    except RepositoryError as err:
        return err


def cmd_list(args: argparse.Namespace) -> int:
    """List the backups in --repo (of one VM with --vm), oldest first; exit 1 if a manifest is damaged."""
    repo = Repository.open(as_of_location(args.repo, args.as_of) or args.repo, key_file=args.key_file)
    damaged: list[Damaged] = []
    backups = repo.backups(args.vm, damaged=damaged)
    if args.vm is not None and not backups and not damaged:
        repo.get(args.vm)  # raises NotFoundError naming the VMs that exist
    rows = []
    boots = {m.backup_id: _latest_boot(repo, m) for m in backups}
    for m in backups:
        cost = m.summary()
        logical = cost["logical_size"]
        rows.append(
            [
                m.vm,
                m.backup_id,
                m.kind,
                m.strategy,
                m.created[:19],
                mib(logical) if logical is not None else "-",
                mib(m.size),
                str(cost["reused_chunks"] if cost["reused_chunks"] is not None else "-"),
                boot_cell(boots[m.backup_id]),
            ]
        )
    headings = ["vm", "backup", "kind", "strategy", "created", "data", "stored", "reused chunks", "boot"]
    human = render_table(headings, rows) if rows else f"no backups in {repo.location}"
    payload = {
        "backups": [_listed(m, boots[m.backup_id]) for m in backups],
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
    add_key_option(parser)
    add_as_of_option(parser)


# -- verify -------------------------------------------------------------------------------------------------


def _vm_given(args: argparse.Namespace) -> bool:
    return bool(args.qmp or args.domain or args.image)


def _check_repair_options(args: argparse.Namespace) -> None:
    """:raise UsageError: --from or a VM without --repair, or --repair with --boot or its options"""
    if (args.sources or _vm_given(args)) and not args.repair:
        raise UsageError("--from and a VM are sources for --repair", hint="add --repair")
    if args.repair:
        given = [f"--{o}" for o in ("boot", *boot.BOOT_OPTIONS) if getattr(args, o) not in (None, [], False)]
        if given:
            raise UsageError(
                f"--repair does not go with {', '.join(given)}", hint="verify --boot after the repair"
            )
    else:
        boot.check_boot_options(args)


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read backups and check every checksum, chunk and chain link (chunks: move damaged chunks aside;
    --repair: store them again from --from repositories and the VM); exit 1 while a backup is damaged.
    With ``--boot``: boot one backup and judge it (:mod:`vmsnap.cli.boot`)."""
    _check_repair_options(args)
    if args.as_of is not None and (args.boot or args.repair):
        raise UsageError(
            f"--as-of does not go with --{'boot' if args.boot else 'repair'}: a repository read as it was "
            "is read-only",
            hint="verify --as-of, then `vmsnap copy --as-of` it into a new bucket and boot or repair there",
        )
    if args.boot:
        return boot.cmd_verify_boot(args)
    backup_id = None
    repo = Repository.open(as_of_location(args.repo, args.as_of) or args.repo, key_file=args.key_file)
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(disk_progress(not args.json))
        if args.repair:
            machine = stack.enter_context(opened_machine(machine_spec(args))) if _vm_given(args) else None
            result = repair(
                repo,
                vm=args.vm,
                backup_id=args.backup,
                machine=machine,
                sources=args.sources,
                key_file=args.key_file,
                fast=args.fast,
                progress=progress,
                note=note,
            )
            report, backup_id = result.report, result.backup_id
        else:
            report = repo.verify(args.vm, args.backup, reader=args.reader, fast=args.fast, progress=progress)
    # kept beside each backup for vmsnap report, under a reader lease: prune cannot remove one beneath it
    # (not of a repository read as it was: that view is read-only)
    if args.as_of is None:
        with repo.reading(args.vm):
            for line in record_verification(repo, report, fast=args.fast):
                note(line)
    payload = {
        "ok": report.ok,
        "reader": report.reader,
        "checked": [{"vm": vm, "backup_id": backup_id} for vm, backup_id in report.checked],
        "problems": [attrs.asdict(p) for p in report.problems],
        "chunks": [{**attrs.asdict(c), "still_damaged": list(c.still_damaged)} for c in report.chunks],
        "still_damaged": list(report.still_damaged),
        "repair_backup": backup_id,
    }
    human = [f"verified {len(report.checked)} backup(s) with the {report.reader} reader"]
    human += [f"  PROBLEM {p}" for p in report.problems]
    human += [f"  {c}" for c in report.chunks]
    if backup_id is not None:
        human.append(f"  took backup {backup_id} to read the moved-aside chunks again from the VM")
    if report.ok:
        human.append("  all checksums, chunks and chain links are good")
    elif not report.still_damaged:
        human.append("  every damaged chunk was stored again: every backup restores")
    emit(args, payload, "\n".join(human))
    if report.still_damaged:
        first = next((p for p in report.problems if not _healed(p, report)), report.problems[0])
        error = (
            ChainError if "chain" in first.message or "backing" in first.message else ChecksumMismatchError
        )
        raise error(
            f"verify found {len(report.problems)} problem(s), {len(report.still_damaged)} backup disk(s) "
            f"still damaged; first: {first}",
            hint=_verify_hint(report, read_vm=backup_id is not None),
        )
    return 0


def _verify_hint(report: VerifyReport, *, read_vm: bool) -> str:
    """What to do about what verify left damaged (true for what it did)."""
    waiting = [c for c in report.chunks if not c.healed]
    if waiting and read_vm:
        return (
            "the VM's disks (and the copies given) no longer hold the data of the chunks still damaged: "
            "restore from a backup that verifies"
        )
    unhealed = {c.chunk for c in waiting}
    if waiting and all(
        any(chunk in p.message for chunk in unhealed) for p in report.problems if not _healed(p, report)
    ):
        vms = " and ".join(sorted({b.split("/")[0] for c in waiting for b in c.backups})) or "the VM"
        return (
            f"verify set the damaged or missing chunks aside: the next backup of {vms} stores them again "
            "if its disks still hold that data (`vmsnap verify --repair` with the VM, or --from an off-site "
            "copy, tries at once); meanwhile restore from a backup that verifies"
        )
    return "restore from a backup that verifies, and take a new full backup"


def _healed(problem: VerifyProblem, report: VerifyReport) -> bool:
    """The problem is about a chunk that was stored again."""
    return any(c.healed and c.chunk in problem.message for c in report.chunks)


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _list_arguments(parser)
    parser.add_argument("--backup", metavar="ID", help="only this backup (with --vm)")
    parser.add_argument(
        "--reader",
        choices=("auto", "qemu", "libqcow"),
        default="auto",
        help="qcow2 layout: read images with qemu or with libqcow, independent of QEMU (auto: libqcow when "
        "installed)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="chunks layout: only check that every chunk exists (one listing)"
    )
    boot.add_boot_arguments(parser)
    parser.add_argument(
        "--repair",
        action="store_true",
        help="chunks layout: store the chunks found damaged or missing again at once, from the --from "
        "repositories and from the VM named below (a backup of it)",
    )
    parser.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="REPO",
        help="with --repair: a chunks repository holding copies of the backups (an off-site copy; repeat)",
    )
    add_vm_arguments(parser, connect=False)  # (--boot's --connect names the domain's libvirt too)


# -- prune and gc -------------------------------------------------------------------------------------------


def _policy(args: argparse.Namespace) -> RetentionPolicy:
    """The retention policy of the --keep-* options.

    :raise UsageError: none given, or one that keeps nothing
    """
    given = {f"keep_{rule}": getattr(args, f"keep_{rule}") for rule in KEEP_RULES}
    if all(v is None for v in given.values()):
        raise UsageError(
            "prune needs at least one --keep-* option",
            hint="e.g. --keep-daily 7 --keep-weekly 4 (borg's rules; --dry-run shows what would go)",
        )
    if not any(v for v in given.values()):
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None)
        raise UsageError(f"{options} keeps no backup at all", hint="keep at least one, e.g. --keep-last 1")
    return RetentionPolicy(**given)


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove the backups the --keep-* rules do not keep (qcow2 layout: never a parent a kept one needs)."""
    policy = _policy(args)
    repo = Repository.open(args.repo, key_file=args.key_file)
    vms = [args.vm] if args.vm else repo.vms()
    results = [repo.prune(vm, policy, dry_run=args.dry_run) for vm in vms]
    verb = "would remove" if args.dry_run else "removed"
    human = [
        f"{r.vm}: {verb} {len(r.removed)}, kept {len(r.kept)}"
        + (f" (+{len(r.needed)} parent(s) they need)" if r.needed else "")
        + (f", {len(r.locked)} still locked" if r.locked else "")
        + "".join(f"\n  keep {b}  ({r.reasons.get(b, '')})" for b in r.kept)
        + "".join(f"\n  {verb} {b}" for b in r.removed)
        + "".join(f"\n  locked {b}: removable from {until}" for b, until in sorted(r.locked.items()))
        for r in results
    ]
    payload = {"dry_run": args.dry_run, "pruned": [attrs.asdict(r) for r in results]}
    if not args.dry_run and repo.collects:
        human.append("the data only these backups used is freed by `vmsnap gc`")
    emit(args, payload, "\n".join(human) or f"no backups in {repo.location}")
    return 0


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument("--vm", metavar="NAME", help="only this VM (default: every VM)")
    for rule in KEEP_RULES:
        what = "backups" if rule == "last" else f"{rule} backups (the newest of each)"
        parser.add_argument(f"--keep-{rule}", type=count, metavar="N", help=f"keep the newest N {what}")
    parser.add_argument("--dry-run", action="store_true", help="say what would go and why, remove nothing")
    add_key_option(parser)


def cmd_gc(args: argparse.Namespace) -> int:
    """Delete chunks that no backup's index names (safe while backups run: it waits or refuses)."""
    repo = Repository.open(args.repo, key_file=args.key_file)
    report = repo.gc(wait=args.wait, dry_run=args.dry_run)
    human = _gc_line(report, args.dry_run)
    emit(args, report.to_json(), human)
    return 0


def _gc_line(report: GcReport, dry_run: bool) -> str:
    """What gc did (or would do), in one line."""
    parts = [
        f"{'would free' if dry_run else 'freed'} {report.chunks_freed} chunk(s), {mib(report.bytes_freed)}; "
        f"{report.chunks_kept} in use"
    ]
    if report.partial_backups:
        parts.append(
            f"{'would remove' if dry_run else 'removed'} {len(report.partial_backups)} unfinished backup(s)"
        )
    if report.versions_freed:
        verb = "would delete" if dry_run else "deleted"
        parts.append(f"{verb} {report.versions_freed} object version(s) for good")
    if report.locked_versions:
        parts.append(
            f"{report.locked_versions} version(s) ({mib(report.locked_bytes)}) kept while locked, the first "
            f"until {report.next_unlock}"
        )
    return "; ".join(parts)


def _gc_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_option(parser)
    parser.add_argument(
        "--wait",
        type=finite_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for running backups and restores to end (default: refuse at once)",
    )
    parser.add_argument("--dry-run", action="store_true", help="count what would be freed, delete nothing")
    add_key_option(parser)


# -- copy ---------------------------------------------------------------------------------------------------


def cmd_copy(args: argparse.Namespace) -> int:
    """Copy backups between repositories of either layout, sending only the chunks the target lacks."""
    if args.backup is not None and args.vm is None:
        raise UsageError("--backup needs --vm", hint="name the VM whose backup to copy")
    source = Repository.open(
        as_of_location(args.from_repo, args.as_of) or args.from_repo, key_file=args.key_file
    )
    target = Repository.open(args.to_repo, create=True, key_file=args.to_key_file or args.key_file)
    with disk_progress(not args.json) as progress:
        report = copy_backups(source, target, vm=args.vm, backup_id=args.backup, progress=progress)
    copied = [b for b in report.backups if b.copied]
    human = [
        f"copied {len(copied)} backup(s) to {target.location} "
        f"({len(report.backups) - len(copied)} were there already), "
        f"sending {report.chunks_sent} chunk(s), {mib(report.bytes_sent)}"
    ]
    human += [f"  {b.vm}/{b.backup_id}" for b in copied]
    payload = {
        "backups": [attrs.asdict(b) for b in report.backups],
        "chunks_sent": report.chunks_sent,
        "bytes_sent": report.bytes_sent,
    }
    emit(args, payload, "\n".join(human))
    return 0


def _copy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="from_repo", required=True, metavar="REPO", help="the source repository"
    )
    parser.add_argument(
        "--to", dest="to_repo", required=True, metavar="REPO", help="the target (made when new or empty)"
    )
    parser.add_argument("--vm", metavar="NAME", help="only this VM")
    parser.add_argument("--backup", metavar="ID", help="only this backup (with --vm)")
    add_key_option(parser, what="key file of an encrypted source (and target, unless --to-key-file)")
    add_key_option(parser, flag="--to-key-file", what="key file of an encrypted target with another key")
    add_as_of_option(parser, what="the source (--from)")


COMMANDS = (
    Command(
        "init",
        "create a repository: chunks (deduplicated, compressed, optionally encrypted) or qcow2 chains",
        "vmsnap init --repo /backups --encrypt --key-file /etc/vmsnap/key",
        cmd_init,
        _init_arguments,
        more_examples=("vmsnap init --repo s3://locked-bucket/vmsnap --lock-days 30 --lock-mode compliance",),
    ),
    Command(
        "list",
        "list the backups in a repository, with what each stored",
        "vmsnap list --repo /backups --vm web1 --json",
        cmd_list,
        _list_arguments,
        more_examples=("vmsnap list --repo s3://bucket/vmsnap --as-of 2026-12-07T21:30:00Z",),
    ),
    Command(
        "verify",
        "re-read backups and check every checksum, chunk and chain link; set damaged chunks aside",
        "vmsnap verify --repo /backups --vm web1",
        cmd_verify,
        _verify_arguments,
        more_examples=(
            "vmsnap verify --boot --repo /backups --vm web1 --check 'systemctl is-system-running' --port 443",
        ),
    ),
    Command(
        "prune",
        "delete the backups that borg's --keep-* rules do not keep",
        "vmsnap prune --repo /backups --vm web1 --keep-daily 7 --keep-weekly 4 --dry-run",
        cmd_prune,
        _prune_arguments,
    ),
    Command(
        "gc",
        "delete the chunks no backup uses any more (after prune), safe while backups run",
        "vmsnap gc --repo /backups --wait 600",
        cmd_gc,
        _gc_arguments,
    ),
    Command(
        "copy",
        "copy backups to another repository (off-site), sending only what it lacks",
        "vmsnap copy --from /backups --to s3://offsite/vmsnap --vm web1",
        cmd_copy,
        _copy_arguments,
        more_examples=(
            "vmsnap copy --from s3://attacked/vmsnap --as-of 2026-12-07T21:30:00Z --to s3://fresh/vmsnap",
        ),
    ),
)
"""The upkeep commands, in the order ``vmsnap --help`` lists them."""
