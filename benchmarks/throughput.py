"""Backup, restore and incremental throughput against the durable copy (``qemu-img convert`` + fsync), with
CPU seconds per GiB and each target's status; writes ``throughput.json`` and ``throughput.md`` whole.

    python benchmarks/throughput.py [--quick] [--runs 3] [--peers] [--out benchmarks/results]

``--peers`` also measures virtnbdbackup on a libvirt domain (``make bench-peers`` installs it). The strategy
cost table is ``vmsnap bench`` (``vmsnap bench --throughput`` measures both in one run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmsnap.benchmark.report import write_throughput
from vmsnap.benchmark.throughput import run_throughput


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 512 MiB image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peers", action="store_true", help="also virtnbdbackup (needs libvirt)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    document = run_throughput(
        quick=args.quick, runs=args.runs, peers=args.peers, progress=lambda line: print(line, flush=True)
    )
    paths = write_throughput(document, args.out)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
