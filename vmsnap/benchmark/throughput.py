"""Backup throughput against the practical limit (``qemu-img convert``, ``cp --sparse``) and the peers.

One run measures everything side by side on the same image: a 2 GiB qcow2 holding 1.5 GiB of incompressible
data at scattered offsets (holes left between), attached to a real QEMU. Both repository layouts are measured
(chunks: QEMU's backup job in pull mode read by the chunk pipeline into a local store; qcow2: the job writes
the image, push), and the chunks layout's own figures (dedup of a clone, compression of the lab guest's
filesystem, peak memory of a 64 GiB sparse disk; :mod:`vmsnap.benchmark.chunks_figures`). Results are quoted
as ratios, with the CPU seconds of every process involved (:mod:`vmsnap.benchmark.cpu`).

The VM runs no guest system: its vCPU would only spin in the firmware, which looks for something to boot —
measured at 0.7 CPU s per second here (nested KVM emulates that real-mode loop), a third of this 2-core
machine taken from whatever is measured while the VM exists, and charged to vmsnap's CPU figures. A real
guest idles in HLT instead, so the vCPUs are stopped (QMP ``stop``) while measuring; QEMU's block layer, its
NBD server and the backup jobs work the same for a paused VM (``pause_guest=False`` measures with it
running).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs

from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.benchmark.cpu import CpuMeter, adopting_orphans
from vmsnap.benchmark.peers import run_peers
from vmsnap.benchmark.workload import (
    DURABLE_COPY,
    MiB,
    ThroughputFigure,
    filesystem_image,
    incremental_writes,
    make_test_image,
)
from vmsnap.errors import VmsnapError
from vmsnap.files import fsync_file
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.layout import layout_class
from vmsnap.repo.marker import DEFAULT_LAYOUT
from vmsnap.repo.repository import Repository
from vmsnap.repo.state import STATE_ENV
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.machine import QemuMachine

__all__ = ["ThroughputBench", "ThroughputFigure", "make_test_image", "run_throughput"]

T = TypeVar("T")


@attrs.define
class ThroughputBench:
    """vmsnap's full backup, incremental and restore against qemu-img convert and cp, side by side.

    :param workdir: scratch (needs about 4x the data size free)
    :param size_mib / data_mib: the test image (2048 / 1536 as the issue asks; smaller for --quick)
    :param runs: repetitions; medians are reported
    :param chunk_figures: also measure the dedup of a clone (:mod:`vmsnap.benchmark.chunks_figures`)
    :param layouts: the repository layouts to measure
    :param pause_guest: stop the VM's vCPUs while measuring (see the module docstring)
    """

    workdir: Path
    size_mib: int = 2048
    data_mib: int = 1536
    incremental_mib: int = 100
    runs: int = 3
    runner: Runner = attrs.Factory(LocalRunner)
    progress: Callable[[str], None] = lambda line: None
    figures: list[ThroughputFigure] = attrs.Factory(list)
    chunk_figures: bool = True
    filesystem: bool = True
    layouts: tuple[str, ...] = ("chunks", "qcow2")
    pause_guest: bool = True
    extra: dict[str, Any] = attrs.Factory(dict)
    _qemu: list[int] = attrs.Factory(list)
    _meter: CpuMeter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._meter = CpuMeter(pids=lambda: self._qemu, keep=lambda: self._qemu)

    def _time(
        self, name: str, data_bytes: int, one: Callable[[int], tuple[float, float]]
    ) -> ThroughputFigure:
        """Run ``one(i)`` (returning wall and CPU seconds) ``runs`` times; record the medians."""
        values = [one(i) for i in range(self.runs)]
        figure = ThroughputFigure(
            name,
            statistics.median(v[0] for v in values),
            tuple(round(v[0], 4) for v in values),
            data_bytes,
            round(statistics.median(v[1] for v in values), 4),
        )
        self.figures.append(figure)
        self.progress(_line(figure))
        return figure

    def _measure(self, action: Callable[[], T]) -> tuple[T, float, float]:
        """``action``'s result, wall and CPU seconds (CPU: every process involved, see :class:`CpuMeter`)."""
        cpu = self._meter.now()
        started = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - started
        return result, seconds, self._meter.now() - cpu

    def _timed(self, action: Callable[[], Any]) -> tuple[float, float]:
        """Wall and CPU seconds of ``action``."""
        _, seconds, cpu = self._measure(action)
        return seconds, cpu

    @contextmanager
    def _vm(self, image: Path) -> Iterator[QemuMachine]:
        process = QemuProcess(self.workdir / "qemu", [DriveSpec(image, "disk0")], name="benchvm").start()
        machine = QemuMachine(process.qmp_socket)
        if process.pid is not None:
            self._qemu.append(process.pid)  # it serves the pull backups' NBD exports: its CPU counts
        if self.pause_guest:
            machine.qmp().stop()
        try:
            yield machine
        finally:
            self._qemu.clear()
            machine.close()
            process.stop()

    def run(self) -> None:
        """Measure every figure (see the module docstring)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        source = self.workdir / "source.qcow2"
        self.progress(f"making a {self.size_mib} MiB image with {self.data_mib} MiB of random data …")
        data = make_test_image(source, size_mib=self.size_mib, data_mib=self.data_mib)
        self._time(
            DURABLE_COPY, data, self._copy_run(source, "convert", ["qemu-img", "convert", "-O", "qcow2"])
        )
        self._time("cp --sparse=always", data, self._copy_run(source, "cp", ["cp", "--sparse=always"]))
        with self._vm(source) as machine:
            for layout in self.layouts:
                self._layout(machine, source, layout, data)
            if self.chunk_figures:
                from vmsnap.benchmark.chunks_figures import dedup_of_a_clone

                self.extra["dedup"] = dedup_of_a_clone(self.workdir, source, self.workdir / "repo-chunks")
        if self.filesystem:
            self._filesystem()

    def _filesystem(self) -> None:
        """The full backup of a real filesystem (ext4 holding /usr/share) against its durable copy."""
        raw, image = self.workdir / "fs.raw", self.workdir / "fs.qcow2"
        filesystem_image(raw, size_mib=self.size_mib)
        self.runner.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], timeout=1200)
        raw.unlink()
        data = _allocated(image, self.runner)
        self._time(
            f"{DURABLE_COPY}, filesystem",
            data,
            self._copy_run(image, "convert-fs", ["qemu-img", "convert", "-O", "qcow2"]),
        )
        with self._vm(image) as machine:

            def full(i: int) -> tuple[float, float]:
                repo = self.workdir / f"repo-fs{i}"
                Repository.init(repo, layout="chunks")
                config = BackupConfig(repo=repo, strategy="backup", quiesce="off")
                measured = self._timed(lambda: Backup(machine, config).run())
                shutil.rmtree(repo)
                return measured

            self._time("vmsnap full backup (chunks, pull), filesystem", data, full)
        image.unlink()

    def _layout(self, machine: QemuMachine, source: Path, layout: str, data: int) -> None:
        """Full backups, incrementals and a restore into a repository of ``layout``."""
        traits = layout_class(layout)
        mode = "pull" if traits.reads_exports else "push"
        key_file = self.workdir / "bench.key"
        # the figures are the default layout's: it alone is measured encrypted and restored to raw
        default = layout == DEFAULT_LAYOUT

        def full(i: int, encrypt: bool = False) -> tuple[float, float]:
            repo = self.workdir / f"repo-full-{layout}{i}"
            Repository.init(repo, layout=layout, encrypt=encrypt, key_file=key_file if encrypt else None)
            config = BackupConfig(
                repo=repo, strategy="backup", quiesce="off", key_file=key_file if encrypt else None
            )
            measured = self._timed(lambda: Backup(machine, config).run())
            shutil.rmtree(repo)
            return measured

        self._time(f"vmsnap full backup ({layout}, {mode})", data, full)
        if default and traits.encrypts:
            self._time(
                f"vmsnap full backup ({layout}, {mode}, encrypted)", data, lambda i: full(i, encrypt=True)
            )
        repo = self.workdir / f"repo-{layout}"
        Repository.init(repo, layout=layout)
        config = BackupConfig(repo=repo, strategy="backup", quiesce="off")
        Backup(machine, config).run()
        incremental: list[tuple[float, float]] = []
        for writes in incremental_writes(
            size_mib=self.size_mib, incremental_mib=self.incremental_mib, runs=max(3, self.runs)
        ):
            for write in writes:
                qemu_io(machine.qmp(), "disk0", write)
            result, seconds, cpu = self._measure(Backup(machine, attrs.evolve(config, incremental=True)).run)
            incremental.append((seconds, cpu))
            if result.kind != "incremental":
                raise VmsnapError(
                    f"the benchmark's incremental backup was a {result.kind} one: {result.notes}",
                    hint="an incremental figure needs the backup strategy's dirty bitmap; see the notes",
                )
        figure = ThroughputFigure(
            f"vmsnap incremental {layout} ({self.incremental_mib} MiB changed)",
            statistics.median(v[0] for v in incremental),
            tuple(round(v[0], 4) for v in incremental),
            self.incremental_mib * MiB,
            round(statistics.median(v[1] for v in incremental), 4),
        )
        self.figures.append(figure)
        self.progress(_line(figure))
        repository = Repository.open(repo, runner=self.runner)
        vm = repository.vms()[0]

        def restore(i: int, format: str = "qcow2") -> tuple[float, float]:
            target = self.workdir / f"restore{i}"
            measured = self._timed(lambda: repository.restore(vm, None, target, format=format))  # type: ignore[arg-type]
            for child in target.iterdir():
                child.unlink()
            target.rmdir()
            return measured

        what = "full + 3 incrementals" if traits.chains else "one index"
        self._time(f"vmsnap restore {layout} ({what})", data, restore)
        if default:
            self._time(f"vmsnap restore {layout} to raw ({what})", data, lambda i: restore(i, "raw"))

    def _copy_run(self, source: Path, name: str, argv: list[str]) -> Callable[[int], tuple[float, float]]:
        """One timed run of ``argv SOURCE TARGET`` (a copy tool), the target fsync'd and removed after."""

        def one(i: int) -> tuple[float, float]:
            target = self.workdir / f"{name}{i}.qcow2"

            def go() -> None:
                self.runner.run([*argv, str(source), str(target)], timeout=1200)
                fsync_file(target)

            measured = self._timed(go)
            target.unlink()
            return measured

        return one

    def ratios(self) -> dict[str, float]:
        """The figures the issue asks for, as ratios against the durable copy (above 1: faster) and CPU
        seconds per GiB."""
        by = {f.name: f for f in self.figures}
        limit = by[DURABLE_COPY].seconds

        def named(name: str) -> float:
            return by[name].seconds

        def cpu(name: str) -> float:
            return by[name].cpu_per_gib or 0.0

        full, encrypted = "vmsnap full backup (chunks, pull)", "vmsnap full backup (chunks, pull, encrypted)"
        restore, raw = "vmsnap restore chunks (one index)", "vmsnap restore chunks to raw (one index)"
        out = {
            "full_backup_vs_convert": limit / named(full),
            "encrypted_vs_unencrypted_full_backup": named(full) / named(encrypted),
            "full_backup_cpu_s_per_gib": cpu(full),
            "encrypted_full_backup_cpu_s_per_gib": cpu(encrypted),
            "restore_vs_convert": limit / named(restore),
            "restore_raw_vs_convert": limit / named(raw),
            "restore_cpu_s_per_gib": cpu(restore),
            "restore_raw_cpu_s_per_gib": cpu(raw),
            "incremental_seconds": named("vmsnap incremental chunks (100 MiB changed)"),
            "cp_vs_convert": limit / by["cp --sparse=always"].seconds,
        }
        if "vmsnap full backup (qcow2, push)" in by:
            out["qcow2_full_backup_vs_convert"] = limit / named("vmsnap full backup (qcow2, push)")
            out["qcow2_restore_vs_convert"] = limit / named("vmsnap restore qcow2 (full + 3 incrementals)")
            out["qcow2_incremental_seconds"] = named("vmsnap incremental qcow2 (100 MiB changed)")
        fs = "vmsnap full backup (chunks, pull), filesystem"
        if fs in by:
            out["filesystem_full_backup_vs_convert"] = by[f"{DURABLE_COPY}, filesystem"].seconds / named(fs)
        dedup = self.extra.get("dedup")
        if dedup:
            out["clone_new_bytes_fraction"] = float(dedup["new_fraction"])
        return {k: round(v, 3) for k, v in out.items()}


