"""Throughput and request rates of S3Store against a SeaweedFS started for the run on 127.0.0.1.

    python benchmarks/s3_store.py [--objects 64] [--threads 1,4,8] [--requests 400] [--runs 3] [--json]

Started from the repository's root (it uses the test launcher, ``tests/integration/s3/seaweed.py``). For each
thread count: ``--objects`` distinct 4 MiB objects (random, so nothing compresses or deduplicates) are put,
then read back, by that many threads sharing one S3Store (as the chunk pipeline's workers do); then
``--requests`` HEAD requests (``exists``) and LIST requests (``list`` of a prefix with 64 objects, one page)
with 8 threads. The median of ``--runs`` runs is printed, in MiB/s and requests/s. Server and client share
the machine's cores, so these are the numbers of a loaded single host, not of a remote server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.repo.stores.s3 import S3Store

MiB = 1024 * 1024
OBJECT = 4 * MiB


def timed(threads: int, items: list[str], work: Callable[[str], object]) -> float:
    """Seconds for ``threads`` threads to call ``work`` on every item."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(work, items):
            pass
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--threads", default="1,4,8")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    results: dict[str, object] = {"object_mib": OBJECT // MiB, "objects": args.objects}

    with tempfile.TemporaryDirectory(prefix="vmsnap-s3-bench-") as workdir:
        server = SeaweedServer(Path(workdir))
        try:
            server.start()
            results["startup_s"] = round(server.startup_seconds, 2)
            os.environ.update(server.env())
            store = S3Store("vmsnap-bench", "bench")
            store.create_bucket()
            datas = {f"chunks/{i:04x}": os.urandom(OBJECT) for i in range(args.objects)}
            store.put("warm-up", datas["chunks/0000"])
            for threads in thread_counts:
                puts, gets = [], []
                for run in range(args.runs):
                    keys = [f"{threads}/{run}/{key}" for key in datas]
                    puts.append(timed(threads, keys, lambda k: store.put(k, datas[k.split("/", 2)[2]])))
                    gets.append(timed(threads, keys, store.get))
                volume = args.objects * OBJECT / MiB
                results[f"put_mib_s_{threads}t"] = round(volume / statistics.median(puts), 1)
                results[f"get_mib_s_{threads}t"] = round(volume / statistics.median(gets), 1)
            heads, lists = [], []
            head_keys = [f"{thread_counts[0]}/0/chunks/{i % args.objects:04x}" for i in range(args.requests)]
            list_prefixes = [f"{thread_counts[0]}/0/chunks/" for _ in range(args.requests // 4)]
            for _ in range(args.runs):
                heads.append(timed(8, head_keys, store.exists))
                lists.append(timed(8, list_prefixes, lambda p: sum(1 for _ in store.list(p))))
            results["head_per_s_8t"] = round(len(head_keys) / statistics.median(heads))
            results["list_per_s_8t"] = round(len(list_prefixes) / statistics.median(lists))
            store.close()
        finally:
            server.stop(3.0)

    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:>18}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
