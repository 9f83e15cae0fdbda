"""``vmsnap report``: a static HTML page about a repository, opened from disk (no server, no JavaScript).

``OUT/index.html`` with, per VM, its backups on a timeline and their cost (charts), a table (kind, logical
and stored bytes, dedup, compression, boot verdict with a screenshot thumbnail), and the repository's growth;
``OUT/charts/*.png`` and ``OUT/screens/*.png`` beside it, every one referenced by the page. With a job's
metrics file, its last run per VM too. Everything is escaped; the files are 0644 in a 0755 directory (a
report is for people to read), and hold no key and no secret.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import attrs

from vmsnap.errors import UsageError
from vmsnap.repo.repository import Repository
from vmsnap.report import charts
from vmsnap.report.data import BackupRow, ReportData, VmReport, collect

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l { text-align: left; }
.passed { color: #2e7d32; font-weight: bold; } .failed { color: #c62828; font-weight: bold; }
img.thumb { width: 160px; border: 1px solid #999; } img.chart { max-width: 100%; }
pre { font-size: 0.75em; background: #f7f7f7; padding: 4px; max-width: 500px; overflow: auto;
      text-align: left; }
"""


@attrs.frozen
class ReportResult:
    """What :func:`write_report` wrote: the page and every image it references."""

    page: Path
    images: tuple[Path, ...]
    vms: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"page": str(self.page), "images": [str(p) for p in self.images], "vms": list(self.vms)}


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**20:,.1f} MiB"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _boot_cell(row: BackupRow, screens: Path, images: list[Path]) -> str:
    boot = row.boot
    if boot is None:
        return "<td class='l'>not verified</td>"
    agent = (
        f"agent after {boot.seconds_to_agent:.1f} s"
        if boot.seconds_to_agent is not None
        else "agent never answered"
    )
    verdict = html.escape(boot.verdict)
    parts = [f"<span class='{verdict}'>{verdict.upper()}</span> ({html.escape(agent)})"]
    if boot.reason:
        parts.append(html.escape(boot.reason))
    for check in boot.checks:
        parts.append(html.escape(check.describe()))
    for port in boot.ports:
        parts.append(f"port {int(port.port)} {'open' if port.open else 'closed'}")
    if row.screenshot is not None:
        name = f"{_safe(row.vm)}-{_safe(row.backup_id)}.png"
        path = screens / name
        path.write_bytes(row.screenshot)
        images.append(path)
        alt = f"screen of {html.escape(row.vm)} at its boot verification"
        parts.append(f"<a href='screens/{name}'><img class='thumb' src='screens/{name}' alt='{alt}'></a>")
    elif boot.screenshot_skipped:
        parts.append(f"no screenshot: {html.escape(boot.screenshot_skipped)}")
    if boot.console_tail:
        parts.append("<pre>" + html.escape("\n".join(boot.console_tail[-6:])) + "</pre>")
    return "<td class='l'>" + "<br>".join(parts) + "</td>"


def _verify_cell(row: BackupRow) -> str:
    record = row.verified
    if record is None:
        return "<td class='l'>not verified</td>"
    stamp = record.stamp
    when = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}"
    what = "chunks exist" if record.fast else f"every checksum ({html.escape(record.reader)})"
    if record.ok:
        return f"<td class='l'><span class='passed'>OK</span> {when}<br>{what}</td>"
    problems = "<br>".join(html.escape(p) for p in record.problems[:5])
    count = len(record.problems)
    return f"<td class='l'><span class='failed'>{count} PROBLEM(S)</span> {when}<br>{problems}</td>"


