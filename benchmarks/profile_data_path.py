"""Where the CPU of the data path goes: full backup, restore to qcow2 and to raw, measured for one or more
checkouts of vmsnap side by side (e.g. before and after a change), with the CPU of every process involved
and, with ``--perf``, a system-wide ``perf`` profile of those processes summarised by what the samples were
doing (hashing, copying, page faults, the interpreter, …).

    python benchmarks/profile_data_path.py [--source NAME=DIR ...] [--runs 3] [--perf] [--pyspy]
        [--out benchmarks/results]

Each ``--source`` is a checkout whose ``vmsnap`` package is imported (default: this one, named "this");
the sources take turns, run by run, in child processes of this script. The image is the throughput run's
(a 2 GiB qcow2 holding 1.5 GiB of random data), attached to a bare QEMU whose vCPUs are stopped; the backup is
QEMU's backup job read over NBD (strategy backup, pull) into a new local repository (the source's default
format), the restores write that repository's backup to a new qcow2 and a new raw file. CPU is user + system
time of this process, the children it reaped (qemu-nbd) and the QEMU serving the export, per GiB of data.
``--perf`` needs ``perf`` (linux-perf) and samples the whole machine at 499 Hz (``cpu-clock``), keeping the
samples of those processes; ``--pyspy`` writes a flame graph per operation (py-spy, ``--native``).
Writes ``data-path-profile.json`` and ``data-path-profile.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
CATEGORIES = [  # (category, pattern of the leaf symbol or its library), first match wins
    ("hash: BLAKE3", r"blake3"),
    ("hash: sha256 / AES-GCM (libcrypto)", r"libcrypto"),
    ("copy: user memory (memcpy)", r"memmove|memcpy"),
    ("copy: socket and page cache (kernel)", r"_copy_to_iter|_copy_from_iter|copy_user|copy_page_to_iter"),
    ("page faults (fresh buffers)", r"page_fault|clear_page|memcg|handle_mm_fault|alloc_pages|folio_zero"),
    ("O_DIRECT page pinning", r"gup_|bio_iov_iter|pin_user"),
    ("zero checks (memcmp)", r"memcmp"),
    ("zstd", r"ZSTD_|zstd"),
    ("Python interpreter", r"python3\.\d+|_PyEval|PyObject"),
]


def _categorise(symbol: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, symbol):
            return name
    return "other kernel" if "kernel" in symbol else "other"


# ------------------------------------------------------------------------------------------------ the child


def child(args: argparse.Namespace) -> int:
    """Run one operation of one source and print its figures as JSON (imports vmsnap from ``args.source``)."""
    sys.path.insert(0, args.source)
    os.environ["VMSNAP_STATE_DIR"] = str(Path(args.work) / "state")
    import resource

    from vmsnap.backup.run import Backup, BackupConfig
    from vmsnap.benchmark.cpu import adopting_orphans, process_cpu, reap_adopted
    from vmsnap.lab.qemu import DriveSpec, QemuProcess
    from vmsnap.repo.repository import Repository
    from vmsnap.vm.machine import QemuMachine

    work, image = Path(args.work), Path(args.image)
    repo = work / "repo"

    def own() -> tuple[float, float]:
        reap_adopted()
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    with adopting_orphans():
        process = QemuProcess(work / "qemu", [DriveSpec(image, "disk0")], name="profvm").start()
        machine = QemuMachine(process.qmp_socket)
        machine.qmp().stop()
        try:
            if args.op == "backup":
                shutil.rmtree(repo, ignore_errors=True)
                Repository.init(repo, layout="chunks")
                config = BackupConfig(repo=repo, strategy="backup", quiesce="off")

                def action() -> None:
                    Backup(machine, config).run()
            else:
                repository = Repository.open(repo)
                vm = repository.vms()[0]
                target = work / "restored"
                shutil.rmtree(target, ignore_errors=True)
                fmt = args.op.split("-")[1]

                def action() -> None:
                    repository.restore(vm, None, target, format=fmt)  # type: ignore[arg-type]

            pids: set[int] = {os.getpid(), process.pid or 0}
            stop = threading.Event()

            def watch() -> None:  # this process's children (qemu-nbd, adopted), for the perf samples
                while not stop.wait(0.5):
                    for task in Path("/proc/self/task").iterdir():
                        try:
                            pids.update(int(p) for p in (task / "children").read_text().split())
                        except OSError:
                            continue

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            spy = None
            if args.pyspy:
                spy = subprocess.Popen(
                    ["py-spy", "record", "--native", "--pid", str(os.getpid()), "-r", "200",
                     "-o", args.pyspy],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1.0)
            me0, kids0 = own()
            qemu0 = process_cpu(process.pid or 0)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            action()
            wall = time.perf_counter() - started
            me1, kids1 = own()
            qemu1 = process_cpu(process.pid or 0)
            stop.set()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            if args.op != "backup":
                shutil.rmtree(work / "restored", ignore_errors=True)
        finally:
            machine.close()
            process.stop()
    pids.discard(0)
    print(json.dumps({
        "wall": wall, "vmsnap": me1 - me0, "children": kids1 - kids0, "qemu": qemu1 - qemu0,
        "load": load, "pids": sorted(pids),
    }))  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------- the parent


def perf_summary(data: Path, pids: set[int]) -> dict[str, Any]:
    """Samples of ``pids`` by process (vmsnap, QEMU, qemu-nbd) and by category of their leaf symbol."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,pid,ip,sym,dso"], capture_output=True, text=True
    ).stdout
    by_process: collections.Counter[str] = collections.Counter()
    by_category: collections.Counter[str] = collections.Counter()
    symbols: collections.Counter[str] = collections.Counter()
    current: str | None = None
    first = False
    for line in out.splitlines():
        if not line.strip():
            current = None
            continue
        if not line.startswith(("\t", " ")) or re.match(r"^\s*\S.*\s\d+\s*$", line):
            match = re.match(r"\s*(.+?)\s+(\d+)\s*$", line)
            if match:
                comm, pid = match.group(1), int(match.group(2))
                current = None
                if pid in pids:
                    current = "qemu-nbd" if "qemu-nbd" in comm else ("QEMU" if "qemu" in comm else "vmsnap")
                first = True
            continue
        if current is None or not first:
            continue
        first = False
        symbol = re.sub(r"\+0x[0-9a-f]+", "", line.strip().split(None, 1)[-1])
        by_process[current] += 1
        category = _categorise(symbol)
        by_category[f"{current}: {category}"] += 1
        symbols[f"{current}: {symbol}"] += 1
    total = sum(by_process.values()) or 1
    return {
        "samples": total,
        "processes": {k: round(v / total, 3) for k, v in by_process.most_common()},
        "categories": {k: round(v / total, 3) for k, v in by_category.most_common()},
        "top_symbols": {k: round(v / total, 3) for k, v in symbols.most_common(15)},
    }


