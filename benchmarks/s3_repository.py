"""A chunks repository on S3 against the same work on a local directory, what an incremental costs in
requests, dedup across hosts, and the request figures the scale analysis in docs/s3.md uses — side by side in
one run, against a SeaweedFS started for the run on 127.0.0.1.

    python benchmarks/s3_repository.py [--quick] [--runs 3] [--out benchmarks/results] [--json]

Started from the repository's root (it uses the test launcher ``tests/integration/s3/seaweed.py``). Every
vmsnap command runs as a process of its own (``python -c`` around ``vmsnap.cli.main``) that reports its
wall time, its CPU time (user + system, qemu-nbd children included), its peak RSS (VmHWM) and the S3
requests it sent (each HTTP attempt, by operation and key area); the SeaweedFS server's CPU time is read
from /proc around each command.

1. **Backup and restore, S3 against a local directory**: one qcow2 (``--size-mib``, ``--data-mib`` of random
   data at scattered offsets) attached to a bare QEMU, backed up (strategy backup, pull: QEMU's NBD export
   read by the chunk pipeline) into a fresh repository of each kind, then restored; the runs alternate.
2. **Requests per incremental** for two disk sizes and 4, 16 and 64 MiB changed (1, 4, 16 chunks).
3. **Dedup across two hosts**: two clones of one image (each with 4 MiB of its own), powered off, backed up
   by two "hosts" (own working and state directories) one after the other, then at the same time.
4. **Request figures**: listing ``chunks/`` (one listing, and the 16 parallel ones vmsnap makes), and a
   conditional put of a 4 MiB chunk that is new, that exists (412), and a HEAD.

The machine is shared by server and client: these are the numbers of one loaded host, not of a remote
server; ratios (and CPU time next to wall time) carry over better than absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.benchmark.report import target_status
from vmsnap.benchmark.workload import make_test_image
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.chunks.known import list_chunks
from vmsnap.repo.stores.s3 import S3Store
from vmsnap.vm.machine import QemuMachine

MiB = 1 << 20
BUCKET = "vmsnap-bench"
CHILD = r"""
import json, sys
from vmsnap.cli import main
code = main(sys.argv[2:])
s3 = sys.modules.get("vmsnap.repo.stores.s3")
counts = s3.PROCESS_REQUESTS.snapshot() if s3 is not None else {}
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
with open(sys.argv[1], "w") as out:
    json.dump({"peak_kib": peak, "requests": [[o, a, n] for (o, a), n in counts.items()]}, out)
sys.exit(code)
"""


class Bench:
    """The run's server, environment and scratch space; :meth:`vmsnap` runs one measured command."""

    def __init__(self, server: SeaweedServer, scratch: Path) -> None:
        self.server = server
        self.scratch = scratch
        self.env = server.env()
        self.serial = 0

    def fresh(self, name: str) -> Path:
        self.serial += 1
        path = self.scratch / f"{name}-{self.serial}"
        path.mkdir(parents=True)
        return path

    def url(self, name: str) -> str:
        self.serial += 1
        return f"s3://{BUCKET}/{name}-{self.serial}"

    def _server_cpu(self) -> float:
        fields = Path(f"/proc/{self.server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(
        self, argv: Sequence[str], state: Path, cwd: Path | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        report = self.fresh("report") / "report.json"
        env = {**self.env, "VMSNAP_STATE_DIR": str(state)}
        command = [sys.executable, "-c", CHILD, str(report), *[str(a) for a in argv]]
        out = open(report.with_name("stdout"), "wb")  # noqa: SIM115 - closed by the caller's wait
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.PIPE)
        out.close()
        return process, report

    def wait(self, process: subprocess.Popen[bytes], report: Path, started: float) -> dict[str, Any]:
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.returncode != 0:
            raise RuntimeError(f"vmsnap failed ({process.returncode}): {err.strip()}")
        data = json.loads(report.read_text())
        stdout = report.with_name("stdout").read_text()
        return {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_mib": data["peak_kib"] / 1024,
            "requests": Counter({(o, a): n for o, a, n in data["requests"]}),
            "json": json.loads(stdout) if stdout.strip().startswith("{") else None,
        }

    def vmsnap(self, argv: Sequence[str], state: Path) -> dict[str, Any]:
        """Run ``vmsnap ARGV`` (with ``--json`` where given) and measure it, with the server's CPU time."""
        server_before = self._server_cpu()
        started = time.perf_counter()
        process, report = self.start(argv, state)
        result = self.wait(process, report, started)
        result["server_cpu_s"] = self._server_cpu() - server_before
        return result