TARGETS = {
    "full_backup_vs_convert": ">= 0.9",
    "filesystem_full_backup_vs_convert": ">= 1.0",
    "encrypted_vs_unencrypted_full_backup": ">= 0.9",
    "full_backup_cpu_s_per_gib": "<= 1.0",
    "encrypted_full_backup_cpu_s_per_gib": "<= 1.0",
    "restore_vs_convert": ">= 1.0",
    "restore_raw_vs_convert": ">= 1.0",
    "restore_cpu_s_per_gib": "<= 0.8",
    "restore_raw_cpu_s_per_gib": "<= 0.8",
    "incremental_seconds": "<= 0.25",
    "clone_new_bytes_fraction": "< 0.05",
}
"""The issue's targets (the report says of each whether it was met, or by how much it was missed)."""


def _allocated(image: Path, runner: Runner) -> int:
    """Bytes of data (allocated, not zero) in ``image``, from ``qemu-img map``."""
    import json

    spans = json.loads(runner.run(["qemu-img", "map", "--output=json", str(image)], timeout=120).stdout)
    return sum(int(s["length"]) for s in spans if s.get("data") and not s.get("zero"))


def _line(figure: ThroughputFigure) -> str:
    """One progress line: wall seconds, MB/s, CPU seconds (per GiB when it moved data)."""
    cpu = ""
    if figure.cpu_seconds is not None:
        per_gib = figure.cpu_per_gib
        cpu = f"  CPU {figure.cpu_seconds:6.2f} s" + (f" ({per_gib:4.2f} s/GiB)" if per_gib else "")
    return f"{figure.name:42} {figure.seconds:8.3f} s  {figure.mb_per_s:8.0f} MB/s{cpu}"


