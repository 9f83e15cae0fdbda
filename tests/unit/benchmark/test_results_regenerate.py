"""Every file under benchmarks/results is written whole by the script that measures it: each Markdown file
is exactly what that script's renderer makes of the JSON beside it (so no figure or sentence was edited by
hand, and a new run rewrites all of it), and no file is there that no script writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from vmsnap.benchmark import strategy_traits
from vmsnap.benchmark.dedup_peers import dedup_peers_markdown
from vmsnap.benchmark.report import markdown, throughput_markdown

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results"


def script(name: str) -> ModuleType:
    """A benchmarks/ script as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def test_the_results_are_the_files_the_scripts_write() -> None:
    assert sorted(p.name for p in RESULTS.iterdir()) == sorted(
        [
            "strategy-costs.json",  # vmsnap bench (vmsnap.benchmark.report.write_outputs)
            "strategy-costs.md",
            "strategy-costs.png",
            "throughput.json",  # vmsnap bench --throughput [--peers] (report.write_throughput)
            "throughput.md",
            "jobs-concurrency.json",  # benchmarks/jobs_concurrency.py
            "jobs-concurrency.md",
            "restore-latency.json",  # benchmarks/restore_latency.py
            "restore-latency.md",
            "s3-repository.json",  # benchmarks/s3_repository.py
            "s3-repository.md",
            "boot-verify.json",  # benchmarks/boot_verify.py
            "boot-verify.md",
            "immutable.json",  # benchmarks/immutable.py
            "immutable.md",
            "data-path-profile.json",  # benchmarks/profile_data_path.py
            "data-path-profile.md",
            "dedup-peers.json",  # benchmarks/dedup_peers.py (make bench-peers)
            "dedup-peers.md",
        ]
    )
    assert (RESULTS / "strategy-costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_strategy_costs() -> None:
    written = markdown(result("strategy-costs.json"), strategy_traits())
    assert (RESULTS / "strategy-costs.md").read_text() == written


def test_throughput() -> None:
    assert (RESULTS / "throughput.md").read_text() == throughput_markdown(result("throughput.json"))


def test_jobs_concurrency() -> None:
    document = result("jobs-concurrency.json")
    written = script("jobs_concurrency").summarise(document["rows"], document["settings"])
    assert (RESULTS / "jobs-concurrency.md").read_text() == written["markdown"]
    assert document["medians"] == {str(k): v for k, v in written["medians"].items()}


def test_restore_latency() -> None:
    document = result("restore-latency.json")
    assert document["command"].startswith("benchmarks/restore_latency.py")
    assert (RESULTS / "restore-latency.md").read_text() == script("restore_latency").markdown(document)


def test_s3_repository() -> None:
    assert (RESULTS / "s3-repository.md").read_text() == script("s3_repository").report(
        result("s3-repository.json")
    )


def test_boot_verify() -> None:
    assert (RESULTS / "boot-verify.md").read_text() == script("boot_verify").markdown(
        result("boot-verify.json")
    )


def test_immutable() -> None:
    assert (RESULTS / "immutable.md").read_text() == script("immutable").report(result("immutable.json"))


def test_data_path_profile() -> None:
    assert (RESULTS / "data-path-profile.md").read_text() == script("profile_data_path").markdown(
        result("data-path-profile.json")
    )


def test_dedup_peers() -> None:
    assert (RESULTS / "dedup-peers.md").read_text() == dedup_peers_markdown(result("dedup-peers.json"))