def run_one(
    source: str, op: str, work: Path, image: Path, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", "--source", source, "--op", op, "--work", str(work),
            "--image", str(image)]  # fmt: skip
    if args.pyspy:
        argv += ["--pyspy-out", str(Path(args.out) / f"flame-{tag}-{op}.svg")]
    perf = None
    if args.perf:
        perf = subprocess.Popen(
            ["perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", "499", "-o", str(work / f"{op}.perf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    if done.returncode != 0:
        raise RuntimeError(f"{tag} {op} failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if perf is not None:
        result["perf"] = perf_summary(work / f"{op}.perf", set(result["pids"]))
    return result


def markdown(document: dict[str, Any]) -> str:
    gib = document["data_bytes"] / GiB
    lines = [
        "# Where the data path's CPU goes",
        "",
        f"Written by `benchmarks/profile_data_path.py`; {document['when']}; load average "
        f"{document['load_at_start']} at the start on this 2-core machine (shared with other work: under "
        "load CPU seconds grow too, so compare the sources of one run, which took turns). Image: "
        f"{gib:.2f} GiB of random data in a 2 GiB qcow2; medians of {document['runs']} runs. CPU s/GiB: "
        "user + system time of vmsnap, of the qemu-nbd it started and of the QEMU serving the export, per "
        "GiB of data.",
        "",
        "| source | operation | wall (s) | vmsnap | qemu-nbd | QEMU | total CPU s/GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag, ops in document["sources"].items():
        for op, runs in ops.items():

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            total = med("vmsnap") + med("children") + med("qemu")
            cells = [med("wall"), med("vmsnap") / gib, med("children") / gib, med("qemu") / gib, total / gib]
            lines.append(f"| {tag} | {op} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    profiled = [(t, op, r[-1]["perf"]) for t, ops in document["sources"].items() for op, r in ops.items()
                if r and "perf" in r[-1]]  # fmt: skip
    if profiled:
        lines += ["", "## perf: share of each process's samples by what they were doing (last run)", ""]
        for tag, op, perf in profiled:
            lines += [f"### {tag}: {op} ({perf['samples']} samples)", "", "| where | share |", "|---|---|"]
            lines += [f"| {k} | {v:.1%} |" for k, v in perf["categories"].items() if v >= 0.01]
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--pyspy-out", dest="pyspy_out", help=argparse.SUPPRESS)
    parser.add_argument("--source", action="append", default=[], help="NAME=DIR of a vmsnap checkout")
    parser.add_argument("--ops", default="backup,restore-qcow2,restore-raw")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--perf", action="store_true", help="profile with perf (system-wide, cpu-clock)")
    parser.add_argument("--pyspy", action="store_true", help="a py-spy flame graph per operation")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.child:
        args.source = args.source[0]
        args.pyspy = args.pyspy_out
        return child(args)
    here = str(Path(__file__).resolve().parent.parent)
    sources = dict(s.split("=", 1) for s in args.source) or {"this": here}
    args.out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_at_start": round(os.getloadavg()[0], 2),
        "runs": args.runs,
        "sources": {tag: {op: [] for op in args.ops.split(",")} for tag in sources},
    }
    sys.path.insert(0, here)
    from vmsnap.benchmark.workload import make_test_image

    with tempfile.TemporaryDirectory(prefix="vmsnap-profile-", dir="/var/tmp") as scratch:
        image = Path(scratch) / "source.qcow2"
        document["data_bytes"] = make_test_image(image, size_mib=2048, data_mib=1536)
        for run in range(args.runs):
            for tag, source in sources.items():
                work = Path(scratch) / tag
                work.mkdir(exist_ok=True)
                for op in args.ops.split(","):
                    last = run == args.runs - 1
                    keep = argparse.Namespace(
                        **{**vars(args), "pyspy": args.pyspy and last, "perf": args.perf and last}
                    )
                    result = run_one(source, op, work, image, keep, tag)
                    document["sources"][tag][op].append(result)
                    figures = f"vmsnap {result['vmsnap']:5.2f} qemu-nbd {result['children']:5.2f}"
                    print(
                        f"{tag:8} {op:14} wall {result['wall']:6.2f} s {figures} QEMU {result['qemu']:5.2f}"
                    )
    (args.out / "data-path-profile.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "data-path-profile.md").write_text(markdown(document))
    print(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
