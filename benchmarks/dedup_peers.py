"""vmsnap against restic and borgbackup on the same disks, all three encrypted and compressed
(:mod:`vmsnap.benchmark.dedup_peers`); writes ``dedup-peers.json`` and ``dedup-peers.md`` whole.

    python benchmarks/dedup_peers.py [--quick] [--runs 3] [--out benchmarks/results]

``make bench-peers`` installs restic and borgbackup (Debian's packages) and runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmsnap.benchmark.cpu import adopting_orphans
from vmsnap.benchmark.dedup_peers import dedup_peers_markdown, run_dedup_peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 MiB disks")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    with adopting_orphans():
        document = run_dedup_peers(
            quick=args.quick, runs=args.runs, progress=lambda line: print(line, flush=True)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dedup-peers.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    (args.out / "dedup-peers.md").write_text(dedup_peers_markdown(document))
    print(dedup_peers_markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