def _vm_section(vm: VmReport, out: Path, images: list[Path]) -> str:
    timeline = charts.timeline_chart(vm, out / "charts" / f"{_safe(vm.vm)}-timeline.png")
    cost = charts.cost_chart(vm, out / "charts" / f"{_safe(vm.vm)}-cost.png")
    images += [timeline, cost]
    rows = []
    for row in reversed(vm.backups):
        rows.append(
            "<tr>"
            f"<td class='l'>{html.escape(row.backup_id)}</td><td class='l'>{row.time:%Y-%m-%d %H:%M:%S}</td>"
            f"<td class='l'>{html.escape(row.kind)}</td>"
            f"<td>{_size(row.logical)}</td><td>{_size(row.stored)}</td>"
            f"<td>{_ratio(row.dedup)}</td><td>{_ratio(row.compression)}</td>{_verify_cell(row)}"
            f"{_boot_cell(row, out / 'screens', images)}</tr>"
        )
    name = html.escape(vm.vm)
    return (
        f"<h2 id='vm-{_safe(vm.vm)}'>{name}</h2>"
        f"<p>{len(vm.backups)} backup(s); newest first below.</p>"
        f"<img class='chart' src='charts/{timeline.name}' alt='{name} backups on a timeline'>"
        f"<img class='chart' src='charts/{cost.name}' alt='{name} logical vs stored bytes'>"
        "<table><tr><th>backup</th><th>time (UTC)</th><th>kind</th><th>logical</th><th>stored</th>"
        "<th>dedup</th><th>compressed to</th><th>verify</th><th>boot verification</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _metrics_section(data: ReportData) -> str:
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for (name, labels), value in data.metrics.items():
        label = dict(labels)
        if "vm" in label:
            rows.setdefault((label.get("job", ""), label["vm"]), {})[name] = value
    if not rows:
        return ""
    body = []
    for (job, vm), values in sorted(rows.items()):
        status = values.get("vmsnap_backup_last_status")
        boot = values.get("vmsnap_boot_verify_last_status")
        last = values.get("vmsnap_backup_last_bytes")
        body.append(
            f"<tr><td class='l'>{html.escape(job)}</td><td class='l'>{html.escape(vm)}</td>"
            f"<td>{'ok' if status == 1 else 'FAILED' if status == 0 else '-'}</td>"
            f"<td>{_size(int(last)) if last is not None else '-'}</td>"
            f"<td>{'passed' if boot == 1 else 'FAILED' if boot == 0 else '-'}</td></tr>"
        )
    return (
        "<h2>last job runs (metrics file)</h2><table><tr><th>job</th><th>vm</th><th>last backup</th>"
        "<th>bytes</th><th>last boot verification</th></tr>" + "".join(body) + "</table>"
    )


def render(data: ReportData, out: Path) -> ReportResult:
    """Write ``out/index.html`` and its images for ``data``."""
    for directory in (out, out / "charts", out / "screens"):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    images: list[Path] = []
    growth = charts.growth_chart(data, out / "charts" / "growth.png")
    images.append(growth)
    sections = [_vm_section(vm, out, images) for vm in data.vms]
    count = sum(len(v.backups) for v in data.vms)
    toc = " · ".join(f"<a href='#vm-{_safe(vm.vm)}'>{html.escape(vm.vm)}</a>" for vm in data.vms)
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>vmsnap report: {html.escape(data.location)}</title><style>{STYLE}</style></head><body>"
        f"<h1>vmsnap report</h1><p>repository <code>{html.escape(data.location)}</code> "
        f"({html.escape(data.layout)} layout), {count} backup(s) of {len(data.vms)} VM(s); made "
        f"{data.generated:%Y-%m-%d %H:%M} UTC.</p><p>{toc}</p>"
        f"<img class='chart' src='charts/{growth.name}' alt='repository growth'>"
        + _metrics_section(data)
        + "".join(sections)
        + "<p><small>dedup: share of a backup's data chunks the repository held already; compressed to: "
        "stored bytes per byte of the chunks it stored first (at 4 MiB each).</small></p></body></html>\n"
    )
    index = out / "index.html"
    tmp = index.with_name(".index.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    for path in (index, *images):
        path.chmod(0o644)
    return ReportResult(index, tuple(images), tuple(vm.vm for vm in data.vms))


def write_report(
    repo: Path | str, out: Path, *, key_file: Path | None = None, metrics: Path | None = None
) -> ReportResult:
    """``vmsnap report``: read the repository (and a job's metrics file) and write the page into ``out``.

    :raise UsageError: the metrics file does not exist
    :raise RepositoryError: the repository cannot be read (:class:`KeyFileError`: encrypted, no or wrong key)
    :raise UnsupportedError: matplotlib is not installed
    """
    if metrics is not None and not metrics.is_file():
        raise UsageError(f"metrics file {metrics} does not exist", hint="give the .prom file a job writes")
    repository = Repository.open(repo, key_file=key_file)
    with repository.reading():
        data = collect(repository, metrics=metrics)
    return render(data, Path(out))
