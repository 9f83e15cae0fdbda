"""The chunks layout's own figures, for the throughput run: how little a clone of a backed-up VM stores, how
well a real guest filesystem compresses, and the memory a backup of a huge sparse disk takes.

- Dedup: the throughput image is copied (a clone of the VM's disk), a little is written into the copy, and
  the copy is backed up into the repository that already holds the original: the new bytes stored, as a
  fraction of the copy's data.
- Compression: the lab guest's root filesystem (its initramfs tree: busybox, qemu-ga, e2fsprogs, lvm2 and
  their libraries, kernel modules) in an ext4 image (``mkfs.ext4 -d``), backed up into a new repository:
  the bytes of data over the bytes stored.
- Memory: a backup of a sparse qcow2 of 64 GiB (256 MiB of data) in a process of its own: its peak RSS
  (``VmHWM``), median of the runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.errors import VmsnapError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.runner import LocalRunner
from vmsnap.vm.machine import OfflineMachine, QemuMachine

MiB = 1024 * 1024
GiB = 1024 * MiB


def _stored(result: Any) -> tuple[int, int]:
    """(logical bytes, new bytes stored) of a chunks backup's result."""
    logical = sum(d.chunks.logical_size for d in result.disks if d.chunks is not None)
    return logical, sum(d.bytes_written for d in result.disks)


def dedup_of_a_clone(workdir: Path, source: Path, repo: Path, *, changed_mib: int = 8) -> dict[str, Any]:
    """Back up a clone of ``source`` (``changed_mib`` written into it) into ``repo``, which holds backups of
    ``source`` already; the new bytes as a fraction of the clone's data."""
    clone = workdir / "clone.qcow2"
    LocalRunner().run(["cp", "--sparse=always", str(source), str(clone)], timeout=1200)
    process = QemuProcess(workdir / "qemu-clone", [DriveSpec(clone, "disk0")], name="benchclone").start()
    machine = QemuMachine(process.qmp_socket)
    try:
        for n in range(changed_mib // 4):
            qemu_io(machine.qmp(), "disk0", f"write -P {0x70 + n} {(n * 37 % 64) * 4 * MiB + MiB} 4M")
        result = Backup(machine, BackupConfig(repo=repo, strategy="backup", quiesce="off")).run()
    finally:
        machine.close()
        process.stop()
    clone.unlink()
    logical, new = _stored(result)
    return {
        "clone_data_bytes": logical,
        "changed_bytes": changed_mib * MiB,
        "new_bytes": new,
        "new_fraction": round(new / logical, 4) if logical else None,
    }


def lab_compression(workdir: Path, *, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The compression ratio of the lab guest's filesystem in a chunks repository (None when the lab guest
    cannot be built here)."""
    from vmsnap.lab.image import build_lab_image

    try:
        lab = build_lab_image()
    except VmsnapError as err:
        return {"ratio": None, "skipped": err.message}
    tree = workdir / "lab-root"
    tree.mkdir()
    with open(lab.initrd, "rb") as archive:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=archive, cwd=tree, check=True)
    shutil.copy(lab.kernel, tree / "vmlinux")
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    raw = workdir / "lab-fs.raw"
    size_mib = max(64, used * 2 // MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw), f"{size_mib}M"], check=True)
    image = workdir / "labfs.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    shutil.rmtree(tree)
    repo = workdir / "repo-lab"
    result = Backup(OfflineMachine([image]), BackupConfig(repo=repo, strategy="internal")).run()
    logical, new = _stored(result)
    progress(f"lab guest filesystem: {logical / MiB:.1f} MiB of data stored in {new / MiB:.1f} MiB")
    shutil.rmtree(repo)
    image.unlink()
    return {
        "filesystem_mib": size_mib,
        "files_bytes": used,
        "data_bytes": logical,
        "stored_bytes": new,
        "ratio": round(logical / new, 2) if new else None,
        "kernel_package": lab.kernel_package,
    }


def sparse_backup_memory(
    workdir: Path, *, size_gib: int = 64, data_mib: int = 256, runs: int = 3,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:  # fmt: skip
    """Peak RSS of a process backing up a sparse qcow2 of ``size_gib`` GiB with ``data_mib`` of data."""
    image = workdir / "sparse.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{size_gib}G"], check=True)
    step = size_gib * GiB // (data_mib // 4)
    commands = [a for n in range(data_mib // 4) for a in ("-c", f"write -P {n % 250 + 1} {n * step} 4M")]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(image)], check=True, capture_output=True)
    samples = []
    for n in range(runs):
        repo = workdir / f"repo-sparse{n}"
        argv = [sys.executable, "-m", "vmsnap.benchmark.chunks_figures", str(image), str(repo)]
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        samples.append(json.loads(done.stdout))
        shutil.rmtree(repo)
    image.unlink()
    peak = statistics.median(s["peak_rss_mib"] for s in samples)
    progress(f"backup of a {size_gib} GiB sparse disk: peak RSS {peak:.0f} MiB")
    return {
        "size_gib": size_gib,
        "data_mib": data_mib,
        "peak_rss_mib": round(peak, 1),
        "seconds": round(statistics.median(s["seconds"] for s in samples), 3),
        "runs": samples,
    }


def _peak_rss_child(image: Path, repo: Path) -> dict[str, Any]:
    """In a child process: back the image up, report peak RSS (VmHWM: this process only) and seconds."""
    import time

    started = time.monotonic()
    Backup(OfflineMachine([image]), BackupConfig(repo=repo, strategy="internal")).run()
    seconds = time.monotonic() - started
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return {"peak_rss_mib": int(line.split()[1]) / 1024, "seconds": seconds}
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    os.environ.setdefault("VMSNAP_STATE_DIR", tempfile.mkdtemp(prefix="vmsnap-bench-state-"))
    print(json.dumps(_peak_rss_child(Path(sys.argv[1]), Path(sys.argv[2]))))
