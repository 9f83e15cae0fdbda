"""The Prometheus text file a job writes after each run, for node_exporter's textfile collector.

Written atomically (a temp file whose name does not end in ``.prom`` in the same directory, fsync, rename), so
the collector never reads half a file. Series (every one labelled ``job`` and, per VM, ``vm``)::

    vmsnap_backup_last_run_timestamp_seconds      when the VM's last backup attempt ended
    vmsnap_backup_last_success_timestamp_seconds  when its last successful backup ended (kept across failures)
    vmsnap_backup_last_status                     1: the last attempt succeeded (backup and retention), 0: not
    vmsnap_backup_last_duration_seconds           how long the last attempt took
    vmsnap_backup_last_bytes                      bytes written by the last successful backup
    vmsnap_backup_last_freeze_seconds             guest freeze window of the last successful backup (0: none)
    vmsnap_backup_last_incremental                1: the last successful backup was incremental
    vmsnap_backup_failures_total                  failed attempts (a counter, kept in the file across runs)
    vmsnap_boot_verify_last_timestamp_seconds     when the VM's last boot verification ended (verify_boot)
    vmsnap_boot_verify_last_status                1: its last boot verification passed, 0: it failed
    vmsnap_boot_verify_last_seconds_to_agent      seconds from its start to the guest agent's answer
    vmsnap_job_last_run_timestamp_seconds         when the job last ended
    vmsnap_job_last_duration_seconds              how long it took
    vmsnap_job_last_status                        1: every VM succeeded
    vmsnap_job_last_failed                        VMs (and unexpandable [[vm]] entries) that failed
    vmsnap_job_last_gc_freed_bytes                what the job's last gc freed (only with ``gc = true``)

The previous file is read back first: a VM that failed this run keeps its last success time, bytes and
freeze window, so an alert on ``time() - vmsnap_backup_last_success_timestamp_seconds`` sees a stale VM; a
VM not boot-verified this run (``verify_boot_every``) keeps its last verification's series.
Series of other jobs in the same file are kept as they were. A VM of this job that is not in this run is
dropped (it left the job), unless the run could not list some VMs (an unreachable libvirt): then it is kept,
so that it goes stale rather than vanishing.

The file is 0644, unlike vmsnap's other files: node_exporter reads it as its own user, and it holds no
secret (VM and job names, times, sizes).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from vmsnap.errors import VmsnapError
from vmsnap.repo.reports import GcReport

FILE_MODE = 0o644

VM_METRICS: tuple[tuple[str, str, str], ...] = (
    ("vmsnap_backup_last_run_timestamp_seconds", "gauge", "Unix time the VM's last backup attempt ended."),
    (
        "vmsnap_backup_last_success_timestamp_seconds",
        "gauge",
        "Unix time the VM's last successful backup ended (kept when later attempts fail).",
    ),
    (
        "vmsnap_backup_last_status",
        "gauge",
        "1 if the VM's last backup attempt (with retention) succeeded, else 0.",
    ),
    ("vmsnap_backup_last_duration_seconds", "gauge", "Seconds the VM's last backup attempt took."),
    ("vmsnap_backup_last_bytes", "gauge", "Bytes written by the VM's last successful backup."),
    (
        "vmsnap_backup_last_freeze_seconds",
        "gauge",
        "Guest freeze window of the last successful backup (0: none).",
    ),
    (
        "vmsnap_backup_last_incremental",
        "gauge",
        "1 if the VM's last successful backup was incremental, else 0.",
    ),
    ("vmsnap_backup_failures_total", "counter", "Failed backup attempts of the VM."),
    (
        "vmsnap_boot_verify_last_timestamp_seconds",
        "gauge",
        "Unix time the VM's last boot verification ended.",
    ),
    ("vmsnap_boot_verify_last_status", "gauge", "1 if the VM's last boot verification passed, else 0."),
    (
        "vmsnap_boot_verify_last_seconds_to_agent",
        "gauge",
        "Seconds from the start of the VM's last boot verification to its guest agent's answer.",
    ),
)
_BOOT = (
    "vmsnap_boot_verify_last_timestamp_seconds",
    "vmsnap_boot_verify_last_status",
    "vmsnap_boot_verify_last_seconds_to_agent",
)
JOB_METRICS: tuple[tuple[str, str, str], ...] = (
    ("vmsnap_job_last_run_timestamp_seconds", "gauge", "Unix time the backup job last ended."),
    ("vmsnap_job_last_duration_seconds", "gauge", "Seconds the backup job's last run took."),
    ("vmsnap_job_last_status", "gauge", "1 if every VM of the job's last run succeeded, else 0."),
    ("vmsnap_job_last_failed", "gauge", "VMs (and unexpandable [[vm]] entries) that failed in the last run."),
    ("vmsnap_job_last_gc_freed_bytes", "gauge", "Bytes the job's last garbage collection freed."),
)
_KNOWN = {name for name, _, _ in (*VM_METRICS, *JOB_METRICS)}


@attrs.frozen
class VmSample:
    """What one VM's attempt in this run gives the metrics.

    :param vm: the VM's name
    :param ok: the backup (and its retention) succeeded
    :param finished: Unix time the attempt ended
    :param duration: seconds it took
    :param bytes_written: bytes the backup wrote (when ok)
    :param freeze_seconds: the guest's freeze window, None when not frozen
    :param incremental: the backup was incremental
    :param backed_up: the backup itself was committed (True also when only the retention after it failed)
    :param boot_finished: Unix time its boot verification ended (None: none ran this time)
    :param boot_passed: that verification passed
    :param boot_seconds_to_agent: seconds to its guest agent's answer (None: it never answered)
    """

    vm: str
    ok: bool
    finished: float
    duration: float
    bytes_written: int = 0
    freeze_seconds: float | None = None
    incremental: bool = False
    backed_up: bool | None = None
    boot_finished: float | None = None
    boot_passed: bool | None = None
    boot_seconds_to_agent: float | None = None


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(metric name, sorted labels) → value."""


