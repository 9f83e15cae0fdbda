"""``python -m tests.soak.soak [--seconds N] [--seed N] [--workdir DIR] [--keep]`` (``make soak``): random
operations against a local and an S3 chunks repository (one of them encrypted) of a running QEMU, with
``kill -9`` of the running command and SeaweedFS restarts, then ``recover``, ``verify`` and a restore of
every backup that exists, compared byte for byte (sha256) with what the disks held at its snapshot instant.

Defaults come from ``SOAK_SECONDS`` (1200) and ``SOAK_SEED`` (random); the seed is printed first and in the
summary. The seed fixes the choices (operations, options, writes, kill and restart delays); where a kill
lands in the program's progress also depends on how fast the machine is at that moment. Exit status 0 when
every check held, 1 otherwise (the first problems are printed with the seed).

It lives in ``tests/`` (not ``vmsnap/benchmark/``) because it is a test that fails, not a measurement, and
it needs the test suite's SeaweedFS launcher (:mod:`tests.integration.s3.seaweed`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

from tests.soak import operations
from tests.soak.model import Content, Disks, DiskSpec, MiB, RepoModel
from tests.soak.world import (
    BUCKET,
    VM_NAME,
    Command,
    Outcome,
    S3Server,
    SoakVm,
    held_leases,
    stray_processes,
)
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.repository import Repository

DISKS = (DiskSpec("disk0", 64 * MiB, "virtio"), DiskSpec("disk1", 42 * MiB, "scsi"))
"""disk1 ends half-way through a chunk."""

KILL_PROBABILITY = 0.25
"""How often a command is killed (``kill -9``) a random time into it."""
CRASH_POINT_PROBABILITY = 0.1
"""How often a backup or gc is killed at a named step instead (of those its command reaches)."""
RESTART_PROBABILITY = 0.1
"""How often the S3 server is restarted a random time into a command."""
COMMAND_TIMEOUT = 600.0


@attrs.frozen
class SoakConfig:
    seconds: float
    """How long the random operations run (counted from the end of the set-up)."""
    seed: int
    workdir: Path
    keep: bool = False
    verbose: bool = True
    budget: float | None = None
    """When set, the whole run (set-up and final checks too) is to take about this long: the random
    operations stop earlier, when what the final checks will take (estimated from how long recover, verify
    and restores took so far) would run past it."""


@attrs.define
class Repo:
    """One repository of the soak and its model."""

    name: str
    location: str
    key_file: Path | None
    bitmap: str
    model: RepoModel
    pending_recover: bool = False
    """A backup of this repository was killed or failed: recover before backing up into the other one."""
    lingering: Content | None = None
    """A killed command's request may still land (S3): its backup may show up at the next look."""
    lingering_vanish: frozenset[str] = frozenset()
    lingering_new: dict[str, Content] = attrs.Factory(dict)

    def key_args(self, flag: str = "--key-file") -> list[str]:
        return [flag, str(self.key_file)] if self.key_file is not None else []


@attrs.define
class Stats:
    operations: collections.Counter[str] = attrs.Factory(collections.Counter)
    outcomes: collections.Counter[str] = attrs.Factory(collections.Counter)
    kills: collections.Counter[str] = attrs.Factory(collections.Counter)
    restarts: int = 0
    writes: int = 0
    restores_compared: int = 0
    bytes_compared: int = 0
    adopted: int = 0
    final_backups: dict[str, int] = attrs.Factory(dict)
    final_exact: int = 0
    final_bytes: int = 0
    random_seconds: float = 0.0
    notes: collections.Counter[str] = attrs.Factory(collections.Counter)


class SoakFailure(Exception):
    """A check failed: the soak stops its random operations and goes on to its final checks."""


