"""Turn measurements into the comparison table with numbers: JSON, Markdown and a PNG chart.

The JSON schema (``schema: 1``) is what later runs and tools read; the Markdown is what the README links.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from vmsnap.benchmark.measure import Measurement
from vmsnap.runner import LocalRunner, Runner

SCHEMA = 1
COST_COLUMNS = ("write_cost", "delete_cost", "rollback_cost")


def machine_info(runner: Runner | None = None) -> dict[str, Any]:
    """What the figures were measured on."""
    runner = runner or LocalRunner()
    qemu = (
        runner.run(["qemu-img", "--version"]).stdout.splitlines()[0] if runner.which("qemu-img") else "absent"
    )
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "qemu": qemu,
        "python": platform.python_version(),
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.0f} {unit}"


def _mib(bytes_written: float | None) -> str:
    return "" if bytes_written is None else f", {bytes_written / 1024 / 1024:.0f} MiB written"


def _relative(relative: float | None) -> str:
    return "" if relative is None else f" ({relative:.1f}x the time to write that data without a snapshot)"


def summarise(measurements: Sequence[Measurement]) -> dict[str, dict[str, str]]:
    """Per strategy, the three cost cells as short human strings."""
    cells: dict[str, dict[str, str]] = {}
    by: dict[tuple[str, str, str], Measurement] = {(m.strategy, m.metric, m.variant): m for m in measurements}
    for m in measurements:
        row = cells.setdefault(m.strategy, {c: "" for c in COST_COLUMNS})
        if m.metric == "write_first":
            base = by.get((m.strategy, "write_baseline", m.variant)) or by.get(
                (m.strategy, "write_baseline", "")
            )
            again = by.get((m.strategy, "write_again", m.variant))
            text = f"first write {_fmt(m.value, m.unit)}"
            if base is not None and m.value > 0:
                ratio = base.value / m.value
                relation = f"{ratio:.1f}x slower" if ratio >= 1 else f"{1 / ratio:.1f}x faster"
                text += f" ({relation} than {_fmt(base.value, base.unit)})"
            if again is not None:
                text += f", again {_fmt(again.value, again.unit)}"
            if m.variant:
                text = f"{m.variant}: {text}"
            row["write_cost"] = "; ".join(filter(None, [row["write_cost"], text]))
        elif m.metric in ("delete", "rollback"):
            key = "delete_cost" if m.metric == "delete" else "rollback_cost"
            text = f"{m.variant}: {_fmt(m.value, m.unit)}{_relative(m.relative)}{_mib(m.bytes_written)}"
            row[key] = "; ".join(filter(None, [row[key], text]))
    return cells


@attrs.frozen
class BenchResult:
    """Everything one ``vmsnap bench`` run produced."""

    created: str
    quick: bool
    image_mib: int
    runs: int
    machine: Mapping[str, Any]
    measurements: tuple[Measurement, ...]
    skipped: Mapping[str, str]
    notes: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The schema-1 JSON document."""
        return {
            "schema": SCHEMA,
            "created": self.created,
            "quick": self.quick,
            "image_mib": self.image_mib,
            "runs": self.runs,
            "machine": dict(self.machine),
            "measurements": [attrs.asdict(m) for m in self.measurements],
            "skipped": dict(self.skipped),
            "notes": {k: dict(v) for k, v in self.notes.items()},
            "table": summarise(self.measurements),
        }


def make_result(
    measurements: Sequence[Measurement],
    *,
    quick: bool,
    image_mib: int,
    runs: int,
    skipped: Mapping[str, str],
    notes: Mapping[str, Mapping[str, str]] | None = None,
) -> BenchResult:
    """A result stamped with the time and the machine.

    :param notes: per strategy measured elsewhere (the lab guest), ``where`` and ``detail``
    """
    return BenchResult(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        quick=quick,
        image_mib=image_mib,
        runs=runs,
        machine=machine_info(),
        measurements=tuple(measurements),
        skipped=dict(skipped),
        notes=dict(notes or {}),
    )


