"""What a locked repository (S3 Object Lock) adds to backups, against an unlocked one, on a SeaweedFS started
for the run on 127.0.0.1: requests and seconds per backup (full, incremental, a full with an earlier
backup, and the incremental that extends every chunk's lock in one batch), gc and a restore ``--as-of``,
for a 1 GiB and a 64 GiB disk; and from those, the requests and seconds a locked repository adds per day.

    python benchmarks/immutable.py [--quick] [--runs 3] [--out benchmarks/results] [--json]

Started from the repository's root (it uses the test launcher and benchmarks/s3_repository.py's harness:
every vmsnap command a process of its own that reports its wall and CPU time and the S3 requests it sent).
A bare QEMU runs each disk (a qcow2 with random data in scattered 4 MiB chunks); strategy backup, pull.

Each disk is backed up into two repositories, an unlocked one in a plain bucket and a locked one
(``--lock-days 30``) in a bucket with Object Lock: a full backup, an incremental with 4 MiB changed, a
second full backup, gc, a restore (``--as-of`` now in the locked one). The batch extension is measured in a
third repository with a short lock (``--lock-days 0.0005 --lock-extend-days 0.0001``: 43 s and 9 s), where
an incremental 10 s after the full backup finds its parent's ``chunk_lock`` too short and extends every
chunk it reuses — the same requests a 30-day lock makes every ``extend_days``.

A 64 GiB disk here holds much less than 64 GiB of data (this machine's disk is shared): what a lock adds
grows with the data chunks a backup names, not with the disk's size, so the per-day figures are computed
for disks full of data from the seconds per lock extension measured over many objects, and say so. Lease
requests are left out of the counts (a heartbeat renews leases by the clock, not by the work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3_repository import Bench, running_vm, write_random_chunks  # type: ignore[import-not-found]

from tests.integration.immutable.buckets import create
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.benchmark.workload import make_test_image
from vmsnap.repo.stores.retaining import retention_after
from vmsnap.repo.stores.s3 import S3Store

MiB = 1 << 20
CHUNK_MIB = 4
PLAIN, LOCKED = "vmsnap-bench-plain", "vmsnap-bench-locked"
EXTEND_DAYS = 7
AWS_PUT_PER_1000 = 0.005
"""US dollars per 1,000 PUT-class requests on AWS S3 Standard (PutObjectRetention is one)."""


def _requests(result: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """The requests by operation, leases left out (a heartbeat renews them by the clock, not by the work)."""
    counts: Counter[str] = Counter()
    for (operation, area), n in result["requests"].items():
        if area != "locks":
            counts[operation] += n
    return sum(counts.values()), dict(sorted(counts.items()))


def _size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


def extension_rate(bench: Bench, count: int) -> dict[str, Any]:
    """Seconds per chunk lock extended as vmsnap does it (16 requests in flight), and per HeadObject of a
    lock (what gc asks), over ``count`` objects."""
    store = S3Store.from_url(f"s3://{LOCKED}/rate-{bench.serial}")
    bench.serial += 1
    keys = [f"chunks/{n:04x}/{os.urandom(32).hex()}" for n in range(count)]
    lock = retention_after("compliance", 3600)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put(key, b"x", retention=lock), keys))
    started = time.perf_counter()
    store.extend_retention(keys, retention_after("compliance", 7200))
    extend_s = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(store.retention, keys))
    head_s = time.perf_counter() - started
    store.close()
    return {
        "objects": count,
        "extend_s_per_chunk": round(extend_s / count, 5),
        "head_s_per_version": round(head_s / count, 5),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def _row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds; the requests of the run with the median count (each HTTP attempt counts: a retry
    under load adds one)."""
    counted = sorted((_requests(run) for run in runs), key=lambda found: found[0])
    total, by_operation = counted[(len(counted) - 1) // 2]
    return {"requests": total, "by_operation": by_operation, "wall_s": _median(runs, "wall_s"),
            "cpu_s": _median(runs, "cpu_s")}  # fmt: skip


def one_disk(bench: Bench, size_mib: int, data_mib: int, runs: int) -> dict[str, Any]:
    """Every step, unlocked and locked, ``runs`` times (fresh repositories each time)."""
    image = bench.fresh(f"disk-{size_mib}") / "disk0.qcow2"
    data = make_test_image(image, size_mib=size_mib, data_mib=data_mib)
    steps = ("full", "incremental", "second full", "gc", "restore")
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        k: {s: [] for s in steps} for k in ("plain", "locked")
    }
    batch: list[dict[str, Any]] = []
    plain_incremental: list[dict[str, Any]] = []
    extended: list[int] = []
    with running_vm(image.parent, image, f"vm-{size_mib}") as process:
        qmp = str(process.qmp_socket)
        for _ in range(runs):
            for kind, bucket in (("plain", PLAIN), ("locked", LOCKED)):
                repo = f"s3://{bucket}/{size_mib}-{bench.serial}"
                bench.serial += 1
                state = bench.fresh("state")
                lock = ["--lock-days", "30"] if kind == "locked" else []
                bench.vmsnap(["init", "--repo", repo, *lock], state)
                got = samples[kind]
                got["full"].append(bench.vmsnap(["backup", "--repo", repo, "--qmp", qmp, "--json"], state))
                write_random_chunks(process, [1])
                got["incremental"].append(
                    bench.vmsnap(["backup", "--repo", repo, "--qmp", qmp, "--incremental", "--json"], state)
                )
                got["second full"].append(
                    bench.vmsnap(["backup", "--repo", repo, "--qmp", qmp, "--json"], state)
                )
                got["gc"].append(bench.vmsnap(["gc", "--repo", repo, "--json"], state))
                where = repo
                if kind == "locked":
                    time.sleep(1.1)
                    where = f"{repo}?as-of={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
                out = bench.fresh("restored")
                got["restore"].append(
                    bench.vmsnap(
                        ["restore", "--repo", where, "--vm", f"vm-{size_mib}", "--to", out, "--json"], state
                    )
                )
                for file in out.iterdir():
                    file.unlink()
            # the batch: a short lock, an incremental after the extend period
            repo = f"s3://{LOCKED}/{size_mib}-short-{bench.serial}"
            bench.serial += 1
            state = bench.fresh("state")
            bench.vmsnap(
                ["init", "--repo", repo, "--lock-days", "0.0005", "--lock-extend-days", "0.0001"], state
            )
            bench.vmsnap(["backup", "--repo", repo, "--qmp", qmp, "--json"], state)
            time.sleep(10)
            write_random_chunks(process, [1])
            result = bench.vmsnap(["backup", "--repo", repo, "--qmp", qmp, "--incremental", "--json"], state)
            batch.append(result)
            extended.append(result["requests"][("PutObjectRetention", "chunks")])
            plain_incremental.append(samples["plain"]["incremental"][-1])
    rows = {}
    for step in steps:
        plain, locked = _row(samples["plain"][step]), _row(samples["locked"][step])
        rows[step] = {"plain": plain, "locked": locked}
    rows["incremental extending every chunk's lock"] = {
        "plain": _row(plain_incremental),
        "locked": _row(batch),
    }
    chunks = data // (CHUNK_MIB * MiB)
    return {
        "size_mib": size_mib,
        "data_mib": data // MiB,
        "data_chunks": chunks,
        "rows": rows,
        "extended_chunks": statistics.median(extended),
    }


