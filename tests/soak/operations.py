"""The soak's operations: each runs one ``vmsnap`` command (two for a gc beside a backup), maybe killed
(``kill -9``) or disturbed by an S3 restart at a random moment, then checks how it ended and what the
repositories list against the model.

A command that fails is a problem unless something the soak did explains it: a kill, an S3 restart during
a command that uses S3, a gc and a backup of the same repository refusing each other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.soak.model import Content, differing_chunks
from tests.soak.world import VM_NAME, Outcome, sha256_file

if TYPE_CHECKING:
    from tests.soak.soak import Repo, Soak

GC_BESIDE_BACKUP = 0.2
"""How often a backup gets a gc of the same repository started beside it."""
RECOVER_AT_ONCE = 0.5
"""How often a killed backup is followed by ``recover`` at once (else the next backup recovers it)."""
BACKUP_STEPS = (
    "after-start",
    "fleecing-paused",
    "after-create",
    "mid-export",
    "chunks-before-sync",
    "after-export",
    "after-delete",
    "before-manifest",
    "after-manifest",
    "store-put-unnamed",
)
"""Named steps at which a backup may be made to kill itself (``store-put-unnamed``: local store only)."""
GC_STEPS = ("gc-locked", "gc-mid-sweep")
BUSY = ("are using the repository", "is collecting garbage", "holds locks/")
"""What a gc and a backup that meet say when they refuse each other."""


def _other(soak: Soak, repo: Repo) -> Repo:
    return next(r for r in soak.repos.values() if r is not repo)


def _expected(outcome: Outcome, repo_involved: bool, restarted: bool, busy: bool = False) -> bool:
    """Whether a command's failure is explained by what the soak did to it (one that breaks the CLI's
    contract never is)."""
    if outcome.ok:
        return True
    if not outcome.killed and contract_broken(outcome):
        return False
    if outcome.killed:
        return True
    if restarted and repo_involved:
        return True
    return busy and any(text in outcome.err for text in BUSY)


def contract_broken(outcome: Outcome) -> str | None:
    """How a failed command broke the CLI's contract (exit status 1, one ``vmsnap: error:`` line last, no
    traceback, one JSON object on stdout), or None."""
    if outcome.code != 1:
        return f"exit status {outcome.code}"
    if "Traceback" in outcome.err:
        return "a traceback on stderr"
    last = (outcome.err.strip().splitlines() or [""])[-1]
    if not last.startswith("vmsnap: error:"):
        return f"its last line is not an error line: {last!r}"
    try:
        json.loads(outcome.out)
    except ValueError:
        return f"stdout is not one JSON object: {outcome.out[:200]!r}"
    return None


def _describe(outcome: Outcome) -> str:
    if outcome.ok:
        return f"ok {outcome.seconds:.1f} s"
    if outcome.killed:
        return f"KILLED after {outcome.seconds:.1f} s"
    broken = contract_broken(outcome)
    return f"failed ({outcome.code}) after {outcome.seconds:.1f} s: {outcome.error_line}" + (
        f" [CLI contract broken: {broken}]" if broken else ""
    )


# ------------------------------------------------------------------------------------------------ backup


def backup(soak: Soak, repo: Repo | None = None) -> None:
    """A full or incremental backup with a random strategy into ``repo`` (default: a random one), sometimes
    with a gc of that repository started beside it."""
    rng = soak.rng
    repo = repo or rng.choice(list(soak.repos.values()))
    other = _other(soak, repo)
    for attempt in range(3):  # a dead run of the other repository's backup is undone first
        if not other.pending_recover:
            break
        recover(soak, other, kill=attempt < 2)
    strategy = rng.choices(("backup", "external", "internal"), (76, 12, 12))[0]
    incremental = strategy == "backup" and rng.random() < 0.8
    content = soak.disks.content()
    argv = ["backup", "--repo", repo.location, "--qmp", str(soak.vm.qmp_socket), "--strategy", strategy]
    argv += ["--bitmap", repo.bitmap, *repo.key_args(), "--json"]
    if incremental:
        argv.append("--incremental")
    beside = rng.random() < GC_BESIDE_BACKUP
    gc_wait = rng.choice(("0", "30"))
    gc_delay = rng.uniform(0.0, soak.durations["backup"])
    soak.plan_restart("backup")
    crash_at = soak.plan_crash(BACKUP_STEPS)
    command = soak.start("backup", argv, crash_at)
    timer = soak.plan_kill("backup", command) if crash_at is None else None
    gc_command = None
    if beside:
        time.sleep(gc_delay)
        gc_command = soak.start(
            "gc", ["gc", "--repo", repo.location, "--wait", gc_wait, *repo.key_args(), "--json"]
        )
    outcome = soak.finish("backup", command, timer)
    gc_outcome = soak.finish("gc", gc_command, None) if gc_command is not None else None
    restarted = soak.restarted()
    mode = f"{strategy}{' incremental' if incremental else ''}{f' (kill at {crash_at})' if crash_at else ''}"
    soak.say(f"{outcome.number} backup {repo.name} {mode}: {_describe(outcome)}")
    if gc_outcome is not None:
        soak.say(
            f"   gc {repo.name} beside it (--wait {gc_wait}): "
            f"{_describe(gc_outcome)}{_freed(soak, gc_outcome)}"
        )
        if not _expected(gc_outcome, repo.name == "s3", restarted, busy=True):
            soak.problem(f"gc beside a backup of {repo.name} failed: {_describe(gc_outcome)}")
        elif not gc_outcome.ok and not gc_outcome.killed:
            soak.stats.notes["gc refused beside a backup"] += 1
    if outcome.ok:
        data = outcome.json()
        backup_id = str(data["backup_id"])
        soak.stats.notes[f"backup {data['kind']}"] += 1
        if incremental and data["kind"] == "full":
            soak.stats.notes["incremental asked, full taken"] += 1
        repo.pending_recover = False
        soak.reconcile(repo, f"backup {backup_id}", new={backup_id: content}, must_appear=[backup_id])
        if soak.rng.random() < 0.3:
            soak.check_vm(f"after backup {backup_id} into {repo.name}")
        return
    repo.pending_recover = True
    if not _expected(outcome, repo.name == "s3", restarted, busy=beside):
        soak.problem(f"backup into {repo.name} ({mode}) failed: {_describe(outcome)}")
    elif not outcome.killed and beside:
        soak.stats.notes["backup refused beside a gc"] += 1
    adopted = soak.reconcile(repo, "a backup that did not finish", may_appear_one=content)
    if not adopted and repo.name == "s3":
        repo.lingering = content  # its manifest put may still land
    if outcome.killed and rng.random() < RECOVER_AT_ONCE:
        recover(soak, repo)


# ------------------------------------------------------------------------------------------------ recover


def recover_argv(soak: Soak, repo: Repo) -> list[str]:
    return ["recover", "--qmp", str(soak.vm.qmp_socket), "--repo", repo.location, *repo.key_args(), "--json"]


def recover(soak: Soak, repo: Repo | None = None, *, kill: bool = True) -> None:
    """``vmsnap recover`` of the VM and a repository (maybe killed itself); after it, with no dead run left
    anywhere, the VM must be as it was before the soak, with everything written to it."""
    repo = repo or soak.rng.choice(list(soak.repos.values()))
    if kill:
        soak.plan_restart("recover")
    command = soak.start("recover", recover_argv(soak, repo))
    timer = soak.plan_kill("recover", command, 0.15 if kill else 0.0)
    outcome = soak.finish("recover", command, timer)
    restarted = soak.restarted()
    actions = ""
    if outcome.ok:
        done = outcome.json().get("actions", [])
        actions = f" ({len(done)} action(s))" if done else " (clean)"
    soak.say(f"{outcome.number} recover {repo.name}: {_describe(outcome)}{actions}")
    if outcome.ok:
        repo.pending_recover = False
        soak.reconcile(repo, "recover")
        soak.check_vm(f"after recover of {repo.name}")
        return
    if not _expected(outcome, repo.name == "s3", restarted):
        soak.problem(f"recover of {repo.name} failed: {_describe(outcome)}")
    soak.reconcile(repo, "a recover that did not finish")


# ------------------------------------------------------------------------------------------------ prune


def _policy(soak: Soak) -> list[str]:
    rng = soak.rng
    choice = rng.random()
    if choice < 0.6:
        return ["--keep-last", str(rng.randint(1, 6))]
    if choice < 0.8:
        return ["--keep-last", str(rng.randint(0, 3)), "--keep-hourly", str(rng.randint(1, 3))]
    return ["--keep-daily", str(rng.randint(1, 2)), "--keep-last", str(rng.randint(1, 4))]


def prune(soak: Soak) -> None:
    """``prune --dry-run`` with a random policy, then the prune itself (maybe killed): it removes exactly
    what the dry run named (all of it, or some of it when it did not finish), and keep-last N keeps the
    newest N."""
    repo = soak.rng.choice(list(soak.repos.values()))
    policy = _policy(soak)
    if not repo.model.backups:
        soak.stats.notes["prune skipped (no backups)"] += 1
        return
    base = ["prune", "--repo", repo.location, "--vm", VM_NAME, *policy, *repo.key_args(), "--json"]
    dry = soak.run_plain("prune", [*base, "--dry-run"])
    if not dry.ok:
        soak.problem(f"prune --dry-run of {repo.name} failed: {_describe(dry)}")
        return
    candidates = [str(b) for b in dry.json()["pruned"][0]["removed"]]
    if policy[0] == "--keep-last" and len(policy) == 2:
        listed = soak.listed(repo)
        keep = int(policy[1])
        if sorted(candidates) != sorted(listed[:-keep]):
            soak.problem(
                f"prune {' '.join(policy)} of {repo.name} would remove {candidates}, not all but the newest "
                f"{keep} of {listed}"
            )
    soak.plan_restart("prune")
    command = soak.start("prune", base)
    timer = soak.plan_kill("prune", command)
    outcome = soak.finish("prune", command, timer)
    restarted = soak.restarted()
    soak.say(
        f"{outcome.number} prune {repo.name} {' '.join(policy)} ({len(candidates)} to go): "
        f"{_describe(outcome)}"
    )
    if outcome.ok:
        removed = [str(b) for b in outcome.json()["pruned"][0]["removed"]]
        if sorted(removed) != sorted(candidates):
            soak.problem(f"prune of {repo.name} removed {removed}; its dry run said {candidates}")
        soak.reconcile(repo, "prune", must_vanish=removed, may_vanish=candidates)
        return
    if not _expected(outcome, repo.name == "s3", restarted):
        soak.problem(f"prune of {repo.name} failed: {_describe(outcome)}")
    before = set(repo.model.backups)
    soak.reconcile(repo, "a prune that did not finish", may_vanish=candidates)
    if repo.name == "s3":
        repo.lingering_vanish = frozenset(set(candidates) & before & set(repo.model.backups))


# ------------------------------------------------------------------------------------------------ gc


def gc(soak: Soak) -> None:
    """``gc`` (sometimes ``--dry-run``) alone; it removes no backup."""
    rng = soak.rng
    repo = rng.choice(list(soak.repos.values()))
    argv = ["gc", "--repo", repo.location, *repo.key_args(), "--json"]
    if rng.random() < 0.15:
        argv.append("--dry-run")
    soak.plan_restart("gc")
    crash_at = soak.plan_crash(GC_STEPS)
    command = soak.start("gc", argv, crash_at)
    timer = soak.plan_kill("gc", command) if crash_at is None else None
    outcome = soak.finish("gc", command, timer)
    restarted = soak.restarted()
    freed = _freed(soak, outcome, dry_run="--dry-run" in argv)
    soak.say(
        f"{outcome.number} gc {repo.name}{' --dry-run' if '--dry-run' in argv else ''}"
        f"{f' (kill at {crash_at})' if crash_at else ''}: "
        f"{_describe(outcome)}{freed}"
    )
    if not _expected(outcome, repo.name == "s3", restarted):
        soak.problem(f"gc of {repo.name} failed: {_describe(outcome)}")
    soak.reconcile(repo, "gc")


def _freed(soak: Soak, outcome: Outcome, *, dry_run: bool = False) -> str:
    if not outcome.ok:
        return ""
    data = outcome.json()
    if not dry_run:
        soak.stats.notes["chunks freed by gc"] += int(data.get("chunks_freed") or 0)
        soak.stats.notes["partial backups removed by gc"] += len(data.get("partial_backups") or [])
    verb = "would free" if dry_run else "freed"
    return f" ({verb} {data.get('chunks_freed')} chunk(s), {data.get('chunks_kept')} kept)"


# ------------------------------------------------------------------------------------------------ copy


def copy(soak: Soak) -> None:
    """``copy`` of the VM's backups (or one of them) from one repository to the other."""
    rng = soak.rng
    source = rng.choice(list(soak.repos.values()))
    target = _other(soak, source)
    one = rng.random() < 0.25
    if not source.model.backups:
        soak.stats.notes["copy skipped (no backups)"] += 1
        return
    argv = ["copy", "--from", source.location, "--to", target.location, "--vm", VM_NAME, "--json"]
    if one:
        argv += ["--backup", rng.choice(sorted(source.model.backups))]
    argv += source.key_args()
    if target.key_file is not None and target.key_file != source.key_file:
        argv += target.key_args("--to-key-file")
    offered = dict(source.model.backups)
    soak.plan_restart("copy")
    command = soak.start("copy", argv)
    timer = soak.plan_kill("copy", command)
    outcome = soak.finish("copy", command, timer)
    restarted = soak.restarted()
    copied: list[str] = []
    if outcome.ok:
        copied = [str(b["backup_id"]) for b in outcome.json()["backups"] if b.get("copied")]
    soak.say(
        f"{outcome.number} copy {source.name} -> {target.name}{' one backup' if one else ''}: "
        f"{_describe(outcome)}{f' ({len(copied)} copied)' if outcome.ok else ''}"
    )
    for backup_id in copied:
        if backup_id not in offered:
            soak.problem(f"copy {source.name} -> {target.name} copied {backup_id}, which the source lacks")
    if not _expected(outcome, True, restarted):
        soak.problem(f"copy {source.name} -> {target.name} failed: {_describe(outcome)}")
    soak.reconcile(source, "copy (its source)")
    soak.reconcile(target, "copy", new=offered, must_appear=copied)
    if not outcome.ok and target.name == "s3":  # its last manifest put may still land
        target.lingering_new = {k: v for k, v in offered.items() if k not in target.model.backups}


