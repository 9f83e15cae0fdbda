"""What a backup job reports: per VM a :class:`VmOutcome` (kind, bytes, duration, freeze window, retention,
error with the job file's line), the :class:`JobReport` of a run (``to_json()`` for ``--json``,
``summary()`` for people, ``exit_status``), and how retention results read (:func:`prune_json`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import VmsnapError
from vmsnap.jobs.jobfile import EntryFailure, VmSpec
from vmsnap.repo.reports import GcReport, PruneResult
from vmsnap.repo.retention import PARENT_RULE, RetentionPlan

Kind = Literal["full", "incremental"]


def as_prune_result(vm: str, retention: RetentionPlan) -> PruneResult:
    """A :class:`RetentionPlan` (newest first) as the repository's :class:`PruneResult` (oldest first)."""
    kept = [k for k in reversed(retention.kept) if k.rule != PARENT_RULE]
    needed = [k for k in reversed(retention.kept) if k.rule == PARENT_RULE]
    return PruneResult(
        vm,
        tuple(reversed(retention.removed)),
        tuple(k.backup_id for k in kept),
        tuple(k.backup_id for k in needed),
        {k.backup_id: k.reason for k in retention.kept},
    )


def prune_json(result: PruneResult) -> dict[str, Any]:
    """What retention kept (with the rule that kept each) and removed, oldest first."""
    kept = [b for b in result.reasons if b in result.kept or b in result.needed]
    return {
        "kept": [{"backup_id": b, "reason": result.reasons[b]} for b in sorted(kept)],
        "removed": list(result.removed),
    }


@attrs.frozen
class BootOutcome:
    """A VM's boot verification in a job (``verify_boot``).

    :param verdict: "passed" or "failed" (the backup booted and was judged), "skipped" (its last one is
        recent enough, or the VM cannot be booted), "error" (the verification could not run)
    :param detail: why it failed, was skipped or could not run
    :param finished: Unix time it ended
    """

    verdict: Literal["passed", "failed", "skipped", "error"]
    detail: str | None = None
    backup_id: str | None = None
    seconds_to_agent: float | None = None
    seconds: float = 0.0
    finished: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class VmOutcome:
    """One VM's part of the report.

    :param ok: backed up (and, with a policy, pruned) without error
    :param backed_up: the backup was committed (True even when only the retention after it failed)
    :param kind: "full"/"incremental" (in a dry run: what it would be)
    :param error: one line: what failed and what to do
    :param retention: what the policy kept and removed (would remove, in a dry run)
    """

    vm: str
    line: int
    ok: bool
    backed_up: bool
    started: float
    finished: float
    kind: Kind | None = None
    backup_id: str | None = None
    bytes_written: int = 0
    seconds: float = 0.0
    freeze_ms: float | None = None
    error: str | None = None
    notes: tuple[str, ...] = ()
    retention: PruneResult | None = None
    retention_error: str | None = None
    boot: BootOutcome | None = None
    spec: VmSpec | None = attrs.field(default=None, eq=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "line": self.line,
            "ok": self.ok,
            "kind": self.kind,
            "backup_id": self.backup_id,
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "freeze_ms": None if self.freeze_ms is None else round(self.freeze_ms, 1),
            "error": self.error,
            "notes": list(self.notes),
            "retention": None if self.retention is None else prune_json(self.retention),
            "retention_error": self.retention_error,
            "boot": None if self.boot is None else self.boot.to_json(),
            "target": None if self.spec is None else self.spec.to_json(),
        }


@attrs.frozen
class HookResult:
    """How the ``on_failure`` hook ended: its exit code, or why it could not run."""

    argv: tuple[str, ...]
    exit_code: int | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "exit_code": self.exit_code, "error": self.error}