def per_day(sizes: list[int], rate: float) -> list[dict[str, Any]]:
    """What a locked repository adds per day and VM with one backup a day and ``--lock-extend-days 7``, for
    disks of ``sizes`` MiB full of data, from the measured seconds per extended chunk."""
    found = []
    for size_mib in sizes:
        chunks = size_mib // CHUNK_MIB
        requests = 1 + chunks / EXTEND_DAYS
        found.append({
            "size_mib": size_mib,
            "chunks_when_full": chunks,
            "requests_per_day": round(requests, 1),
            "seconds_per_day": round(chunks / EXTEND_DAYS * rate, 1),
            "batch_every_7_days": chunks,
            "batch_seconds": round(chunks * rate, 1),
            "usd_per_day_aws": round(requests * AWS_PUT_PER_1000 / 1000, 5),
        })  # fmt: skip
    return found


def report(results: dict[str, Any]) -> str:
    lines = [
        "# A locked repository (S3 Object Lock) against an unlocked one, on SeaweedFS (127.0.0.1)",
        "",
        f"{results['when']}; {results['cpus']} CPUs, load average {results['load']} at the start (a machine "
        f"shared with other work: the seconds are noisy, the requests exact); medians of {results['runs']} "
        "run(s). Requests are every HTTP request the vmsnap process sent; seconds are its wall time. A bare "
        "QEMU, strategy backup (pull); 4 MiB changed before each incremental.",
        "",
    ]
    for disk in results["disks"]:
        lines += [
            f"## A {_size(disk['size_mib'])} disk with {disk['data_mib']} MiB of data "
            f"({disk['data_chunks']} chunks)",
            "",
            "| step | requests unlocked | locked | added | seconds unlocked | locked | added | added |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for step, row in disk["rows"].items():
            plain, locked = row["plain"], row["locked"]
            added = Counter(locked["by_operation"])
            added.subtract(plain["by_operation"])
            what = ", ".join(f"{op} {n:+d}" for op, n in sorted(added.items()) if n)
            more = locked["requests"] - plain["requests"]
            slower = locked["wall_s"] - plain["wall_s"]
            lines.append(
                f"| {step} | {plain['requests']} | {locked['requests']} | {more:+d} | {plain['wall_s']} | "
                f"{locked['wall_s']} | {slower:+.3f} | {what or '-'} |"
            )
        lines += ["", f"The batch extended {disk['extended_chunks']:g} chunk locks.", ""]
    rate = results["rate"]
    lines += [
        f"Over {rate['objects']} objects in one process: {rate['extend_s_per_chunk']} s per lock extended "
        f"(PutObjectRetention, 16 in flight), {rate['head_s_per_version']} s per lock read (HeadObject, "
        "what gc asks of versions it cannot tell).",
        "",
        "## Per day, per VM (one backup a day, `--lock-extend-days 7`, disks full of data)",
        "",
        "Computed: one request per backup (the marker's lock), plus every data chunk's lock extended once "
        "every 7 days (in one batch); seconds from the measured seconds per lock extended above; AWS at "
        "$0.005 per 1,000 PUT-class requests.",
        "",
        "| disk | chunks | requests a day | seconds a day | weekly batch | its seconds | $ a day on AWS |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["per_day"]:
        lines.append(
            f"| {_size(row['size_mib'])} | {row['chunks_when_full']} | {row['requests_per_day']} | "
            f"{row['seconds_per_day']} | {row['batch_every_7_days']} requests | {row['batch_seconds']} s | "
            f"{row['usd_per_day_aws']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small disks (a few minutes)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    disks = [(256, 64), (4096, 128)] if args.quick else [(1024, 512), (65536, 1024)]
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load": round(os.getloadavg()[0], 1),
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="vmsnap-immutable-bench-") as workdir:
        server = SeaweedServer(Path(workdir) / "seaweed")
        try:
            server.start()
            os.environ.update(server.env())
            create(server, PLAIN, "plain")
            create(server, LOCKED, "locked")
            bench = Bench(server, Path(workdir) / "scratch")
            results["rate"] = extension_rate(bench, 400 if args.quick else 2000)
            results["disks"] = [one_disk(bench, size, data, args.runs) for size, data in disks]
            results["per_day"] = per_day([size for size, _ in disks], results["rate"]["extend_s_per_chunk"])
        finally:
            server.stop(3.0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "immutable.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = report(results)
    (args.out / "immutable.md").write_text(text)
    print(json.dumps(results, default=str) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