# ------------------------------------------------------------------------------------------------ verify


def verify_problems(outcome: Outcome) -> str:
    """What a failed verify found (its problems), or its error line."""
    try:
        data: Any = json.loads(outcome.out)
    except ValueError:
        return outcome.error_line
    problems = data.get("problems") if isinstance(data, dict) else None
    if problems:
        return "; ".join(str(p) for p in problems[:5])
    return outcome.error_line


def verify(soak: Soak) -> None:
    """``verify`` of a repository (whole, ``--fast``, or one backup): it must pass unless disturbed, and
    must never report damage because the S3 server went away."""
    rng = soak.rng
    repo = rng.choice(list(soak.repos.values()))
    argv = ["verify", "--repo", repo.location, *repo.key_args(), "--json"]
    mode = rng.random()
    if mode < 0.3:
        argv.append("--fast")
    elif mode < 0.5 and repo.model.backups:
        argv += ["--vm", VM_NAME, "--backup", rng.choice(sorted(repo.model.backups))]
    soak.plan_restart("verify")
    command = soak.start("verify", argv)
    timer = soak.plan_kill("verify", command)
    outcome = soak.finish("verify", command, timer)
    restarted = soak.restarted()
    soak.say(f"{outcome.number} verify {repo.name} {' '.join(argv[5:-1]) or '(all)'}: {_describe(outcome)}")
    if not outcome.ok and not outcome.killed:
        reported = _reported_problems(outcome)
        if reported or not _expected(outcome, repo.name == "s3", restarted):
            soak.problem(f"verify of {repo.name} failed: {verify_problems(outcome)}")
    soak.reconcile(repo, "verify")