@contextmanager
def running_vm(workdir: Path, image: Path, name: str) -> Iterator[QemuProcess]:
    process = QemuProcess(workdir, [DriveSpec(image, "disk0")], name=name).start()
    try:
        yield process
    finally:
        process.stop()
        process.kill()


def write_random_chunks(process: QemuProcess, chunks: Sequence[int]) -> None:
    """4 MiB of fresh random data into each of ``chunks`` (4 MiB units) of disk0, as guest writes."""
    machine = QemuMachine(process.qmp_socket)
    try:
        qmp = machine.qmp()
        for chunk in chunks:
            data = process.workdir / "random"
            data.write_bytes(os.urandom(4 * MiB))
            qemu_io(qmp, "disk0", f"write -s {data} {chunk * 4}M 4M")
        qemu_io(qmp, "disk0", "flush")
    finally:
        machine.close()


def write_file_data(image: Path, offset_mib: int, size_mib: int) -> None:
    """Random data into a powered-off qcow2 image with qemu-io."""
    data = image.with_name("random")
    data.write_bytes(os.urandom(size_mib * MiB))
    command = f"write -s {data} {offset_mib}M {size_mib}M"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)
    data.unlink()


def med(samples: Sequence[dict[str, Any]], key: str) -> float:
    return round(statistics.median(s[key] for s in samples), 3)