class Soak:
    """The world, the model and the statistics of one soak run."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.writes_rng = random.Random(config.seed ^ 0x5EED)
        self.workdir = config.workdir
        self.logs = self.workdir / "logs"
        self.scratch = self.workdir / "scratch"
        self.state_dir = self.workdir / "state"
        for path in (self.logs, self.scratch, self.state_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.disks = Disks(DISKS)
        self.vm = SoakVm(self.workdir, DISKS)
        self.s3 = S3Server(self.workdir / "seaweed")
        self.stats = Stats()
        self.problems: list[str] = []
        self.sequence = 0
        self.started = time.monotonic()
        self.load_at_start = os.getloadavg()[0]
        self.commit = _commit()
        self.durations: dict[str, float] = collections.defaultdict(lambda: 4.0)
        self._restart: threading.Thread | None = None
        self._restart_error: BaseException | None = None
        encrypted = self.rng.choice(("local", "s3"))
        key = self.workdir / "repo.key"
        prefix = f"soak-{secrets.token_hex(4)}"
        self.repos = {
            "local": Repo(
                "local",
                str(self.workdir / "repo-local"),
                key if encrypted == "local" else None,
                "soak-local",
                RepoModel("local"),
            ),
            "s3": Repo(
                "s3",
                f"s3://{BUCKET}/{prefix}",
                key if encrypted == "s3" else None,
                "soak-s3",
                RepoModel("s3"),
            ),
        }

    # ------------------------------------------------------------------------------------------ set-up

    def env(self) -> dict[str, str]:
        env = self.s3.env()
        env["VMSNAP_STATE_DIR"] = str(self.state_dir)
        env["VMSNAP_RUN_DIR"] = str(self.workdir / "run")
        env.pop("VMSNAP_KEY_FILE", None)
        env.pop(CRASH_ENV, None)
        return env

    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.started:7.1f}s]"
        with open(self.workdir / "soak.log", "a") as log:
            log.write(f"{stamp} {line}\n")
        if self.config.verbose:
            print(f"{stamp} {line}", flush=True)

    def set_up(self) -> None:
        self.say(f"soak: seed {self.config.seed}, {self.config.seconds:g} s, workdir {self.workdir}")
        self.vm.start()
        self.s3.start()
        for repo in self.repos.values():
            argv = ["init", "--repo", repo.location, "--json"]
            if repo.key_file is not None:
                argv += ["--encrypt", *repo.key_args()]
            outcome = self.run_plain("init", argv)
            if not outcome.ok:
                raise SoakFailure(f"init of {repo.name} failed: {outcome.error_line}")
        encrypted = [r.name for r in self.repos.values() if r.key_file is not None]
        self.say(
            f"soak: repositories {self.repos['local'].location} and {self.repos['s3'].location} "
            f"({', '.join(encrypted)} encrypted); VM {VM_NAME} with "
            + ", ".join(f"{d.name} {d.size // MiB} MiB" for d in DISKS)
        )

    def tear_down(self) -> None:
        if self._restart is not None:
            self._restart.join()
        with contextlib.suppress(Exception):
            self.vm.stop()
        with contextlib.suppress(Exception):
            self.s3.stop()

    # ------------------------------------------------------------------------------------------ running

    def label(self, kind: str) -> str:
        self.sequence += 1
        return f"{self.sequence:05d}-{kind}"

    def run_plain(self, kind: str, argv: Sequence[str]) -> Outcome:
        """A command that is neither killed nor disturbed (set-up, the final checks)."""
        return Command(argv, self.env(), self.logs, self.label(kind)).wait(COMMAND_TIMEOUT)

    def start(self, kind: str, argv: Sequence[str], crash_at: str | None = None) -> Command:
        """Start ``vmsnap ARGV``; with ``crash_at`` it SIGKILLs itself at that named step."""
        env = self.env()
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
        return Command(argv, env, self.logs, self.label(kind))

    def plan_crash(self, points: Sequence[str]) -> str | None:
        """Maybe one of the named steps (:func:`vmsnap.processes.crash_point`) at which the command is to
        SIGKILL itself: the narrow windows a random delay rarely hits."""
        if self.rng.random() >= CRASH_POINT_PROBABILITY:
            return None
        point = self.rng.choice(points)
        self.stats.notes[f"kill at step {point}"] += 1
        return point

    def plan_kill(
        self, kind: str, command: Command, probability: float = KILL_PROBABILITY
    ) -> threading.Timer | None:
        """Maybe ``kill -9`` ``command`` after a random part of how long ``kind`` usually takes."""
        if self.rng.random() >= probability:
            return None
        delay = self.rng.uniform(0.2, 1.1) * self.durations[kind]
        timer = threading.Timer(delay, command.kill)
        timer.daemon = True
        timer.start()
        return timer

    def plan_restart(self, kind: str) -> None:
        """Maybe restart SeaweedFS (killed, or stopped with a short grace) a random time into ``kind``."""
        if self.rng.random() >= RESTART_PROBABILITY:
            return
        delay = self.rng.uniform(0.0, 1.2 * self.durations[kind])
        graceful = self.rng.random() < 0.3

        def restart() -> None:
            time.sleep(delay)
            try:
                away = self.s3.restart(graceful=graceful)
                self.say(
                    f"  S3 server {'stopped' if graceful else 'killed'} and restarted ({away:.1f} s away)"
                )
            except BaseException as err:  # reported by the loop
                self._restart_error = err

        self._restart = threading.Thread(target=restart, daemon=True)
        self._restart.start()

    def restarted(self) -> bool:
        """Wait for a planned S3 restart to end; True when there was one (it overlapped the operation)."""
        thread, self._restart = self._restart, None
        if thread is None:
            return False
        thread.join()
        self.stats.restarts += 1
        if self._restart_error is not None:
            error, self._restart_error = self._restart_error, None
            raise SoakFailure(f"the S3 server did not come back: {error}")
        return True

    def finish(self, kind: str, command: Command, timer: threading.Timer | None) -> Outcome:
        outcome = command.wait(COMMAND_TIMEOUT)
        if timer is not None:
            timer.cancel()
        self.stats.operations[kind] += 1
        if outcome.killed:
            self.stats.kills[kind] += 1
            self.stats.outcomes[f"{kind} killed"] += 1
        elif outcome.ok:
            self.stats.outcomes[f"{kind} ok"] += 1
            self.durations[kind] = 0.7 * self.durations[kind] + 0.3 * outcome.seconds
        else:
            self.stats.outcomes[f"{kind} failed"] += 1
        return outcome

    def problem(self, message: str) -> None:
        self.problems.append(message)
        self.say(f"  PROBLEM: {message}")

    # ------------------------------------------------------------------------------------------ looking

    @contextlib.contextmanager
    def library_env(self) -> Iterator[None]:
        """This process's environment pointed at the S3 server, for reading the repositories in-process."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env())
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def listed(self, repo: Repo) -> list[str]:
        """The backups ``vmsnap list`` would show (read in-process: oldest first)."""
        with self.library_env():
            opened = Repository.open(repo.location, key_file=repo.key_file)
            return [m.backup_id for m in opened.backups(VM_NAME)]

    def reconcile(
        self,
        repo: Repo,
        what: str,
        *,
        new: Mapping[str, Content] | None = None,
        must_appear: Sequence[str] = (),
        may_appear_one: Content | None = None,
        may_vanish: Sequence[str] = (),
        must_vanish: Sequence[str] = (),
    ) -> list[str]:
        """Compare ``repo``'s listing with the model after ``what``; problems fail the soak. Returns the
        backups adopted (sealed by a command that did not finish)."""
        lingering, repo.lingering = repo.lingering, None
        lingering_vanish, repo.lingering_vanish = repo.lingering_vanish, frozenset()
        lingering_new, repo.lingering_new = repo.lingering_new, {}
        result = repo.model.reconcile(
            self.listed(repo),
            new={**lingering_new, **(new or {})},
            must_appear=must_appear,
            may_appear_one=may_appear_one if may_appear_one is not None else lingering,
            may_vanish=[*may_vanish, *lingering_vanish],
            must_vanish=must_vanish,
        )
        for backup_id in result.adopted:
            self.stats.adopted += 1
            self.say(f"  {repo.name}: adopted {backup_id} (sealed although its command did not finish)")
        for message in result.problems:
            self.problem(f"after {what}: {message}")
        return result.adopted

    def check_vm(self, why: str) -> None:
        """With no dead run pending anywhere: the VM is on its own images with nothing left of a backup, and
        its disks hold what the soak wrote."""
        if any(r.pending_recover for r in self.repos.values()):
            return
        assert self.vm.pristine is not None
        bitmaps = [r.bitmap for r in self.repos.values()]
        for leftover in self.vm.block_state().leftovers(self.vm.pristine, bitmaps):
            self.problem(f"{why}: {leftover}")
        live = self.vm.live_sha256(self.scratch)
        expected = self.disks.content().sha256
        for disk, digest in live.items():
            if digest != expected[disk]:
                self.problem(f"{why}: the VM's {disk} does not hold what was written to it (writes lost)")

    # ------------------------------------------------------------------------------------------ the loop

    def loop(self) -> None:
        begun = time.monotonic()
        end = begun + self.config.seconds
        for repo in self.repos.values():  # something to restore, copy and prune from the start
            self.write()
            operations.backup(self, repo)
        while time.monotonic() < end and not self.problems and not self.out_of_budget():
            if self.rng.random() < 0.75:
                self.write()
            kind = self.rng.choices(
                ("backup", "restore", "prune", "gc", "copy", "verify", "recover"), (36, 16, 10, 12, 10, 10, 6)
            )[0]
            getattr(operations, kind)(self)
        self.stats.random_seconds = time.monotonic() - begun

    def out_of_budget(self) -> bool:
        """Whether the final checks, as long as they are likely to take, would end past the budget."""
        if self.config.budget is None:
            return False
        d = self.durations
        restores = sum(len(r.model.backups) for r in self.repos.values())
        final = 2 * (d["recover"] + d["verify"]) + restores * d["restore"] + 2.0
        return time.monotonic() + final > self.started + self.config.budget

    def write(self) -> None:
        writes = self.disks.random_writes(self.writes_rng)
        self.vm.write([(w, self.disks.apply(w)) for w in writes])
        self.stats.writes += len(writes)

    # ------------------------------------------------------------------------------------------ the end

    def final(self) -> None:
        """recover, verify, look for leftovers, restore every backup and compare."""
        self.say("soak: final checks")
        for repo in self.repos.values():
            outcome = self.run_plain("recover", operations.recover_argv(self, repo))
            if not outcome.ok:
                self.problem(f"final recover of {repo.name} failed: {outcome.error_line}")
            else:
                repo.pending_recover = False
            self.reconcile(repo, "the final recover")
        self.check_vm("after the final recover")
        for repo in self.repos.values():
            outcome = self.run_plain(
                "verify", ["verify", "--repo", repo.location, *repo.key_args(), "--json"]
            )
            if not outcome.ok:
                problems = operations.verify_problems(outcome)
                self.problem(f"final verify of {repo.name} failed: {problems}")
        self.check_leftovers()
        for repo in self.repos.values():
            ids = sorted(repo.model.backups)
            self.stats.final_backups[repo.name] = len(ids)
            for backup_id in ids:
                exact, compared = operations.restore_and_compare(self, repo, backup_id, final=True)
                if exact:
                    self.stats.final_exact += 1
                    self.stats.final_bytes += compared

    def check_leftovers(self) -> None:
        ours = [p for p in (self.vm.process.pid, self.s3.pid) if p is not None]
        for line in stray_processes(self.workdir, ours):
            self.problem(f"left running: {line}")
        repos = self.state_dir / "repos"
        for work in repos.glob("*/work/*/*"):
            self.problem(f"a work directory is left: {work}")
        with self.library_env():
            for repo in self.repos.values():
                opened = Repository.open(repo.location, key_file=repo.key_file)
                if opened.journal_path(VM_NAME).exists():
                    self.problem(f"{repo.name}: a journal is left: {opened.journal_path(VM_NAME)}")
                store = getattr(opened, "store", None)
                if store is None:
                    continue
                for line in held_leases(store):
                    self.problem(f"{repo.name}: {line}")

    # ------------------------------------------------------------------------------------------ summary

    def summary(self) -> str:
        s = self.stats
        ops = sum(s.operations.values())
        per_kind = ", ".join(f"{k} {n}" for k, n in sorted(s.operations.items()))
        outcomes = ", ".join(f"{k} {n}" for k, n in sorted(s.outcomes.items()))
        kills = ", ".join(f"{k} {n}" for k, n in sorted(s.kills.items())) or "none"
        final = sum(s.final_backups.values())
        lines = [
            f"soak summary (seed {self.config.seed}, {time.monotonic() - self.started:.0f} s, "
            f"{s.random_seconds:.0f} s of random operations; load average {self.load_at_start:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs; vmsnap {self.commit})",
            f"  operations done: {ops} ({per_kind})",
            f"  outcomes: {outcomes}",
            f"  kills survived: {sum(s.kills.values())} ({kills})",
            f"  S3 server restarts: {s.restarts}",
            f"  guest writes: {s.writes}",
            f"  backups adopted after a kill or failure: {s.adopted}",
            f"  restores compared during the run: {s.restores_compared}",
            f"  backups checked at the end: {final} "
            f"({', '.join(f'{k} {n}' for k, n in s.final_backups.items())}), "
            f"restored exactly: {s.final_exact}",
            f"  bytes compared: {s.bytes_compared + s.final_bytes} "
            f"({(s.bytes_compared + s.final_bytes) / MiB:.0f} MiB; {s.final_bytes / MiB:.0f} MiB at the end)",
        ]
        if s.notes:
            lines.append("  notes: " + ", ".join(f"{k} {n}" for k, n in sorted(s.notes.items())))
        if self.problems:
            lines.append(f"  FAILED with {len(self.problems)} problem(s) (seed {self.config.seed}):")
            lines += [f"    {p}" for p in self.problems[:20]]
        else:
            lines.append("  OK: every check held")
        return "\n".join(lines)


def _commit() -> str:
    """The commit of the checkout this soak runs from (``+`` when its files differ from it), or ``?``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return f"commit {head}{'+' if dirty else ''}"


def run(config: SoakConfig) -> tuple[bool, str]:
    """One soak; (every check held, the summary)."""
    soak = Soak(config)
    try:
        try:
            soak.set_up()
            soak.loop()
        except SoakFailure as err:
            soak.problem(str(err))
        try:
            soak.final()
        except SoakFailure as err:
            soak.problem(str(err))
    finally:
        soak.tear_down()
    summary = soak.summary()
    soak.say(summary)
    return not soak.problems, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "1200")))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new directory in $TMPDIR")
    parser.add_argument("--keep", action="store_true", help="keep the work directory also when all is well")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    seed = args.seed
    if seed is None:
        seed = int(os.environ["SOAK_SEED"]) if os.environ.get("SOAK_SEED") else secrets.randbits(32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmsnap-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ok, summary = run(SoakConfig(args.seconds, seed, workdir, args.keep, not args.quiet))
    if args.quiet:
        print(summary)
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"soak: the work directory (logs, repositories) is kept at {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
