"""Run a backup job: every VM backed up by ``concurrency`` worker threads (one VM failing stops no other),
retention applied to each VM after its successful backup, one report, the ``on_failure`` hook, the metrics.

The work on one VM goes through small injected functions, so the orchestrator behind them can change:

- :data:`BackupFn` ``(VmSpec) -> VmBackup`` takes one backup or raises;
- :class:`RetentionFn` ``(VmSpec, RetentionPolicy, *, dry_run) -> PruneResult`` prunes one VM (the
  repository's ``prune``; a dry run plans with :func:`apply_retention`, as if this run's backup existed);
- :data:`PredictFn` ``(VmSpec) -> Prediction`` says, for ``--dry-run``, whether the backup would be full or
  incremental (and may raise when the VM cannot be reached);
- :data:`GcFn` ``() -> GcReport`` collects the repository's garbage once after every VM (``gc = true``).

:mod:`vmsnap.jobs.default` provides them on the backup orchestrator and the repository. Exit status for the
CLI: 0 when every VM succeeded (and gc, when asked for, and the metrics), 1 otherwise.

Runs of one job never overlap: systemd does not start a oneshot service that is still running (a timer that
fires meanwhile is merged into the running start job), and a manual ``vmsnap run`` takes the job's lock
(``flock`` on a file in :func:`default_lock_dir`), failing at once with the holder's pid while another run
holds it. Backups of one VM are serialised by the repository's own per-VM lock as well.

The ``on_failure`` hook is an argv list (never a shell), run once per run when anything failed, with the
report as JSON on stdin and a summary in ``VMSNAP_*`` variables. Its environment is clean: ``PATH``,
``HOME``, ``LANG``/``LC_*``, ``TZ``, ``USER``, ``LOGNAME`` and the ``VMSNAP_*`` summary — no credential from
vmsnap's environment (S3 keys, a key file's path) reaches it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import attrs

from vmsnap.errors import VmsnapError
from vmsnap.jobs import metrics
from vmsnap.jobs.boot_policy import BootPolicy
from vmsnap.jobs.jobfile import EntryFailure, JobConfig, VmSpec
from vmsnap.jobs.report import (
    BootOutcome,
    HookResult,
    JobReport,
    Kind,
    VmOutcome,
    as_prune_result,
    error_line,
    prune_json,
)
from vmsnap.repo.reports import GcReport, PruneResult
from vmsnap.repo.retention import RetentionPlan, RetentionPolicy, keep_ancestors, plan
from vmsnap.runner import LocalRunner

__all__ = [
    "NEXT_BACKUP",
    "BackupFn",
    "BackupInfo",
    "GcFn",
    "HookResult",
    "JobReport",
    "PredictFn",
    "Prediction",
    "RetentionFn",
    "VmBackup",
    "VmOutcome",
    "apply_retention",
    "as_prune_result",
    "error_line",
    "hook_environment",
    "job_lock",
    "prune_json",
    "run_job",
]

NEXT_BACKUP = "(next backup)"
"""The id a ``--dry-run`` retention plan gives the backup the run would take."""
HOOK_TIMEOUT = 300.0
HOOK_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "USER", "LOGNAME")


@attrs.frozen
class VmBackup:
    """What a :data:`BackupFn` made.

    :param backup_id: the new backup's id
    :param kind: "full" or "incremental"
    :param bytes_written: bytes written to the repository
    :param seconds: how long the backup took
    :param freeze_ms: the guest's freeze window, None when it was not frozen
    :param notes: one-line remarks (fallbacks, recovered leftovers)
    """

    backup_id: str
    kind: Kind
    bytes_written: int
    seconds: float
    freeze_ms: float | None = None
    notes: tuple[str, ...] = ()


@attrs.frozen
class Prediction:
    """What ``--dry-run`` expects a VM's backup to be, and why."""

    kind: Kind
    reason: str = ""