@contextmanager
def _state_dir(path: Path) -> Iterator[None]:
    """The scratch repositories' local state (journals, caches) in ``path`` for the run, not in
    /var/lib/vmsnap."""
    saved = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(STATE_ENV, None)
        else:
            os.environ[STATE_ENV] = saved


def _figure_json(figure: ThroughputFigure) -> dict[str, Any]:
    per_gib = figure.cpu_per_gib
    return attrs.asdict(figure) | {
        "mb_per_s": round(figure.mb_per_s, 1),
        "cpu_s_per_gib": round(per_gib, 3) if per_gib is not None else None,
    }


def run_throughput(
    *,
    quick: bool = False,
    runs: int = 3,
    workdir: Path | None = None,
    peers: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the throughput benchmark and return its JSON document.

    :param peers: also measure virtnbdbackup (needs libvirt and the virtnbdbackup package)
    """
    load = round(os.getloadavg()[0], 2)
    with (
        tempfile.TemporaryDirectory(prefix="vmsnap-throughput-", dir=workdir or "/var/tmp") as scratch,
        _state_dir(Path(scratch) / "state"),
        adopting_orphans(),
    ):
        bench = ThroughputBench(
            Path(scratch),
            size_mib=512 if quick else 2048,
            data_mib=384 if quick else 1536,
            incremental_mib=100,
            runs=runs,
            progress=progress,
        )
        bench.run()
        from vmsnap.benchmark.chunks_figures import lab_compression, sparse_backup_memory

        chunks = {
            "dedup_of_a_clone": bench.extra.get("dedup"),
            "lab_guest_compression": lab_compression(Path(scratch), progress=progress),
            "sparse_disk_memory": sparse_backup_memory(
                Path(scratch), size_gib=8 if quick else 64, runs=1 if quick else runs, progress=progress
            ),
        }
        peer_figures: dict[str, Any] = {}
        if peers:
            peer_figures = run_peers(
                Path(scratch),
                size_mib=bench.size_mib,
                data_mib=bench.data_mib,
                incremental_mib=bench.incremental_mib,
                runs=bench.runs,
                ours=bench.figures,
                progress=progress,
            )
        return {
            "schema": 1,
            "size_mib": bench.size_mib,
            "data_mib": bench.data_mib,
            "runs": runs,
            "figures": [_figure_json(f) for f in bench.figures],
            "ratios": bench.ratios(),
            "chunks": chunks,
            "peers": peer_figures,
            "load_at_start": load,
            "targets": TARGETS,
        }


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