def escape_label(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def parse_series(text: str) -> Series:
    """The vmsnap series of a text file this module wrote (other lines are ignored)."""
    series: Series = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None or match.group(1) not in _KNOWN:
            continue
        labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(match.group(2) or "")))
        try:
            series[(match.group(1), labels)] = float(match.group(3))
        except ValueError:
            continue
    return series


def read_series(path: Path) -> Series:
    """The series in ``path`` (nothing when it is missing or unreadable: the next write starts afresh)."""
    try:
        return parse_series(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}


def _labels(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def merge(
    previous: Series,
    job: str,
    samples: Sequence[VmSample],
    *,
    job_finished: float,
    job_duration: float,
    failed_entries: int = 0,
    gc: GcReport | None = None,
    gc_failed: bool = False,
) -> Series:
    """This run's series over the previous file's (see the module docstring for what is kept).

    :param failed_entries: ``[[vm]]`` entries that could not be expanded: counted as failures, and previous
        VMs of this job are kept
    :param gc: what this run's gc freed (its gauge keeps the previous value when there is none)
    :param gc_failed: the gc this run asked for failed: the job's status is 0
    """
    out: Series = {}
    by_vm: dict[str, dict[str, float]] = {}
    for (name, labels), value in previous.items():
        label_map = dict(labels)
        if label_map.get("job") != job:
            out[(name, labels)] = value  # another job's series: not ours to change
        elif "vm" in label_map:
            by_vm.setdefault(label_map["vm"], {})[name] = value
    current = {s.vm for s in samples}
    if failed_entries:
        for vm, kept in by_vm.items():
            if vm not in current:
                for name, value in kept.items():
                    out[(name, _labels(job=job, vm=vm))] = value
    for sample in samples:
        before = by_vm.get(sample.vm, {})
        values: dict[str, float] = {
            "vmsnap_backup_last_run_timestamp_seconds": sample.finished,
            "vmsnap_backup_last_status": 1.0 if sample.ok else 0.0,
            "vmsnap_backup_last_duration_seconds": sample.duration,
            "vmsnap_backup_failures_total": before.get("vmsnap_backup_failures_total", 0.0)
            + (0.0 if sample.ok else 1.0),
        }
        backed_up = sample.ok if sample.backed_up is None else sample.backed_up
        if backed_up:
            values["vmsnap_backup_last_success_timestamp_seconds"] = sample.finished
            values["vmsnap_backup_last_bytes"] = float(sample.bytes_written)
            values["vmsnap_backup_last_freeze_seconds"] = sample.freeze_seconds or 0.0
            values["vmsnap_backup_last_incremental"] = 1.0 if sample.incremental else 0.0
        else:
            for name in (
                "vmsnap_backup_last_success_timestamp_seconds",
                "vmsnap_backup_last_bytes",
                "vmsnap_backup_last_freeze_seconds",
                "vmsnap_backup_last_incremental",
            ):
                if name in before:
                    values[name] = before[name]
        if sample.boot_finished is not None:
            values["vmsnap_boot_verify_last_timestamp_seconds"] = sample.boot_finished
            values["vmsnap_boot_verify_last_status"] = 1.0 if sample.boot_passed else 0.0
            if sample.boot_seconds_to_agent is not None:
                values["vmsnap_boot_verify_last_seconds_to_agent"] = sample.boot_seconds_to_agent
        else:
            values.update({name: before[name] for name in _BOOT if name in before})
        for name, value in values.items():
            out[(name, _labels(job=job, vm=sample.vm))] = value
    failed = sum(1 for s in samples if not s.ok) + failed_entries
    out[("vmsnap_job_last_run_timestamp_seconds", _labels(job=job))] = job_finished
    out[("vmsnap_job_last_duration_seconds", _labels(job=job))] = job_duration
    out[("vmsnap_job_last_status", _labels(job=job))] = 0.0 if failed or gc_failed else 1.0
    out[("vmsnap_job_last_failed", _labels(job=job))] = float(failed)
    gc_key = ("vmsnap_job_last_gc_freed_bytes", _labels(job=job))
    if gc is not None:
        out[gc_key] = float(gc.bytes_freed)
    elif gc_key in previous:
        out[gc_key] = previous[gc_key]
    return out


def _value(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(series: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    """The text exposition format: HELP and TYPE once per metric, then its series sorted by labels."""
    lines: list[str] = []
    for name, kind, help_text in (*VM_METRICS, *JOB_METRICS):
        rows = sorted((labels, value) for (metric, labels), value in series.items() if metric == name)
        if not rows:
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            text = ",".join(f'{key}="{escape_label(val)}"' for key, val in labels)
            lines.append(f"{name}{{{text}}} {_value(value)}")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a temp file beside it (not ``*.prom``), fsync, rename.

    :raise VmsnapError: the directory is missing or not writable
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), FILE_MODE)  # the umask must not make it unreadable for node_exporter
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise VmsnapError(
            f"cannot write the metrics file {path}: {err.strerror or err}",
            hint="create its directory (node_exporter's textfile directory) or set metrics = false",
        ) from err


def update(
    path: Path,
    job: str,
    samples: Iterable[VmSample],
    *,
    job_finished: float,
    job_duration: float,
    failed_entries: int = 0,
    gc: GcReport | None = None,
    gc_failed: bool = False,
) -> str:
    """Read the previous file, merge this run in, write it atomically; returns the text written.

    :raise VmsnapError: the file cannot be written
    """
    series = merge(
        read_series(path),
        job,
        list(samples),
        job_finished=job_finished,
        job_duration=job_duration,
        failed_entries=failed_entries,
        gc=gc,
        gc_failed=gc_failed,
    )
    text = render(series)
    write_atomic(path, text)
    return text