def validate(document: Mapping[str, Any]) -> None:
    """Check a results document against schema 1.

    :raise ValueError: naming the first problem
    """
    for key, kind in (
        ("schema", int),
        ("created", str),
        ("quick", bool),
        ("image_mib", int),
        ("runs", int),
        ("machine", dict),
        ("measurements", list),
        ("skipped", dict),
        ("table", dict),
    ):
        if not isinstance(document.get(key), kind):
            raise ValueError(f"results: {key!r} missing or not {kind.__name__}")
    if document["schema"] != SCHEMA:
        raise ValueError(f"results: schema {document['schema']} is not {SCHEMA}")
    for m in document["measurements"]:
        for key in ("strategy", "metric", "variant", "value", "unit", "runs"):
            if key not in m:
                raise ValueError(f"results: a measurement lacks {key!r}")
        if len(m["runs"]) < 1:
            raise ValueError("results: a measurement has no runs")
    for name, note in document.get("notes", {}).items():
        if not isinstance(note, dict) or not isinstance(note.get("where"), str):
            raise ValueError(f"results: the note on {name} has no 'where'")


def markdown(document: Mapping[str, Any], traits: Mapping[str, Mapping[str, str]]) -> str:
    """The comparison table with measured cost cells, then the machine and the raw figures."""
    from vmsnap.model import Traits

    table = document["table"]
    notes = document.get("notes", {})
    headings = ["strategy", *[h for _, h in Traits.columns()]]
    rows = []
    for name in sorted(set(traits) | set(table)):
        row = [name]
        for field, _ in Traits.columns():
            measured = table.get(name, {}).get(field, "")
            text = measured or str(traits.get(name, {}).get(field, ""))
            if field in COST_COLUMNS and not measured and name in document["skipped"]:
                text = f"not measured: {document['skipped'][name]}"
            elif field in COST_COLUMNS and measured and name in notes:
                text = f"({notes[name]['where']}) {measured}"
            row.append(text.replace("|", "/"))
        rows.append(row)
    m = document["machine"]
    lines = [
        "# vmsnap strategy costs, measured",
        "",
        f"Measured {document['created']} on {m.get('cpus')} CPUs, {m.get('memory_gib')} GiB, kernel "
        f"{m.get('kernel')}, {m.get('qemu')}; image {document['image_mib']} MiB; "
        f"median of {document['runs']} runs"
        f"{' (quick mode)' if document['quick'] else ''}. Writes: `qemu-img bench -w -t none -i native`, "
        "64 KiB requests, queue depth 16. Bytes written: kernel I/O accounting of the cleanup command.",
        "",
        _md_table(headings, rows),
        "",
        *[f"{name}: {note.get('detail') or note['where']}" for name, note in sorted(notes.items())],
        *([""] if notes else []),
        "## All figures",
        "",
        _md_table(
            ["strategy", "metric", "variant", "median", "runs", "MiB written", "x writing it"],
            [
                [
                    x["strategy"],
                    x["metric"],
                    x["variant"],
                    _fmt(x["value"], x["unit"]),
                    ", ".join(f"{v:g}" for v in x["runs"]),
                    "" if x.get("bytes_written") is None else f"{x['bytes_written'] / 1024 / 1024:.0f}",
                    "" if x.get("relative") is None else f"{x['relative']:.2f}",
                ]
                for x in document["measurements"]
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def _md_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headings) + " |", "|" + "|".join("---" for _ in headings) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def chart(document: Mapping[str, Any], path: Path) -> bool:
    """A PNG with write slowdown and cleanup time by strategy; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measurements = document["measurements"]
    notes = document.get("notes", {})

    def label(strategy: str) -> str:
        """``lvm*``, with the footnote saying where it was measured: its seconds are the emulator's."""
        return f"{strategy}*" if strategy in notes else strategy

    base = {
        (m["strategy"], m["variant"]): m["value"] for m in measurements if m["metric"] == "write_baseline"
    }
    labels, slowdown = [], []
    for m in measurements:
        if m["metric"] != "write_first":
            continue
        b = base.get((m["strategy"], m["variant"])) or base.get((m["strategy"], ""))
        if b and m["value"] > 0:
            labels.append(f"{label(m['strategy'])}\n{m['variant']}".strip())
            slowdown.append(b / m["value"])
    cleanup = [m for m in measurements if m["metric"] in ("delete", "rollback")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    left.bar(range(len(labels)), slowdown, color="#4477aa")
    left.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    left.set_ylabel("first write: x slower than no snapshot")
    left.set_yscale("log")
    left.set_title("Write cost while the snapshot exists")
    right.barh(
        range(len(cleanup)),
        [m["value"] for m in cleanup],
        color=["#cc6677" if m["metric"] == "delete" else "#228833" for m in cleanup],
    )
    right.set_yticks(
        range(len(cleanup)),
        [f"{label(m['strategy'])} {m['metric']}: {m['variant']}" for m in cleanup],
        fontsize=6,
    )
    right.set_xlabel("seconds (red: delete/commit, green: rollback)")
    right.set_xscale("log")
    right.set_title("Storage load on delete and rollback")
    footnotes = [
        f"* {name}: {note['where']} (its times are the emulator's)" for name, note in sorted(notes.items())
    ]
    if footnotes:
        fig.text(0.01, 0.01, "; ".join(footnotes), fontsize=8, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if footnotes else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: BenchResult, out: Path, traits: Mapping[str, Mapping[str, str]]) -> dict[str, Path]:
    """Write strategy-costs.json / .md / .png into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    document = result.to_json()
    validate(document)
    paths = {"json": out / "strategy-costs.json", "markdown": out / "strategy-costs.md"}
    paths["json"].write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    paths["markdown"].write_text(markdown(document, traits))
    png = out / "strategy-costs.png"
    if chart(document, png):
        paths["png"] = png
    return paths


RATIO_ORDER = (
    "full_backup_vs_convert",
    "filesystem_full_backup_vs_convert",
    "encrypted_vs_unencrypted_full_backup",
    "full_backup_cpu_s_per_gib",
    "encrypted_full_backup_cpu_s_per_gib",
    "restore_vs_convert",
    "restore_raw_vs_convert",
    "restore_cpu_s_per_gib",
    "restore_raw_cpu_s_per_gib",
    "incremental_seconds",
    "qcow2_full_backup_vs_convert",
    "qcow2_restore_vs_convert",
    "qcow2_incremental_seconds",
    "cp_vs_convert",
    "clone_new_bytes_fraction",
    "full_backup_vs_virtnbdbackup",
    "incremental_vs_virtnbdbackup",
    "restore_vs_virtnbdrestore",
    "full_backup_vs_backup_begin_push",
    "domain_full_backup_vs_convert",
    "virtnbdbackup_full_vs_convert",
    "backup_begin_push_vs_convert",
)
"""The order ratios are listed in (others follow, by name): the Markdown is the same whatever order the
JSON holds them in, so it can be written again from throughput.json alone."""


def _ratio_rows(
    ratios: Mapping[str, Any], targets: Mapping[str, Any], *, status: bool = False
) -> list[list[str]]:
    """Rows of ratio, measured, target and (with ``status``) whether it was met, in :data:`RATIO_ORDER`."""

    def place(name: str) -> tuple[int, str]:
        return (RATIO_ORDER.index(name) if name in RATIO_ORDER else len(RATIO_ORDER), name)

    rows = []
    for k in sorted(ratios, key=place):
        target = str(targets.get(k, ""))
        rows.append([k, f"{ratios[k]:g}", target, *([target_status(ratios[k], target)] if status else [])])
    return rows


def _peer_step(name: str) -> int:
    """Where a peer figure goes: start-up, full backups, incrementals, restores."""
    if name.endswith("(start-up only)"):
        return 0
    if "restore" in name:
        return 3
    return 2 if "incremental" in name else 1


def throughput_markdown(document: Mapping[str, Any]) -> str:
    """The throughput figures and ratios as Markdown."""
    rows = [
        [
            f["name"],
            f"{f['seconds']:.3f} s",
            f"{f['mb_per_s']:.0f} MB/s",
            _cpu_cell(f),
            ", ".join(f"{v:g}" for v in f["runs"]),
        ]
        for f in document["figures"]
    ]
    ratio_rows = _ratio_rows(document["ratios"], document.get("targets", {}), status=True)
    load = document.get("load_at_start")
    return "\n".join(
        [
            "# vmsnap backup throughput, measured side by side",
            "",
            f"Image: {document['size_mib']} MiB qcow2 with {document['data_mib']} MiB of random data at "
            f"scattered offsets; median of {document['runs']} runs; MB/s counts the image's data. CPU: "
            "user+sys seconds of every process involved (vmsnap, qemu-img, qemu-nbd, the VM's QEMU, which "
            "serves pull exports), per GiB of data where data moved. The anchor is `qemu-img convert` with "
            "its output fsync'd — the durable copy, as vmsnap's backups and restores are durable — not the "
            "hardware's limit. New repositories' chunk ids are BLAKE3 (see docs/performance.md)."
            + (
                f" Load average {load} at the start on this 2-core machine, shared with other work: the "
                "figures of one run are side by side; under load, wall times and (less) CPU times grow."
                if load is not None
                else ""
            ),
            "",
            _md_table(["operation", "median", "throughput", "CPU s (s/GiB)", "runs (s)"], rows),
            "",
            _md_table(["ratio", "measured", "target", "status"], ratio_rows),
            "",
            *_chunks_markdown(document.get("chunks") or {}),
            *_peers_markdown(document.get("peers") or {}),
        ]
    )


def target_status(measured: float, target: str) -> str:
    """ "met", "missed by N%" (or "Nx" far off), or "" for a figure without a target (``>= 0.9``, ``<= 1.0``,
    ``< 0.05``)."""
    parts = target.split()
    if len(parts) != 2:
        return ""
    op, bound = parts[0], float(parts[1])
    if {">=": measured >= bound, "<=": measured <= bound, "<": measured < bound, ">": measured > bound}.get(
        op, False
    ):
        return "met"
    if measured <= 0:
        return "missed"
    factor = bound / measured if op.startswith(">") else measured / bound
    return f"missed by {(factor - 1) * 100:.0f} %" if factor < 2 else f"missed by {factor:.1f}x"


def _cpu_cell(figure: Mapping[str, Any]) -> str:
    """CPU seconds of a figure, with its CPU seconds per GiB when it moved that much data."""
    cpu = figure.get("cpu_seconds")
    if cpu is None:
        return ""
    per_gib = figure.get("cpu_s_per_gib")
    if per_gib is None or figure.get("data_bytes", 0) < 2**30:
        return f"{cpu:.2f} s"
    return f"{cpu:.2f} s ({per_gib:.2f})"


def _chunks_markdown(chunks: Mapping[str, Any]) -> list[str]:
    """The chunks layout's own figures (dedup of a clone, compression, memory), or nothing."""
    rows = []
    dedup = chunks.get("dedup_of_a_clone") or {}
    if dedup.get("new_fraction") is not None:
        rows.append(
            [
                "a clone's backup stores (new bytes / its data)",
                f"{dedup['new_fraction']:.2%} ({dedup['new_bytes'] / 2**20:.1f} MiB)",
                "< 5 %",
            ]
        )
    lab = chunks.get("lab_guest_compression") or {}
    if lab.get("ratio") is not None:
        rows.append(
            [
                "compression of the lab guest's filesystem (data / stored)",
                f"{lab['ratio']:g}x ({lab['data_bytes'] / 2**20:.1f} MiB → "
                f"{lab['stored_bytes'] / 2**20:.1f} MiB)",
                "",
            ]
        )
    memory = chunks.get("sparse_disk_memory") or {}
    if memory.get("peak_rss_mib") is not None:
        rows.append(
            [
                f"peak RSS backing up a {memory['size_gib']} GiB sparse disk",
                f"{memory['peak_rss_mib']:.0f} MiB ({memory['seconds']:.1f} s)",
                "< 300 MiB",
            ]
        )
    if not rows:
        return []
    return ["## The chunks layout", "", _md_table(["figure", "measured", "target"], rows), ""]


def _peers_markdown(peers: Mapping[str, Any]) -> list[str]:
    """The peers section of throughput.md (nothing when no peer was measured). Peers measured in an earlier
    run than the figures above carry that run's vmsnap commit (``measured_at``), and say so."""
    figures = peers.get("figures") or {}
    if not figures:
        return []
    earlier = peers.get("measured_at")
    when = (
        f"Measured in an earlier run than the figures above (vmsnap at commit {earlier}), "
        if earlier
        else "Measured in the same run "
    )
    limit = "that run's `qemu-img convert` limit" if earlier else "the `qemu-img convert` limit above"
    versions = ", ".join(f"{k} {v}" for k, v in sorted((peers.get("versions") or {}).items()))
    rows = [
        [
            name,
            f"{f['seconds']:.3f} s",
            f"{f['mb_per_s']:.0f} MB/s" if f.get("data_bytes") else "",
            ", ".join(f"{v:g}" for v in f["runs"]),
            "yes" if f.get("verified") else "",
        ]
        for name, f in sorted(figures.items(), key=lambda item: _peer_step(item[0]))
    ]
    ratio_rows = _ratio_rows(peers.get("ratios") or {}, peers.get("targets") or {})
    return [
        "## vmsnap and its peers on the same libvirt domain",
        "",
        f"{when}on one running libvirt domain ({versions}) over a fresh image of the "
        "same kind: vmsnap (as `vmsnap backup --domain NAME --connect URI` with its defaults — a new chunks "
        "repository, QEMU's backup job through libvirt's QMP passthrough — and `vmsnap restore`), "
        "virtnbdbackup and libvirt's backup-begin back up the same domain, the same image and the same "
        "data, each incremental round changes the same "
        "100 MiB before both tools' incrementals (they take turns at going first), and each restore "
        "restores the latest backup. The vmsnap-versus-peer ratios compare the figures of this table "
        f"only, not the bare-QEMU figures above; the `*_vs_convert` ones divide {limit}. "
        "Unlike the bare QEMU above, the domain's vCPU runs (it spins in the firmware). "
        "Ratios are speed ratios: above 1, the first-named is faster. Each figure ends with what it "
        "wrote fsync'd (as vmsnap's and qemu-img convert's do); restores are verified with "
        "`qemu-img compare` against the disk. vmsnap runs in-process, virtnbdbackup as a command: its "
        "figures include its start-up, measured on its own as `virtnbdbackup -V`."
        + _incremental_note(figures),
        "",
        _md_table(["operation", "median", "throughput", "runs (s)", "verified"], rows),
        "",
        _md_table(["ratio", "measured", "target"], ratio_rows),
        "",
    ]


def _incremental_note(figures: Mapping[str, Mapping[str, Any]]) -> str:
    """What vmsnap's same-domain incrementals stored, when the figures say: a caveat for their ratio."""
    written = next(
        (f.get("written_bytes") for n, f in figures.items() if n.startswith("vmsnap incremental")), None
    )
    if not written:
        return ""
    median = sorted(written)[len(written) // 2]
    return (
        f" vmsnap's incrementals stored {median:,} bytes each (median): every round writes 4 MiB blocks of "
        "one byte pattern (`qemu-io write -P`), which the chunks repository deduplicates and compresses; "
        "both tools still read the 100 MiB that changed."
    )


def write_throughput(document: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Write throughput.json and throughput.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "throughput.json", "markdown": out / "throughput.md"}
    paths["json"].write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    paths["markdown"].write_text(throughput_markdown(document))
    return paths
