"""Backup throughput against qemu-img convert, cp and (with --peers) virtnbdbackup.

``python benchmarks/throughput.py [--quick] [--peers]`` is ``vmsnap bench --throughput`` (the cost table
is measured too, in the same run).
"""

import sys

from vmsnap.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--throughput", *sys.argv[1:]]))