BackupFn = Callable[[VmSpec], VmBackup]
"""Back up one VM; raise (a :class:`~vmsnap.errors.VmsnapError`, ideally) when it fails."""
PredictFn = Callable[[VmSpec], Prediction]
"""For ``--dry-run``: the kind of backup a VM would get; raise when it cannot be reached."""
GcFn = Callable[[], GcReport]
"""Collect the repository's garbage (after every VM of the run); raise when it cannot."""


class BootFn(Protocol):
    """Boot-verify one VM's newest backup as the job's policy says (see :mod:`vmsnap.jobs.boot_policy`)."""

    def __call__(self, spec: VmSpec, policy: BootPolicy) -> BootOutcome: ...


class RetentionFn(Protocol):
    """Apply (or, with ``dry_run``, only plan) a retention policy to one VM's backups."""

    def __call__(self, spec: VmSpec, policy: RetentionPolicy, *, dry_run: bool) -> PruneResult: ...


@attrs.frozen
class BackupInfo:
    """One existing backup, as retention needs it: id, start time (aware), parent (None: not chained)."""

    backup_id: str
    created: dt.datetime
    parent: str | None = None


def apply_retention(
    backups: Sequence[BackupInfo],
    policy: RetentionPolicy,
    remove: Callable[[str], None] | None,
    *,
    upcoming: dt.datetime | None = None,
    chains: bool = False,
    tz: dt.tzinfo | None = None,
) -> RetentionPlan:
    """Plan with :func:`vmsnap.repo.retention.plan` and remove what it drops, newest first (an incremental
    goes before its parent, so a run that dies half-way never leaves a broken chain behind).

    :param remove: removes one backup by id; None removes nothing (a dry run)
    :param upcoming: plan as if a backup started at this time existed (``--dry-run`` before a backup): it
        appears as :data:`NEXT_BACKUP`
    :param chains: keep the parents of kept backups (layouts with incremental chains)
    :raise VmsnapError: from ``remove``; what was removed before stays removed
    """
    pairs = [(b.backup_id, b.created) for b in backups]
    if upcoming is not None:
        pairs.append((NEXT_BACKUP, upcoming))
    result = plan(pairs, policy, tz=tz)
    if chains:
        result = keep_ancestors(result, {b.backup_id: b.parent for b in backups})
    if remove is not None:
        for backup_id in result.removed:
            remove(backup_id)
    return result


# -- one VM ---------------------------------------------------------------------------------------------


def _backup_and_boot(
    spec: VmSpec,
    backup: BackupFn,
    retention: RetentionFn | None,
    policy: RetentionPolicy | None,
    boot: BootFn | None,
    boot_policy: BootPolicy | None,
    clock: Callable[[], float],
) -> VmOutcome:
    """One VM's backup and retention, then (once it is backed up) its boot verification: a verification
    that fails or cannot run fails the VM's line."""
    outcome = _backup_one(spec, backup, retention, policy, clock)
    if boot is None or boot_policy is None or not outcome.backed_up:
        return outcome
    try:
        verified = boot(spec, boot_policy)
    except Exception as err:
        verified = BootOutcome("error", error_line(err), finished=clock())
    if verified.verdict in ("failed", "error"):
        what = "failed" if verified.verdict == "failed" else "could not run"
        return attrs.evolve(
            outcome, ok=False, boot=verified, error=f"boot verification {what}: {verified.detail}"
        )
    return attrs.evolve(outcome, boot=verified)


def _backup_one(
    spec: VmSpec,
    backup: BackupFn,
    retention: RetentionFn | None,
    policy: RetentionPolicy | None,
    clock: Callable[[], float],
) -> VmOutcome:
    started = clock()
    try:
        made = backup(spec)
    except Exception as err:  # one VM's failure is its own line; the others go on
        return VmOutcome(
            spec.name, spec.line, False, False, started, clock(), error=error_line(err), spec=spec
        )
    outcome = VmOutcome(
        spec.name,
        spec.line,
        True,
        True,
        started,
        clock(),
        kind=made.kind,
        backup_id=made.backup_id,
        bytes_written=made.bytes_written,
        seconds=made.seconds,
        freeze_ms=made.freeze_ms,
        notes=made.notes,
        spec=spec,
    )
    if retention is None or policy is None:
        return outcome
    try:
        kept = retention(spec, policy, dry_run=False)
    except Exception as err:
        message = error_line(err)
        return attrs.evolve(
            outcome, ok=False, finished=clock(), error=f"retention: {message}", retention_error=message
        )
    return attrs.evolve(outcome, finished=clock(), retention=kept)