def _reported_problems(outcome: Outcome) -> bool:
    try:
        data: Any = json.loads(outcome.out)
    except ValueError:
        return False
    return isinstance(data, dict) and bool(data.get("problems"))


# ------------------------------------------------------------------------------------------------ restore


def restore(soak: Soak) -> None:
    """A restore (maybe killed) of a backup not yet restored since it was adopted, else of a random one, as
    raw or qcow2 images, compared with what the disks held when it was taken."""
    rng = soak.rng
    candidates = [r for r in soak.repos.values() if r.model.backups]
    if not candidates:
        soak.stats.notes["restore skipped (no backups)"] += 1
        return
    repo = rng.choice(candidates)
    unchecked = repo.model.unchecked
    backup_id = unchecked[0] if unchecked else rng.choice(sorted(repo.model.backups))
    disk = rng.choice([None, None, None, *sorted(soak.disks.specs)])
    fmt = rng.choice(("raw", "raw", "qcow2"))
    restore_and_compare(soak, repo, backup_id, disk=disk, fmt=fmt)


def restore_and_compare(
    soak: Soak, repo: Repo, backup_id: str, *, disk: str | None = None, fmt: str = "raw", final: bool = False
) -> tuple[bool, int]:
    """Restore ``backup_id`` (``disk`` only, or all) as ``fmt`` images and compare each with the model;
    returns (every disk exact, bytes compared). The final restores are never killed or disturbed. A killed
    restore may leave only complete images under their own names."""
    content = repo.model.backups[backup_id]
    out = soak.scratch / f"restore-{soak.sequence + 1}"
    argv = ["restore", "--repo", repo.location, "--vm", VM_NAME, "--backup", backup_id, "--to", str(out)]
    argv += ["--format", fmt, *repo.key_args(), "--json"]
    if disk is not None:
        argv += ["--disk", disk]
    if final:
        outcome = soak.run_plain("restore", argv)
        restarted = False
    else:
        soak.plan_restart("restore")
        command = soak.start("restore", argv)
        timer = soak.plan_kill("restore", command)
        outcome = soak.finish("restore", command, timer)
        restarted = soak.restarted()
    what = f"{backup_id}{f' {disk}' if disk else ''} ({fmt})"
    try:
        if not outcome.ok:
            soak.say(f"{outcome.number} restore {repo.name} {what}: {_describe(outcome)}")
            if not _expected(outcome, repo.name == "s3", restarted):
                soak.problem(f"restore of {repo.name} {backup_id} failed: {_describe(outcome)}")
            _left_by_a_dead_restore(soak, repo, backup_id, content, out, fmt, killed=outcome.killed)
            return False, 0
        restored = {str(d["name"]): Path(d["file"]) for d in outcome.json()["disks"]}
        wanted = [disk] if disk is not None else sorted(soak.disks.specs)
        if sorted(restored) != sorted(wanted):
            soak.problem(f"restore of {repo.name} {backup_id} gave disks {sorted(restored)}, not {wanted}")
            return False, 0
        exact, compared = True, 0
        for name in wanted:
            if _same(soak, repo, backup_id, name, content, restored[name], fmt):
                compared += soak.disks.specs[name].size
            else:
                exact = False
        if exact:
            soak.stats.restores_compared += 0 if final else 1
            soak.stats.bytes_compared += 0 if final else compared
            repo.model.checked[backup_id] = repo.model.checked.get(backup_id, 0) + 1
            if backup_id in repo.model.unchecked and disk is None:
                repo.model.unchecked.remove(backup_id)
        if not final or not exact:
            soak.say(
                f"{outcome.number} restore {repo.name} {what}: {_describe(outcome)}, "
                + ("exact" if exact else "DIFFERS")
            )
        return exact, compared
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _same(soak: Soak, repo: Repo, backup_id: str, disk: str, content: Content, image: Path, fmt: str) -> bool:
    """Whether a restored image holds what the disk held at the backup's instant (a mismatch is reported)."""
    raw = image
    if fmt == "qcow2":
        raw = image.with_suffix(".converted.raw")
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    if sha256_file(raw) == content.sha256[disk]:
        return True
    _mismatch(soak, repo, backup_id, disk, content, raw)
    return False


