"""Throughput of the chunks backup pipeline and restore against qemu-img convert, on one image.

    python benchmarks/chunks_pipeline.py [--workdir DIR] [--size-gib 2] [--random-gib 1.5] [--runs 3]

The image: a qcow2 of ``--size-gib`` GiB holding ``--random-gib`` GiB of random data (no two chunks alike),
then 128 MiB of zeros written as data (read, then found to be zero), 128 MiB of zero clusters (``write -z``:
never read) and holes. Every measured run happens in a child process (its own peak RSS); the image is in the
page cache after the first run, so all methods read warm. Reported: the median of ``--runs`` runs, in MiB of
virtual size per second and MiB of data read per second, and the CPU time each run cost (the child, its
commands and the qemu-nbd it started, which it reaps as a subreaper) per GiB of data: on a shared machine the
wall times move with the load, the CPU cost much less; ``cores / (CPU s per GiB)`` bounds the throughput.

Measured:
- ``qemu-img convert -O raw`` to ``null-co`` (reads only) and to a file (reads and writes), the baselines;
- the pipeline over NBD (qemu-nbd) with 1/2/4 connections x 2/4 workers into a store that discards blobs
  (the pipeline's own cost), then into a LocalStore on disk (durable: fsync per blob), plain and encrypted;
- restore from the LocalStore to a sparse raw file, to a qcow2 through a writable qemu-nbd, and to a qcow2
  by writing raw and running ``qemu-img convert`` (the alternative restore.py did not choose).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vmsnap.errors import NotFoundError
from vmsnap.repo.chunks.blob import ChunkCodec
from vmsnap.repo.chunks.index import decode_index, encode_index
from vmsnap.repo.chunks.keys import create_key_file, read_key_file
from vmsnap.repo.chunks.pipeline import backup_disk
from vmsnap.repo.chunks.readers import open_image
from vmsnap.repo.chunks.restore import restore_disk
from vmsnap.repo.stores.base import StoreBase, StoredObject
from vmsnap.repo.stores.local import LocalStore

MiB = 1024 * 1024
GiB = 1024 * MiB


class NullStore(StoreBase):
    """A Store that keeps nothing: the pipeline's cost without the storage's."""

    url = "null://"

    def __init__(self) -> None:
        self.bytes = 0

    def get(self, key: str) -> bytes:
        raise NotFoundError(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, durable: bool = True) -> bool:
        self.bytes += len(data)
        return True

    def sync(self) -> None:
        pass

    def exists(self, key: str) -> bool:
        return False

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        return iter(())

    def delete(self, key: str) -> None:
        pass


def build_image(workdir: Path, size: int, random_bytes: int) -> Path:
    image = workdir / "source.qcow2"
    if image.exists():
        return image
    raw = workdir / "source.raw"
    with open(raw, "wb") as out:
        out.truncate(size)
        left = random_bytes
        while left:
            piece = os.urandom(min(64 * MiB, left))
            out.write(piece)
            left -= len(piece)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    zeros_at = random_bytes
    subprocess.run(
        [
            "qemu-io", "-f", "qcow2",
            "-c", f"write -P 0 {zeros_at} {128 * MiB}",
            "-c", f"write -z {zeros_at + 128 * MiB} {128 * MiB}",
            str(image),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return image


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """CPU time of this process and of every child it reaped."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def become_subreaper() -> None:
    """Adopt orphaned descendants (qemu-nbd --fork), so their CPU time is counted once they are reaped."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def child(spec: dict[str, object]) -> dict[str, object]:
    """One measured run (in a child process)."""
    become_subreaper()
    cpu_before = cpu_seconds()
    kind = spec["kind"]
    workdir = Path(str(spec["workdir"]))
    image = workdir / "source.qcow2"
    key = read_key_file(workdir / "bench.key") if spec.get("encrypted") else None
    codec = ChunkCodec(key)
    started = time.monotonic()
    result: dict[str, object] = {}
    if kind == "backup":
        store = NullStore() if spec["store"] == "null" else LocalStore(workdir / "store", create=True)
        with open_image(image, "qcow2", connections=int(str(spec["connections"]))) as reader:
            backup = backup_disk(reader, store, codec, workers=int(str(spec["workers"])))
        if spec["store"] != "null":
            (workdir / "index").write_bytes(encode_index(backup.index, key))
        result = {
            "read": backup.stats.bytes_read,
            "stored": backup.stats.new_bytes,
            "size": backup.index.virtual_size,
        }
    elif kind == "restore":
        store = LocalStore(workdir / "store")
        index = decode_index((workdir / "index").read_bytes(), key)
        target = workdir / f"restored.{spec['format']}"
        fmt = "qcow2" if spec["format"] == "qcow2" else "raw"
        if spec["format"] == "raw+convert":
            staging = workdir / "staging.raw"
            restore_disk(index, store, codec, staging, workers=int(str(spec["workers"])))
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(staging), str(target)], check=True
            )
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            staging.unlink()
        else:
            restore_disk(index, store, codec, target, format=fmt, workers=int(str(spec["workers"])))  # type: ignore[arg-type]
        result = {"size": index.virtual_size, "read": index.data_bytes()}
        target.unlink()
    elif kind == "convert":
        size = int(str(spec["size"]))
        if spec["target"] == "null":
            argv = ["qemu-img", "convert", "-n", "-f", "qcow2", "--target-image-opts", str(image)]
            argv.append(f"driver=null-co,size={size}")
        else:
            argv = [
                "qemu-img",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                str(image),
                str(workdir / "convert.raw"),
            ]
        subprocess.run(argv, check=True)
        if spec["target"] != "null":
            fd = os.open(workdir / "convert.raw", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            (workdir / "convert.raw").unlink()
        result = {"size": size, "read": int(str(spec["data"]))}
    result["seconds"] = time.monotonic() - started
    reap()
    result["cpu"] = cpu_seconds() - cpu_before
    result["maxrss_mib"] = peak_rss() / MiB
    return result


def measure(spec: dict[str, object], runs: int) -> dict[str, object]:
    samples = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            check=True,
            capture_output=True,
            text=True,
        )
        samples.append(json.loads(out.stdout))
    seconds = statistics.median(float(s["seconds"]) for s in samples)
    cpu = statistics.median(float(s["cpu"]) for s in samples)
    size, read = float(samples[0]["size"]), float(samples[0]["read"])
    return {
        **spec,
        "seconds": round(seconds, 3),
        "runs": [round(float(s["seconds"]), 3) for s in samples],
        "virtual_mib_s": round(size / MiB / seconds),
        "data_mib_s": round(read / MiB / seconds),
        "cpu_s_per_gib": round(cpu / (read / GiB), 2),
        "maxrss_mib": round(max(float(s["maxrss_mib"]) for s in samples)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--random-gib", type=float, default=1.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmsnap-bench-chunks-"))
    workdir.mkdir(parents=True, exist_ok=True)
    size, random_bytes = int(args.size_gib * GiB), int(args.random_gib * GiB)
    if random_bytes + 256 * MiB > size:
        parser.error("--size-gib must leave 256 MiB after --random-gib (zeros as data, zero clusters)")
    image = build_image(workdir, size, random_bytes)
    if not (workdir / "bench.key").exists():
        create_key_file(workdir / "bench.key")
    data = random_bytes + 128 * MiB  # what a reader must read: the random data and the zeros written as data
    subprocess.run(["cat", str(image)], check=True, stdout=subprocess.DEVNULL)  # warm the page cache
    base = {"workdir": str(workdir)}
    plan: list[dict[str, object]] = [
        {**base, "kind": "convert", "target": "null", "size": size, "data": data},
        {**base, "kind": "convert", "target": "file", "size": size, "data": data},
    ]
    configs = [(2, 4)] if args.quick else [(c, w) for c in (1, 2, 4) for w in (2, 4)]
    plan += [{**base, "kind": "backup", "store": "null", "connections": c, "workers": w} for c, w in configs]
    plan += [{**base, "kind": "backup", "store": "null", "connections": 2, "workers": 4, "encrypted": True}]
    load_before = os.getloadavg()[0]
    results = [measure(spec, args.runs) for spec in plan]
    for encrypted in (False, True):
        shutil.rmtree(workdir / "store", ignore_errors=True)
        spec = {
            **base,
            "kind": "backup",
            "store": "local",
            "connections": 2,
            "workers": 4,
            "encrypted": encrypted,
        }
        results.append(measure(spec, 1))  # the first run stores; later ones would only deduplicate
        if encrypted:
            break
        for fmt in ("raw", "qcow2", "raw+convert"):
            results.append(measure({**base, "kind": "restore", "format": fmt, "workers": 4}, args.runs))
    shutil.rmtree(workdir / "store", ignore_errors=True)
    width = max(len(_label(r)) for r in results)
    print(f"{'run':<{width}}  median s  virtual MiB/s  data MiB/s  CPU s/GiB  peak RSS MiB  runs")
    for r in results:
        print(
            f"{_label(r):<{width}}  {r['seconds']:8.2f}  {r['virtual_mib_s']:13}  {r['data_mib_s']:10}  "
            f"{r['cpu_s_per_gib']:9}  {r['maxrss_mib']:12}  {r['runs']}"
        )
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    print(load)
    (workdir / "results.json").write_text(json.dumps({"load": load, "results": results}, indent=1))
    print(f"results: {workdir / 'results.json'}")
    return 0


def _label(r: dict[str, object]) -> str:
    if r["kind"] == "convert":
        return f"qemu-img convert -O raw -> {r['target']}"
    if r["kind"] == "restore":
        return f"restore -> {r['format']} ({r['workers']} workers)"
    enc = " encrypted" if r.get("encrypted") else ""
    return f"backup -> {r['store']} store{enc}, {r['connections']} conn x {r['workers']} workers"


if __name__ == "__main__":
    sys.exit(main())