def _predict_one(
    spec: VmSpec,
    predict: PredictFn | None,
    retention: RetentionFn | None,
    policy: RetentionPolicy | None,
    clock: Callable[[], float],
) -> VmOutcome:
    started = clock()
    try:
        guess = predict(spec) if predict is not None else Prediction("full", "not predicted")
        kept = retention(spec, policy, dry_run=True) if retention is not None and policy is not None else None
    except Exception as err:
        return VmOutcome(
            spec.name, spec.line, False, False, started, clock(), error=error_line(err), spec=spec
        )
    notes = (guess.reason,) if guess.reason else ()
    return VmOutcome(
        spec.name,
        spec.line,
        True,
        False,
        started,
        clock(),
        kind=guess.kind,
        notes=notes,
        retention=kept,
        spec=spec,
    )


# -- the job --------------------------------------------------------------------------------------------


def default_lock_dir() -> Path:
    """``/run/lock/vmsnap`` for root, else ``$TMPDIR/vmsnap-<uid>``."""
    if os.geteuid() == 0 and Path("/run/lock").is_dir():
        return Path("/run/lock/vmsnap")
    return Path(tempfile.gettempdir()) / f"vmsnap-{os.geteuid()}"


@contextlib.contextmanager
def job_lock(job: JobConfig, lock_dir: Path | None = None) -> Iterator[Path]:
    """Hold the job's lock for the body (``flock``; released by the kernel when the holder dies).

    :raise VmsnapError: another run of this job holds it (the message names its pid)
    """
    directory = lock_dir or default_lock_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = hashlib.sha256(str(job.path or job.name).encode()).hexdigest()[:12]
    path = directory / f"job-{job.name}-{key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise VmsnapError(
                f"job {job.name} is running already (pid {holder} holds {path})",
                hint="wait for that run to end; runs of one job never overlap",
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def hook_environment(report: JobReport, job: JobConfig) -> dict[str, str]:
    """The ``on_failure`` hook's environment: a few of ours (no credentials) and the ``VMSNAP_*`` summary."""
    env = {key: os.environ[key] for key in HOOK_ENV if key in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    failed = [o.vm for o in report.failed] + [f"line {f.line}" for f in report.entry_failures]
    env.update(
        VMSNAP_JOB=job.name,
        VMSNAP_JOB_FILE=str(job.path or ""),
        VMSNAP_STATUS="ok" if report.ok else "failed",
        VMSNAP_FAILED=str(len(failed)),
        VMSNAP_FAILED_VMS=",".join(failed),
        VMSNAP_SUCCEEDED=str(len(report.outcomes) - len(report.failed)),
        VMSNAP_SUMMARY=report.headline(),
    )
    return env


def run_hook(job: JobConfig, report: JobReport) -> HookResult:
    """Run ``on_failure`` with the report as JSON on stdin (never through a shell); never raises."""
    argv = tuple(job.on_failure)
    runner = LocalRunner(env=hook_environment(report, job))
    payload = json.dumps(report.to_json(), indent=2, sort_keys=True)
    try:
        result = runner.run(argv, input=payload, ok_codes=range(256), timeout=HOOK_TIMEOUT)
    except VmsnapError as err:
        return HookResult(argv, None, error_line(err))
    code = result.exit_code
    return HookResult(argv, code, None if code == 0 else f"exited with code {code}")


def run_job(
    job: JobConfig,
    specs: Sequence[VmSpec],
    *,
    backup: BackupFn,
    retention: RetentionFn | None = None,
    predict: PredictFn | None = None,
    gc: GcFn | None = None,
    boot: BootFn | None = None,
    entry_failures: Sequence[EntryFailure] = (),
    dry_run: bool = False,
    lock_dir: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> JobReport:
    """Back up ``specs`` (from :func:`~vmsnap.jobs.jobfile.expand_vms`) as ``job`` says.

    With ``dry_run`` nothing is touched: no lock, no backup, no removal, no gc, no hook, no metrics; each VM
    gets the predicted kind and the retention plan as it would be after this run's backup.

    :param backup: takes one VM's backup (see :data:`BackupFn`)
    :param retention: applies the job's policy to one VM (None: no retention, even with a policy)
    :param predict: the dry run's guess of each VM's kind
    :param gc: collects the repository's garbage once after all VMs, when ``job.gc`` asks for it
    :param boot: boot-verifies a VM after its backup, when ``job.verify_boot`` asks for it
    :param entry_failures: ``[[vm]]`` entries that could not be expanded (reported, and failing the run)
    :param lock_dir: where the job's lock lives (default :func:`default_lock_dir`)
    :raise VmsnapError: another run of this job holds its lock (nothing was done)
    """
    policy = job.retention
    with contextlib.ExitStack() as stack:
        if not dry_run:
            stack.enter_context(job_lock(job, lock_dir))
        started = clock()
        workers = max(1, min(job.concurrency, len(specs)))
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="vmsnap-job"
        ) as pool:
            if dry_run:
                futures = [pool.submit(_predict_one, s, predict, retention, policy, clock) for s in specs]
            else:
                futures = [
                    pool.submit(_backup_and_boot, s, backup, retention, policy, boot, job.verify_boot, clock)
                    for s in specs
                ]
            try:
                outcomes = tuple(f.result() for f in futures)
            except BaseException:  # interrupted (SIGTERM, Ctrl-C): start no further VM; running ones end
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        report = JobReport(
            job=job.name,
            dry_run=dry_run,
            started=started,
            finished=clock(),
            outcomes=outcomes,
            entry_failures=tuple(entry_failures),
            metrics_path=None if dry_run else job.metrics,
            gc_requested=job.gc and gc is not None,
        )
        if dry_run:
            return report
        if report.gc_requested:
            assert gc is not None
            report = _collect(report, gc, clock)
        if job.metrics is not None:
            report = _write_metrics(report, job.metrics, len(entry_failures))
        if not report.ok and job.on_failure:
            report = attrs.evolve(report, hook=run_hook(job, report))
        return report


def _collect(report: JobReport, gc: GcFn, clock: Callable[[], float]) -> JobReport:
    """Run gc once after every VM; its failure is the report's, not a VM's."""
    try:
        return attrs.evolve(report, gc=gc(), finished=clock())
    except Exception as err:
        return attrs.evolve(report, gc_error=error_line(err), finished=clock())


def _write_metrics(report: JobReport, path: Path, failed_entries: int) -> JobReport:
    samples = [
        metrics.VmSample(
            vm=o.vm,
            ok=o.ok,
            finished=o.finished,
            duration=o.finished - o.started,
            bytes_written=o.bytes_written,
            freeze_seconds=None if o.freeze_ms is None else o.freeze_ms / 1000,
            incremental=o.kind == "incremental",
            backed_up=o.backed_up,
            boot_finished=o.boot.finished if o.boot and o.boot.verdict in ("passed", "failed") else None,
            boot_passed=o.boot.verdict == "passed" if o.boot else None,
            boot_seconds_to_agent=o.boot.seconds_to_agent if o.boot else None,
        )
        for o in report.outcomes
    ]
    try:
        metrics.update(
            path,
            report.job,
            samples,
            job_finished=report.finished,
            job_duration=report.finished - report.started,
            failed_entries=failed_entries,
            gc=None if not report.gc_requested else report.gc,
            gc_failed=report.gc_error is not None,
        )
    except VmsnapError as err:
        return attrs.evolve(report, metrics_error=error_line(err))
    return report
