"""How long until a backup is useful again: time to the first file read (``vmsnap mount``) and to the guest
agent answering (``vmsnap instant-restore``), against a full restore (``vmsnap restore``) of the same backup —
for a 2 GiB and a 32 GiB disk that hold the same data (sparse: same files, more empty space).

Run as root on a host with QEMU, qemu-storage-daemon, FUSE and loop devices::

    .venv/bin/python benchmarks/restore_latency.py [--set DATA_MIB:SIZES:RUNS ...] [--layout chunks|qcow2]

Each ``--set`` (default ``256:2,32:3`` and ``1024:2:1``: 256 MiB of files on a 2 GiB and a 32 GiB disk, 3
runs each; 1 GiB on a 2 GiB disk, one run) builds, per disk size in GiB, a plain ext4 disk image with that
many MiB of random files, backs it up with ``vmsnap backup --image`` into a fresh repository of ``--layout``
(``vmsnap init``), then measures (medians of its runs), every step a ``vmsnap`` process as a user runs it
(``VMSNAP_RUN_DIR`` private to the run):

- ``mount → first read``: ``vmsnap mount`` until one file's bytes are read back;
- ``full restore → first read``: ``vmsnap restore`` (convert, read back, checksum), then the restored image
  mounted the same way (FUSE + loop, through :func:`vmsnap.restore.mount.mount`: there is no command that
  mounts a bare image) and the same file read — so this column has no command start-up for the mount;
- ``instant → agent``: ``vmsnap instant-restore --repo … --to DIR`` (prepare), then the lab guest booted on
  the prepared image until its guest agent answers;
- ``full restore → agent``: ``vmsnap restore``, then the same boot on the restored image;
- ``stream``: ``vmsnap instant-restore --to DIR --qmp SOCKET`` after the instant start (unthrottled), for
  reference.

The lab guest boots under TCG unless KVM is hardware-backed, so its boot time dominates both agent
numbers; the difference between them is what the restore costs before the VM can start.

It writes ``benchmarks/results/restore-latency.json`` and ``restore-latency.md`` whole (``--out DIR``
elsewhere): the command line, the host, every set's medians and the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import build_lab_image
from vmsnap.lab.qemu import DriveSpec, choose_accel
from vmsnap.restore.mount import mount, umount
from vmsnap.restore.source import ImageSource

MiB = 1024 * 1024
VMSNAP = str(Path(sys.executable).with_name("vmsnap"))


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def vmsnap(*argv: str | Path, run_dir: Path) -> dict[str, Any]:
    """``vmsnap ARGV --json`` as a process; its JSON object (exits on failure with vmsnap's error line)."""
    done = subprocess.run(
        [VMSNAP, *map(str, argv), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "VMSNAP_RUN_DIR": str(run_dir)},
    )
    if done.returncode != 0:
        raise SystemExit(f"vmsnap {argv[0]} failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def build_disk(path: Path, size_gib: int, data_mib: int) -> None:
    """A plain ext4 disk of ``size_gib`` GiB (sparse) with ``data_mib`` MiB of files (seeded, so every size
    holds the same bytes)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as out:
        out.truncate(size_gib * 1024 * MiB)
    run("mkfs.ext4", "-q", "-L", "data", str(raw))
    with tempfile.TemporaryDirectory(prefix="bench-") as target:
        run("mount", "-o", "loop", str(raw), target)
        try:
            seed = b"vmsnap-restore-latency"
            for index in range(max(1, data_mib // 16)):
                block = bytearray()
                counter = 0
                while len(block) < 16 * MiB:
                    block += hashlib.sha512(
                        seed + index.to_bytes(4, "big") + counter.to_bytes(8, "big")
                    ).digest()
                    counter += 1
                Path(target, f"file{index:03d}.bin").write_bytes(bytes(block[: 16 * MiB]))
            Path(target, "hello.txt").write_text("hello from the backup\n")
        finally:
            run("umount", target)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


def timed(action: Callable[[], None]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def measure(size_gib: int, data_mib: int, runs: int, work: Path, layout: str) -> dict[str, float]:
    disk = work / "data.qcow2"
    build_disk(disk, size_gib, data_mib)
    repo = work / "repo"
    run_root = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    vmsnap("init", "--repo", repo, "--layout", layout, run_dir=run_root)
    backup_id = vmsnap("backup", "--repo", repo, "--image", disk, "--name", "bench", run_dir=run_root)[
        "backup_id"
    ]
    named = ["--repo", repo, "--vm", "bench", "--backup", backup_id]
    image = build_lab_image()
    results: dict[str, list[float]] = {
        k: [] for k in ("mount", "restore_read", "instant", "restore_boot", "stream")
    }
    for attempt in range(runs):
        target = work / f"m{attempt}"
        target.mkdir()

        def mount_and_read(target: Path = target) -> None:
            made = vmsnap("mount", *named, target, run_dir=run_root)
            (Path(made["partitions"][0]["path"]) / "hello.txt").read_bytes()

        results["mount"].append(timed(mount_and_read))
        vmsnap("umount", target, run_dir=run_root)

        restored = work / f"restored{attempt}"

        def restore_and_read(restored: Path = restored, target: Path = target) -> None:
            vmsnap("restore", *named, "--to", restored, run_dir=run_root)
            # the same way to the file as above (this host has no kernel NBD), so only the restore differs
            result = mount(ImageSource(restored / "data.qcow2"), target, run_dir=run_root / "mounts")
            (result.partitions[0].path / "hello.txt").read_bytes()

        results["restore_read"].append(timed(restore_and_read))
        umount(target, run_dir=run_root / "mounts")

        to = work / f"instant{attempt}"
        started = time.monotonic()
        prepared = vmsnap("instant-restore", *named, "--to", to, run_dir=run_root)
        drive = DriveSpec(Path(prepared["disks"][0]["image"]), "data", serial="data")
        with LabGuest(work / f"g{attempt}", image=image, data_disk_size=None, extra_drives=[drive]) as guest:
            results["instant"].append(time.monotonic() - started)
            copy_started = time.monotonic()
            vmsnap("instant-restore", "--to", to, "--qmp", guest.qmp_socket, run_dir=run_root)
            results["stream"].append(time.monotonic() - copy_started)

        started = time.monotonic()
        again = work / f"restored-b{attempt}"
        vmsnap("restore", *named, "--to", again, run_dir=run_root)
        drive = DriveSpec(again / "data.qcow2", "data", serial="data")
        with LabGuest(work / f"h{attempt}", image=image, data_disk_size=None, extra_drives=[drive]):
            results["restore_boot"].append(time.monotonic() - started)
        for path in (restored, to, again):
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(run_root, ignore_errors=True)
    return {key: statistics.median(values) for key, values in results.items()}


COLUMNS = (
    ("mount", "mount → first file read"),
    ("restore_read", "full restore → first file read"),
    ("instant", "instant → agent answers"),
    ("restore_boot", "full restore → agent answers"),
    ("stream", "stream (reference)"),
)


def parse_set(text: str) -> tuple[int, list[int], int]:
    """``DATA_MIB:SIZES:RUNS`` (``256:2,32:3``) → (256, [2, 32], 3)."""
    try:
        data, sizes, runs = text.split(":")
        return int(data), [int(size) for size in sizes.split(",")], int(runs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not DATA_MIB:SIZES:RUNS, e.g. 256:2,32:3") from None


def markdown(document: dict[str, Any]) -> str:
    """The results as the Markdown table docs/restore.md quotes."""
    lines = [
        "# How long until a backup is useful again",
        "",
        f"`{document['command']}` on {document['host']} (load average {document['load']}), "
        f"{document['when']}; a {document['layout']} repository; medians, in seconds.",
        "",
        "| data on the disk | disk | runs | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for entry in document["seconds"]:
        data = f"{entry['data_mib']} MiB" if entry["data_mib"] < 1024 else f"{entry['data_mib'] // 1024} GiB"
        for size, row in entry["results"].items():
            cells = " | ".join(f"{row[key]:.2f}" for key, _ in COLUMNS)
            lines.append(f"| {data} | {size} GiB | {entry['runs']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--set",
        dest="sets",
        type=parse_set,
        action="append",
        metavar="DATA_MIB:SIZES:RUNS",
        help="MiB of files, disk sizes in GiB, runs (repeat; default 256:2,32:3 and 1024:2:1)",
    )
    parser.add_argument("--layout", choices=("chunks", "qcow2"), default="chunks")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts loop devices")
    sets = args.sets or [parse_set("256:2,32:3"), parse_set("1024:2:1")]
    accel = choose_accel(booting_guest=True).upper()
    document: dict[str, Any] = {
        "command": " ".join(["benchmarks/restore_latency.py", *sys.argv[1:]]),
        "host": f"{os.cpu_count()} cores, {platform.machine()}, the lab guest under {accel}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": round(os.getloadavg()[0], 1),
        "layout": args.layout,
        "seconds": [],
    }
    for data_mib, sizes, runs in sets:
        table = {}
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="restore-latency-", dir="/var/tmp") as work:
                table[str(size)] = measure(size, data_mib, runs, Path(work), args.layout)
        document["seconds"].append({"data_mib": data_mib, "runs": runs, "results": table})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restore-latency.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "restore-latency.md").write_text(markdown(document))
    print(markdown(document))


if __name__ == "__main__":
    main()