def _left_by_a_dead_restore(
    soak: Soak, repo: Repo, backup_id: str, content: Content, out: Path, fmt: str, *, killed: bool
) -> None:
    """What a restore that did not finish left in its target: images under their own names must be complete
    (they appear only then); temporary ones are counted."""
    if not out.is_dir():
        return
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            how = "killed" if killed else "failed"
            soak.stats.notes[f"temporary files left by a {how} restore"] += 1
            continue
        disk = path.name.rsplit(".", 1)[0]
        if disk in soak.disks.specs and path.suffix == f".{fmt}":
            soak.stats.notes["complete images left by a restore that did not finish"] += 1
            if not _same(soak, repo, backup_id, disk, content, path, fmt):
                soak.problem(
                    f"a restore of {repo.name} {backup_id} that did not finish left {path} incomplete"
                )


def _mismatch(soak: Soak, repo: Repo, backup_id: str, disk: str, content: Content, restored: Path) -> None:
    """Report a restored disk that differs from the model: which 4 MiB chunks differ (the disk replayed to
    the backup's instant), the restored image kept for a look."""
    expected = soak.disks.replay(content.version)[disk]
    chunks = differing_chunks(expected, str(restored))
    kept = soak.workdir / "mismatch" / f"{repo.name}-{backup_id}-{disk}.raw"
    kept.parent.mkdir(exist_ok=True)
    shutil.move(restored, kept)
    soak.problem(
        f"{repo.name} backup {backup_id} disk {disk} differs from the disk at its instant (after write "
        f"{content.version}): chunks {chunks} differ; kept at {kept}"
    )
