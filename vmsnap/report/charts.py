"""The report's charts, drawn with matplotlib (the ``bench`` extra) into PNG files: a VM's backups on a
timeline (what each stored, its kind, its boot verdict), its logical vs stored bytes, and the repository's
growth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmsnap.errors import UnsupportedError
from vmsnap.report.data import ReportData, VmReport

MIB = 1024 * 1024
COLORS = {"full": "#1f4e79", "incremental": "#6fa8dc", "passed": "#2e7d32", "failed": "#c62828"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise UnsupportedError(
            "the report's charts need matplotlib",
            hint="pip install 'vmsnap[bench]' (or apt-get install python3-matplotlib)",
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=96)
    _pyplot().close(fig)
    return path


def timeline_chart(vm: VmReport, path: Path) -> Path:
    """The VM's backups over time: a bar per backup (MiB it stored; dark: full, light: incremental) and a
    marker above each boot-verified one (green: passed, red: failed)."""
    plt = _pyplot()
    import matplotlib.dates as mdates

    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    times = [b.time for b in vm.backups]
    stored = [b.stored / MIB for b in vm.backups]
    colors = [COLORS.get(b.kind, "#999999") for b in vm.backups]
    span = (max(times) - min(times)).total_seconds() if len(times) > 1 else 3600.0
    width = max(span / 86400 / max(len(times) * 3, 1), 1 / 86400)
    ax.bar(times, stored, width=width, color=colors)
    top = max(stored, default=0.0) or 1.0
    for backup in vm.backups:
        if backup.boot is not None:
            verdict = backup.boot.verdict
            ax.plot(
                backup.time, top * 1.12, marker="o" if verdict == "passed" else "X", color=COLORS[verdict]
            )
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("MiB stored")
    ax.set_title(f"{vm.vm}: backups (dark full, light incremental; marker: boot verdict)", fontsize=9)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))  # type: ignore[no-untyped-call]
    fig.autofmt_xdate()
    return _save(fig, path)


def cost_chart(vm: VmReport, path: Path) -> Path:
    """Logical bytes (what a full copy reads) against bytes stored, per backup."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    positions = list(range(len(vm.backups)))
    logical = [(b.logical if b.logical is not None else b.virtual_size) / MIB for b in vm.backups]
    stored = [b.stored / MIB for b in vm.backups]
    ax.bar([p - 0.2 for p in positions], logical, width=0.4, label="logical", color="#b0b0b0")
    ax.bar([p + 0.2 for p in positions], stored, width=0.4, label="newly stored", color=COLORS["full"])
    ax.set_xticks(positions, [b.backup_id[4:13] for b in vm.backups], rotation=30, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title(f"{vm.vm}: logical vs newly stored bytes", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def growth_chart(data: ReportData, path: Path) -> Path:
    """The repository's stored bytes over time (the backups it still holds, all VMs)."""
    plt = _pyplot()
    import matplotlib.dates as mdates

    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    growth = data.growth()
    if growth:
        ax.step(
            [t for t, _ in growth], [total / MIB for _, total in growth], where="post", color=COLORS["full"]
        )
        ax.plot([t for t, _ in growth], [total / MIB for _, total in growth], "o", color=COLORS["full"])
    ax.set_ylabel("MiB stored")
    ax.set_title("repository growth (the backups it holds, all VMs)", fontsize=9)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))  # type: ignore[no-untyped-call]
    fig.autofmt_xdate()
    return _save(fig, path)