def throughput(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Backup and restore of one image into S3 and into a local directory, alternating, ``runs`` times."""
    image = bench.fresh("image") / "disk0.qcow2"
    data = make_test_image(image, size_mib=args.size_mib, data_mib=args.data_mib)
    samples: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("local backup", "s3 backup", "local restore", "s3 restore")
    }
    with running_vm(image.parent, image, "bench-vm") as process:
        for _ in range(args.runs):
            for kind in ("local", "s3"):
                repo = str(bench.fresh("repo")) if kind == "local" else bench.url("throughput")
                state = bench.fresh("state")
                samples[f"{kind} backup"].append(
                    bench.vmsnap(["backup", "--repo", repo, "--qmp", process.qmp_socket, "--json"], state)
                )
                out = bench.fresh("restored")
                samples[f"{kind} restore"].append(
                    bench.vmsnap(
                        ["restore", "--repo", repo, "--vm", "bench-vm", "--to", out, "--json"], state
                    )
                )
                shutil.rmtree(out)
    rows = {
        name: {
            "wall_s": med(runs, "wall_s"),
            "mb_s": round(data / 1e6 / med(runs, "wall_s")),
            "cpu_s": med(runs, "cpu_s"),
            "server_cpu_s": med(runs, "server_cpu_s") if name.startswith("s3") else 0.0,
            "peak_mib": round(max(r["peak_mib"] for r in runs)),
            "requests": sum(runs[-1]["requests"].values()),
            "runs_s": [round(r["wall_s"], 3) for r in runs],
        }
        for name, runs in samples.items()
    }
    return {
        "data_mib": data // MiB,
        "size_mib": args.size_mib,
        "rows": rows,
        "backup_s3_vs_local": round(rows["local backup"]["wall_s"] / rows["s3 backup"]["wall_s"], 2),
        "restore_s3_vs_local": round(rows["local restore"]["wall_s"] / rows["s3 restore"]["wall_s"], 2),
    }


def requests_per_incremental(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per disk size and amount changed: the requests of an incremental (by operation), and its time."""
    found = []
    for size_mib in args.sizes:
        image = bench.fresh("inc") / "disk0.qcow2"
        make_test_image(image, size_mib=size_mib, data_mib=64)
        repo, state = bench.url(f"inc{size_mib}"), bench.fresh("state")
        with running_vm(image.parent, image, "inc-vm") as process:
            bench.vmsnap(["backup", "--repo", repo, "--qmp", process.qmp_socket, "--json"], state)
            for changed_mib in (4, 16, 64):
                runs = []
                for _ in range(args.runs):
                    write_random_chunks(process, range(32, 32 + changed_mib // 4))
                    argv = ["backup", "--repo", repo, "--qmp", process.qmp_socket, "--incremental", "--json"]
                    runs.append(bench.vmsnap(argv, state))
                requests = runs[-1]["requests"]
                by_operation: Counter[str] = Counter()
                for (operation, _), n in requests.items():
                    by_operation[operation] += n
                found.append({
                    "disk_mib": size_mib,
                    "changed_mib": changed_mib,
                    "requests": sum(requests.values()),
                    "chunk_puts": requests[("PutObject", "chunks")],
                    "by_operation": dict(sorted(by_operation.items())),
                    "wall_s": med(runs, "wall_s"),
                    "cpu_s": med(runs, "cpu_s"),
                })  # fmt: skip
    return found


def dedup(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Two hosts back up clones of one image: one after the other, then both at once (a fresh repository)."""
    base = bench.fresh("dedup") / "base.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(base), f"{args.dedup_mib + 64}M"], check=True
    )
    for offset in range(0, args.dedup_mib, 64):  # the template's data, then each clone's own in a hole of it
        write_file_data(base, offset, min(64, args.dedup_mib - offset))
    clones = {}
    for n, name in enumerate(("clone-a", "clone-b")):
        clones[name] = base.with_name(f"{name}.qcow2")
        shutil.copyfile(base, clones[name])
        write_file_data(clones[name], args.dedup_mib + 8 * n, 4)

    def argv(repo: str, name: str) -> list[str]:
        return ["backup", "--repo", repo, "--image", str(clones[name]), "--name", name, "--json"]

    def stored(result: dict[str, Any]) -> tuple[int, int]:
        disks = result["json"]["disks"]
        return sum(d["chunks"]["new_bytes"] for d in disks), sum(d["chunks"]["logical_size"] for d in disks)

    hosts = {name: (bench.fresh(f"host-{name}"), bench.fresh("state")) for name in clones}
    repo = bench.url("dedup-seq")
    first = bench.vmsnap(argv(repo, "clone-a"), hosts["clone-a"][1])
    second = bench.vmsnap(argv(repo, "clone-b"), hosts["clone-b"][1])
    repo = bench.url("dedup-par")
    started = time.perf_counter()
    running = [(bench.start(argv(repo, name), bench.fresh("state"), cwd=hosts[name][0])) for name in clones]
    both = [bench.wait(process, report, started) for process, report in running]
    new_a, logical = stored(first)
    new_b, _ = stored(second)
    together = sum(stored(r)[0] for r in both)
    return {
        "image_data_mib": args.dedup_mib,
        "first_host_new_mib": round(new_a / MiB, 1),
        "second_host_new_mib": round(new_b / MiB, 1),
        "second_host_new_fraction": round(new_b / logical, 4),
        "at_once_new_mib": round(together / MiB, 1),
        "at_once_vs_one_image": round(together / new_a, 3),
    }


def request_figures(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Listing rates of ``chunks/`` and the latency of a put of a new chunk, of an existing one, of a HEAD."""
    os.environ.update(bench.env)
    store = S3Store.from_url(bench.url("figures"))
    ids = [os.urandom(32).hex() for _ in range(args.list_keys)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda h: store.put(f"chunks/{h[:4]}/{h}", b"x"), ids))
    started = time.perf_counter()
    sequential = sum(1 for _ in store.list("chunks/"))
    one_listing = time.perf_counter() - started
    started = time.perf_counter()
    parallel = len(list_chunks(store))
    sixteen = time.perf_counter() - started
    chunk = os.urandom(4 * MiB)
    timings: dict[str, list[float]] = {"put new": [], "put existing (412)": [], "head": []}
    for n in range(args.latency_requests):
        key = f"lat/{n}"
        for what in timings:
            started = time.perf_counter()
            if what == "head":
                store.exists(key)
            else:
                store.put(key, chunk, if_absent=True)
            timings[what].append(time.perf_counter() - started)
    store.close()
    return {
        "listed_keys": sequential,
        "list_keys_per_s_one": round(sequential / one_listing),
        "list_keys_per_s_16": round(parallel / sixteen),
        "latency_ms": {k: round(1000 * statistics.median(v), 1) for k, v in timings.items()},
    }


def report(results: dict[str, Any]) -> str:
    """The results as markdown."""
    t = results["throughput"]
    lines = [
        "# A chunks repository on S3 (SeaweedFS on 127.0.0.1) against a local directory",
        "",
        f"{results['when']}; {results['cpus']} CPUs, load average {results['load']} at the start; medians of "
        f"{results['runs']} runs. Server and client share the machine: ratios carry over better than speeds. "
        "CPU is user + system time of the vmsnap process (qemu-nbd included); server CPU is SeaweedFS's.",
        "",
        f"## Backup and restore: {t['data_mib']} MiB of random data in a {t['size_mib']} MiB qcow2 "
        "(bare QEMU, strategy backup, pull)",
        "",
        "| operation | median | MB/s | CPU (s/GiB) | server CPU (s/GiB) | peak RSS | requests | runs (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gib = t["data_mib"] / 1024
    for name, row in t["rows"].items():
        lines.append(
            f"| {name} | {row['wall_s']} s | {row['mb_s']} | {row['cpu_s']} s ({row['cpu_s'] / gib:.2f}) | "
            f"{row['server_cpu_s']} s ({row['server_cpu_s'] / gib:.2f}) | {row['peak_mib']} MiB | "
            f"{row['requests']} | {', '.join(map(str, row['runs_s']))} |"
        )
    lines += [
        "",
        "| ratio (speed of S3 / of the local directory) | measured | target | status |",
        "|---|---|---|---|",
        f"| backup | {t['backup_s3_vs_local']} | >= 0.8 | "
        f"{target_status(t['backup_s3_vs_local'], '>= 0.8')} |",
        f"| restore | {t['restore_s3_vs_local']} | >= 0.9 | "
        f"{target_status(t['restore_s3_vs_local'], '>= 0.9')} |",
        "",
        "The server shares the client's two cores: its CPU per GiB (above) is taken from what vmsnap could "
        "use, so on this machine the S3 figures measure the server as much as the client.",
        "",
        "## Requests per incremental (S3), by disk size and data changed",
        "",
        "| disk | changed | requests | chunk puts | by operation | median | CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["incremental"]:
        ops = ", ".join(f"{k} {v}" for k, v in row["by_operation"].items())
        lines.append(
            f"| {row['disk_mib']} MiB | {row['changed_mib']} MiB | {row['requests']} | {row['chunk_puts']} | "
            f"{ops} | {row['wall_s']} s | {row['cpu_s']} s |"
        )
    d, f = results["dedup"], results["figures"]
    lines += [
        "",
        f"## Dedup across two hosts: clones of one image with {d['image_data_mib']} MiB of data, 4 MiB each "
        "of their own",
        "",
        f"- one after the other: the first host stored {d['first_host_new_mib']} MiB, the second "
        f"{d['second_host_new_mib']} MiB ({100 * d['second_host_new_fraction']:.2f} % of its data);",
        f"- at the same time: both together stored {d['at_once_new_mib']} MiB, {d['at_once_vs_one_image']}x "
        "what one host stored alone.",
        "",
        "## Request figures (for docs/s3.md)",
        "",
        f"- listing `chunks/` with {f['listed_keys']} keys: {f['list_keys_per_s_one']} keys/s as one "
        f"listing, {f['list_keys_per_s_16']} keys/s as vmsnap lists it (16 prefixes in parallel);",
        "- median latency of one request with a 4 MiB chunk: "
        + ", ".join(f"{k} {v} ms" for k, v in f["latency_ms"].items())
        + " (a conditional put of an existing chunk is refused before its body is sent: "
        "`Expect: 100-continue`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size_mib, args.data_mib = (512, 128) if quick else (2048, 1024)
    args.sizes = (256, 4096) if quick else (1024, 65536)
    args.dedup_mib = 64 if quick else 512
    args.list_keys = 4000 if quick else 20000
    args.latency_requests = 10 if quick else 50
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load": round(os.getloadavg()[0], 1),
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="vmsnap-s3-repo-bench-") as workdir:
        server = SeaweedServer(Path(workdir) / "seaweed")
        try:
            server.start()
            os.environ.update(server.env())
            S3Store(BUCKET).create_bucket()
            bench = Bench(server, Path(workdir) / "scratch")
            results["throughput"] = throughput(bench, args)
            results["incremental"] = requests_per_incremental(bench, args)
            results["dedup"] = dedup(bench, args)
            results["figures"] = request_figures(bench, args)
        finally:
            server.stop(3.0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "s3-repository.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    (args.out / "s3-repository.md").write_text(text)
    print(json.dumps(results) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
