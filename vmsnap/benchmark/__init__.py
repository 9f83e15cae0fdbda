"""The benchmark harness: each strategy's measured costs (``vmsnap bench``) and backup throughput.

Results go to ``benchmarks/results/`` as JSON (schema 1), Markdown and a PNG chart.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs

from vmsnap.benchmark.costs import CostBench
from vmsnap.benchmark.measure import Measurement
from vmsnap.benchmark.report import BenchResult, make_result, write_outputs

__all__ = ["BenchResult", "CostBench", "Measurement", "run_cost_bench", "strategy_traits"]


def strategy_traits() -> dict[str, dict[str, str]]:
    """Each registered strategy's Traits row as a dict (strategies that fail to load are left out)."""
    from vmsnap.errors import VmsnapError
    from vmsnap.strategies import strategy_class, strategy_names

    rows: dict[str, dict[str, str]] = {}
    for name in strategy_names():
        try:
            rows[name] = {k: str(v) for k, v in attrs.asdict(strategy_class(name).traits).items()}
        except VmsnapError:
            continue
    return rows


def run_cost_bench(
    out: Path,
    *,
    quick: bool = False,
    runs: int = 3,
    workdir: Path | None = None,
    strategies: tuple[str, ...] = ("internal", "external", "backup", "btrfs", "lvm"),
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[BenchResult, dict[str, Path]]:
    """Measure every strategy's costs and write the results into ``out``.

    :param workdir: scratch space (default: a temporary directory under /var/tmp, removed afterwards)
    """
    with tempfile.TemporaryDirectory(prefix="vmsnap-bench-", dir=workdir or "/var/tmp") as scratch:
        bench = CostBench(Path(scratch), quick=quick, runs=runs, progress=progress)
        bench.run(strategies)
    result = make_result(
        bench.measurements,
        quick=quick,
        image_mib=bench.image_mib,
        runs=runs,
        skipped=bench.skipped,
        notes=bench.notes,
    )
    return result, write_outputs(result, out, strategy_traits())
