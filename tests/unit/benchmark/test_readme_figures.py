"""The README's measured figures are the results files' (benchmarks/results), rounded as the README rounds
them: the peer table, the data path's CPU and wall times before and after its changes, and each strategy's
write and rollback cost. A new run that changes a figure fails here until the README says it."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

X = "\N{MULTIPLICATION SIGN}"
ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()
THROUGHPUT = json.loads((ROOT / "benchmarks/results/throughput.json").read_text())
COSTS = json.loads((ROOT / "benchmarks/results/strategy-costs.json").read_text())


def figure(name: str, figures: Any = None) -> dict[str, Any]:
    if figures is None:
        found = [f for f in THROUGHPUT["figures"] if f["name"] == name]
        assert found, name
        return dict(found[0])
    return dict(figures[name])


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def test_the_peer_table() -> None:
    peers = THROUGHPUT["peers"]["figures"]
    ratios = THROUGHPUT["peers"]["ratios"]
    rows = {
        "full backup": (
            "vmsnap full backup (chunks, same domain)",
            "virtnbdbackup full",
            ratios["full_backup_vs_virtnbdbackup"],
        ),
        "incremental, 100 MiB changed": (
            "vmsnap incremental (100 MiB changed, same domain)",
            "virtnbdbackup incremental (100 MiB changed)",
            ratios["incremental_vs_virtnbdbackup"],
        ),
        "restore, full + 3 incrementals": (
            "vmsnap restore (full + 3 incrementals, same domain)",
            "virtnbdrestore (full + 3 incrementals)",
            ratios["restore_vs_virtnbdrestore"],
        ),
    }
    for label, (ours, theirs, ratio) in rows.items():
        line = next(line for line in README.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == seconds(figure(ours, peers)["seconds"]), line
        assert cells[2] == seconds(figure(theirs, peers)["seconds"]), line
        assert cells[3].startswith(f"{ratio:.1f}{X} faster"), line


def test_the_data_path_changes() -> None:
    """The README's before/after figures are data-path-profile.json's medians (its Markdown's table)."""
    profile = json.loads((ROOT / "benchmarks/results/data-path-profile.json").read_text())
    gib = profile["data_bytes"] / 2**30

    def median(source: str, op: str, key: str) -> float:
        return statistics.median(r[key] for r in profile["sources"][source][op])

    def cpu(source: str, op: str) -> str:
        return f"{sum(median(source, op, k) for k in ('vmsnap', 'children', 'qemu')) / gib:.2f}"

    def wall(source: str, op: str) -> str:
        return f"{median(source, op, 'wall'):.1f}"

    text = " ".join(README.split())
    assert (
        f"the full backup's CPU per GiB (vmsnap and the VM's QEMU) went from {cpu('before', 'backup')} to "
        f"{cpu('after', 'backup')} s, the restore to qcow2's from {cpu('before', 'restore-qcow2')} to "
        f"{cpu('after', 'restore-qcow2')} s and to raw from {cpu('before', 'restore-raw')} to "
        f"{cpu('after', 'restore-raw')} s, and their wall times from {wall('before', 'backup')} to "
        f"{wall('after', 'backup')} s, {wall('before', 'restore-qcow2')} to "
        f"{wall('after', 'restore-qcow2')} s "
        f"and {wall('before', 'restore-raw')} to {wall('after', 'restore-raw')} s (under a load of "
        f"{round(profile['load_at_start'])}"
    ) in text


def cost(strategy: str, variant: str, metric: str) -> float:
    found = [
        m
        for m in COSTS["measurements"]
        if m["strategy"] == strategy and m["variant"] == variant and m["metric"] == metric
    ]
    assert len(found) == 1, (strategy, variant, metric)
    return float(found[0]["value"])


def slower(strategy: str, variant: str, first: str | None = None) -> float:
    """How many times slower the first write after a snapshot is than writing without one."""
    return cost(strategy, variant, "write_baseline") / cost(
        strategy, variant if first is None else first, "write_first"
    )


def test_the_strategy_costs() -> None:
    text = " ".join(README.split())
    claims = {
        "internal snapshot is {}{X} slower than an overwrite without `lazy_refcounts`": slower(
            "internal", "lazy_refcounts=off"
        ),
        "and {}{X} with it": slower("internal", "lazy_refcounts=on"),
        "into an external overlay {}{X}": slower("external", ""),
        "copy-before-write {}{X}": slower("backup", "", "copy-before-write"),
        "Btrfs nodatacow {}{X}": slower("btrfs", "nodatacow"),
        "a classic snapshot {}{X}": slower("lvm", "classic"),
        "a thin one {}{X}": slower("lvm", "thin"),
    }
    for template, value in claims.items():
        sentence = template.replace("{X}", X)
        shown = re.search(re.escape(sentence).replace(r"\{\}", r"([\d.]+)"), text)
        assert shown, sentence
        assert abs(float(shown.group(1)) - value) <= 0.05 * value + 0.05, (sentence, value)
