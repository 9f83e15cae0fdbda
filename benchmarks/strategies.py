"""Measure each strategy's costs (writes while it exists, delete, rollback): `benchmarks/strategies.py`.

The harness lives in :mod:`vmsnap.benchmark` so that ``vmsnap bench`` works from an installed package; this
script is the same as ``vmsnap bench [--quick] --out benchmarks/results``.
"""

import sys

from vmsnap.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