@attrs.frozen
class JobReport:
    """Everything a run did; ``to_json()`` for ``--json``, ``summary()`` for people."""

    job: str
    dry_run: bool
    started: float
    finished: float
    outcomes: tuple[VmOutcome, ...]
    entry_failures: tuple[EntryFailure, ...] = ()
    hook: HookResult | None = None
    metrics_path: Path | None = None
    metrics_error: str | None = None
    gc: GcReport | None = None
    gc_error: str | None = None
    gc_requested: bool = False

    @property
    def failed(self) -> tuple[VmOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def ok(self) -> bool:
        """Every VM succeeded, every entry expanded, gc (when asked for) ran, the metrics were written."""
        problems = (self.failed, self.entry_failures, self.metrics_error, self.gc_error)
        return not any(problems)

    @property
    def exit_status(self) -> int:
        """0 when :attr:`ok`, else 1."""
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "started": _iso(self.started),
            "seconds": round(self.finished - self.started, 3),
            "vms": [o.to_json() for o in self.outcomes],
            "entry_failures": [
                {"line": f.line, "selects": f.label, "error": f.error} for f in self.entry_failures
            ],
            "on_failure": None if self.hook is None else self.hook.to_json(),
            "metrics": None if self.metrics_path is None else str(self.metrics_path),
            "metrics_error": self.metrics_error,
            "gc": None if self.gc is None else self.gc.to_json(),
            "gc_error": self.gc_error,
        }

    def headline(self) -> str:
        """One line: how many VMs succeeded, in how long."""
        total = len(self.outcomes) + len(self.entry_failures)
        good = total - len(self.failed) - len(self.entry_failures)
        verb = "would back up" if self.dry_run else "backed up"
        failed = total - good
        tail = f"; {failed} failed" if failed else ""
        return f"job {self.job}: {verb} {good} of {total} VMs in {self.finished - self.started:.1f} s{tail}"

    def summary(self) -> str:
        """The headline, then one line per VM (kind, bytes, duration, freeze window, retention or error)."""
        lines = [self.headline()]
        width = max((len(o.vm) for o in self.outcomes), default=0)
        for outcome in self.outcomes:
            lines.append(f"  {outcome.vm:<{width}}  {_describe(outcome, self.dry_run)}")
        for failure in self.entry_failures:
            lines.append(f"  line {failure.line} ({failure.label}): FAILED {failure.error}")
        if self.gc_requested:
            lines.append(f"  gc: {self._gc_line()}")
        if self.hook is not None:
            state = self.hook.error or f"exit code {self.hook.exit_code}"
            lines.append(f"  on_failure {self.hook.argv[0]}: {state}")
        if self.metrics_error:
            lines.append(f"  metrics: {self.metrics_error}")
        return "\n".join(lines)

    def _gc_line(self) -> str:
        if self.dry_run:
            return "would run after the backups"
        if self.gc_error is not None:
            return f"FAILED: {self.gc_error}"
        if self.gc is None:
            return "not run"
        freed = self.gc
        tail = f", {len(freed.partial_backups)} partial backups removed" if freed.partial_backups else ""
        return (
            f"freed {freed.chunks_freed} chunks ({_size(freed.bytes_freed)}), kept {freed.chunks_kept}{tail}"
        )


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _describe(outcome: VmOutcome, dry_run: bool) -> str:
    if not outcome.backed_up and outcome.error:
        return f"FAILED (job file line {outcome.line}): {outcome.error}"
    parts: list[str] = [outcome.kind or "?"]
    if not dry_run:
        parts.append(_size(outcome.bytes_written))
        parts.append(f"{outcome.seconds:.1f} s")
        parts.append(f"frozen {outcome.freeze_ms:.0f} ms" if outcome.freeze_ms is not None else "not frozen")
    if outcome.retention is not None:
        verb = "would remove" if dry_run else "removed"
        kept = len(outcome.retention.kept) + len(outcome.retention.needed)
        parts.append(f"kept {kept}, {verb} {len(outcome.retention.removed)}")
    text = ", ".join(parts)
    if outcome.retention_error:
        text += f"; retention FAILED (job file line {outcome.line}): {outcome.retention_error}"
    for note in outcome.notes:
        text += f"; {note}"
    if outcome.boot is not None:
        boot = outcome.boot
        text += f"; boot {boot.verdict.upper() if boot.verdict in ('failed', 'error') else boot.verdict}"
        if boot.seconds_to_agent is not None:
            text += f" (agent after {boot.seconds_to_agent:.1f} s)"
        if boot.detail:
            text += f": {boot.detail}"
    return text


def error_line(err: BaseException) -> str:
    """One line for an error: vmsnap's own text (with its hint), else the exception's type and text."""
    text = str(err) if isinstance(err, VmsnapError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())
