"""vmsnap against the deduplicating backup tools users would pick instead (restic, borgbackup), side by side
on the same disk content, all three encrypted and compressed.

Two workloads, each a 2 GiB disk: **random** (1.5 GiB of incompressible data at scattered offsets, as in the
throughput run) and **filesystem** (an ext4 filesystem holding a copy of this machine's ``/usr/share``,
``mkfs.ext4 -d``: text, documentation and small files, much of it compressible; ``/usr/share/doc`` with
``--quick``). For each:

- **full backup** into a new repository (median of the runs, each into a fresh repository);
- **second backup** after 64 MiB of random writes (1 MiB blocks of random bytes at random offsets) into the
  disk, into the repository of the full backup (one round per run, each after its own writes);
- **restore** of the latest backup into a new raw file;
- **repository size** after the full backup and after all rounds (``du``).

vmsnap backs up the disk as it would a VM's: the disk is a qcow2 attached to a bare QEMU (vCPUs paused, as
in the throughput run), read through QEMU's backup job (strategy ``backup``, pull) with its dirty bitmap for
the second backup. restic (``--compression auto``, repository version 2) and borg (``repokey-blake2``,
``zstd,3``) back up a raw copy of the same content (made before each timed backup, not timed), as a file:
their natural input. Every figure ends with what was written made durable (vmsnap fsyncs its own writes;
the peers' repositories and restored files are fsync'd after they finish, in the timed span). Restores are
compared byte for byte with the disk's content. CPU is user + system time of every process involved
(vmsnap and the QEMU serving its export, the peer's process) per GiB of the disk's data.
"""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.benchmark.cpu import CpuMeter
from vmsnap.benchmark.report import target_status
from vmsnap.benchmark.workload import MiB, filesystem_image, fsync_tree, make_test_image
from vmsnap.errors import UnsupportedError, VmsnapError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.repository import Repository
from vmsnap.runner import LocalRunner
from vmsnap.vm.machine import QemuMachine

TOOLS = ("vmsnap", "restic", "borg")
PASSWORD = "vmsnap-bench-not-a-secret"  # noqa: S105 - a throwaway repository's passphrase
WRITE_BLOCK = 1024 * 1024


@attrs.define
class Figure:
    """One timed operation of one tool: wall and CPU seconds of each run."""

    seconds: list[float] = attrs.Factory(list)
    cpu: list[float] = attrs.Factory(list)

    def add(self, seconds: float, cpu: float) -> None:
        self.seconds.append(seconds)
        self.cpu.append(cpu)

    def to_json(self, data_bytes: int) -> dict[str, Any]:
        median = statistics.median(self.seconds)
        cpu = statistics.median(self.cpu)
        return {
            "seconds": round(median, 3),
            "runs": [round(s, 3) for s in self.seconds],
            "cpu_seconds": round(cpu, 3),
            "cpu_s_per_gib": round(cpu / (data_bytes / 2**30), 3) if data_bytes else None,
            "mb_per_s": round(data_bytes / median / 1e6, 1) if median > 0 else None,
        }


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def random_writes(image_mib: int, total_mib: int, seed: int) -> list[tuple[int, bytes]]:
    """(offset, bytes): ``total_mib`` of random 1 MiB blocks at random aligned offsets of the disk."""
    rng = random.Random(seed)  # noqa: S311 - test data
    slots = image_mib * MiB // WRITE_BLOCK
    return [
        (rng.randrange(slots) * WRITE_BLOCK, rng.randbytes(WRITE_BLOCK))
        for _ in range(total_mib * MiB // WRITE_BLOCK)
    ]


class PeerBench:
    """One workload: the disk in a paused QEMU, raw copies of it for the peers, the tools' repositories."""

    def __init__(
        self, workdir: Path, workload: str, *, size_mib: int, runs: int, progress: Callable[[str], None]
    ):
        self.workdir = workdir
        self.workload = workload
        self.size_mib = size_mib
        self.runs = runs
        self.progress = progress
        self.runner = LocalRunner()
        self.figures: dict[str, dict[str, Figure]] = {t: {} for t in TOOLS}
        self.sizes: dict[str, dict[str, int]] = {t: {} for t in TOOLS}
        self._qemu: list[int] = []
        self.meter = CpuMeter(pids=lambda: self._qemu, keep=lambda: self._qemu)
        self.env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "BORG_PASSPHRASE": PASSWORD}
        self.key_file = workdir / "vmsnap.key"
        self.data_bytes = 0

    # ------------------------------------------------------------------------------------------ helpers

    def _figure(self, tool: str, name: str) -> Figure:
        return self.figures[tool].setdefault(name, Figure())

    def _timed(self, tool: str, name: str, action: Callable[[], None]) -> None:
        cpu = self.meter.now()
        started = time.perf_counter()
        action()
        seconds = time.perf_counter() - started
        self._figure(tool, name).add(seconds, self.meter.now() - cpu)
        self.progress(f"{self.workload:10} {tool:6} {name:14} {seconds:8.3f} s")

    def _run(self, argv: list[str], cwd: Path | None = None) -> None:
        subprocess.run(
            argv, env=self.env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def _raw_copy(self, image: Path) -> Path:
        raw = self.workdir / "disk.raw"
        raw.unlink(missing_ok=True)
        self.runner.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], timeout=1200)
        return raw

    @contextmanager
    def _vm(self, image: Path) -> Iterator[QemuMachine]:
        process = QemuProcess(self.workdir / "qemu", [DriveSpec(image, "disk0")], name="peersvm").start()
        machine = QemuMachine(process.qmp_socket)
        if process.pid is not None:
            self._qemu.append(process.pid)
        machine.qmp().stop()
        try:
            yield machine
        finally:
            self._qemu.clear()
            machine.close()
            process.stop()

    # --------------------------------------------------------------------------------------- the tools

    def _backup(
        self, tool: str, repo: Path, raw: Path | None, machine: QemuMachine, incremental: bool
    ) -> None:
        if tool == "vmsnap":
            config = BackupConfig(
                repo=repo, strategy="backup", quiesce="off", key_file=self.key_file, incremental=incremental
            )
            result = Backup(machine, config).run()
            if incremental and result.kind != "incremental":
                raise VmsnapError(f"the second backup was a {result.kind} one: {result.notes}")
            return
        assert raw is not None
        if tool == "restic":
            self._run(["restic", "-q", "-r", str(repo), "backup", "--compression", "auto", str(raw)])
        else:
            self._run(
                ["borg", "create", "--compression", "zstd,3", f"{repo}::b{time.time_ns()}", raw.name],
                cwd=raw.parent,
            )
        fsync_tree(repo)

    def _init(self, tool: str, repo: Path) -> None:
        if tool == "vmsnap":
            Repository.init(repo, layout="chunks", encrypt=True, key_file=self.key_file)
        elif tool == "restic":
            self._run(["restic", "-q", "-r", str(repo), "init", "--repository-version", "2"])
        else:
            self._run(["borg", "init", "-e", "repokey-blake2", str(repo)])

    def _restore(self, tool: str, repo: Path, target: Path) -> None:
        """Restore the latest backup under ``target``, made durable."""
        target.mkdir(parents=True)
        if tool == "vmsnap":
            repository = Repository.open(repo, key_file=self.key_file)
            repository.restore(repository.vms()[0], None, target, format="raw")
            return
        if tool == "restic":
            self._run(["restic", "-q", "-r", str(repo), "restore", "latest", "--target", str(target)])
        else:
            archive = subprocess.run(
                ["borg", "list", "--last", "1", "--short", str(repo)],
                env=self.env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            self._run(["borg", "extract", f"{repo}::{archive}"], cwd=target)
        fsync_tree(target)

    # ----------------------------------------------------------------------------------------- the run

    def run(self, image: Path) -> None:
        with self._vm(image) as machine:
            for tool in TOOLS:
                for i in range(self.runs):
                    repo = self.workdir / f"{tool}-full{i}"
                    self._init(tool, repo)
                    raw = None if tool == "vmsnap" else self._raw_copy(image)
                    self._timed(tool, "full backup", partial(self._backup, tool, repo, raw, machine, False))
                    self.sizes[tool]["after full"] = _du(repo)
                    if i < self.runs - 1:
                        shutil.rmtree(repo)
            for round_ in range(self.runs):
                self._write_random(machine, round_)
                raw = self._raw_copy(image)
                for tool in TOOLS:
                    repo = self.workdir / f"{tool}-full{self.runs - 1}"
                    self._timed(tool, "second backup", partial(self._backup, tool, repo, raw, machine, True))
            for tool in TOOLS:
                self.sizes[tool]["after all rounds"] = _du(self.workdir / f"{tool}-full{self.runs - 1}")
            expected = self._raw_copy(image)
            for tool in TOOLS:
                repo = self.workdir / f"{tool}-full{self.runs - 1}"
                for i in range(self.runs):
                    target = self.workdir / f"restore-{tool}{i}"
                    self._timed(tool, "restore", partial(self._restore, tool, repo, target))
                    restored = next(p for p in target.rglob("disk*.raw") if p.is_file())
                    if not filecmp.cmp(restored, expected, shallow=False):
                        raise VmsnapError(
                            f"{tool}'s restore of the {self.workload} disk differs from the disk"
                        )
                    shutil.rmtree(target)

    def _write_random(self, machine: QemuMachine, round_: int) -> None:
        """64 MiB of random 1 MiB blocks into the disk through the VM (its dirty bitmap sees them)."""
        scratch = self.workdir / "writes.bin"
        for offset, data in random_writes(self.size_mib, 64, seed=100 + round_):
            scratch.write_bytes(data)
            qemu_io(machine.qmp(), "disk0", f"write -s {scratch} {offset} {len(data)}")
        qemu_io(machine.qmp(), "disk0", "flush")  # QEMU's qcow2 metadata cache: the raw copies read the file

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data_bytes": self.data_bytes, "tools": {}}
        for tool in TOOLS:
            out["tools"][tool] = {
                "figures": {n: f.to_json(self.data_bytes) for n, f in self.figures[tool].items()},
                "repository_bytes": self.sizes[tool],
            }
        ratios: dict[str, float] = {}
        ours = self.figures["vmsnap"]
        for peer in ("restic", "borg"):
            for name in ("full backup", "second backup", "restore"):
                theirs = self.figures[peer].get(name)
                if theirs and ours.get(name):
                    key = f"{name.replace(' ', '_')}_vs_{peer}"
                    ratios[key] = round(
                        statistics.median(theirs.seconds) / statistics.median(ours[name].seconds), 2
                    )
        out["ratios"] = ratios
        return out


TARGETS = {"full_backup": 3.0, "restore": 3.0, "second_backup": 10.0}
"""The issue's targets: vmsnap at least this many times faster than each peer."""


def run_dedup_peers(
    *,
    quick: bool = False,
    runs: int = 3,
    workdir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure both workloads (see the module docstring); the JSON document of dedup-peers.md.

    :raise UnsupportedError: restic or borg is not installed (``make bench-peers`` installs them)
    """
    import tempfile

    from vmsnap.benchmark.throughput import _state_dir

    for tool in ("restic", "borg", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise UnsupportedError(
                f"{tool} is not installed", hint="make bench-peers installs restic and borgbackup"
            )
    size_mib = 512 if quick else 2048
    load = os.getloadavg()[0]
    versions = {
        "restic": subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split()[1],
        "borg": subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.split()[1],
    }
    document: dict[str, Any] = {
        "schema": 1,
        "size_mib": size_mib,
        "runs": runs,
        "load_at_start": round(load, 2),
        "versions": versions,
        "workloads": {},
        "targets": TARGETS,
    }
    with (
        tempfile.TemporaryDirectory(prefix="vmsnap-peers-", dir=workdir or "/var/tmp") as scratch,
        _state_dir(Path(scratch) / "state"),
    ):
        for workload in ("random", "filesystem"):
            directory = Path(scratch) / workload
            directory.mkdir()
            image = directory / "disk.qcow2"
            if workload == "random":
                data = make_test_image(image, size_mib=size_mib, data_mib=size_mib * 3 // 4)
            else:
                raw = directory / "fs.raw"
                data = filesystem_image(raw, size_mib=size_mib)
                LocalRunner().run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], timeout=1200)
                raw.unlink()
            bench = PeerBench(directory, workload, size_mib=size_mib, runs=runs, progress=progress)
            bench.data_bytes = data
            bench.run(image)
            document["workloads"][workload] = bench.to_json()
            shutil.rmtree(directory)
    return document


_ORDER = ("random", "filesystem", "vmsnap", "restic", "borg", "full backup", "second backup", "restore")
"""The order workloads, tools and operations are listed in (the JSON's keys are sorted)."""


def _place(key: str) -> tuple[int, str]:
    return (_ORDER.index(key) if key in _ORDER else len(_ORDER), key)


def _ordered(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=_place)


def _ratio_place(key: str) -> tuple[tuple[int, str], tuple[int, str]]:
    """``full_backup_vs_restic``: its peer's place, then its operation's."""
    operation, _, peer = key.rpartition("_vs_")
    return _place(peer), _place(operation.replace("_", " "))


def dedup_peers_markdown(document: dict[str, Any]) -> str:
    """dedup-peers.md, written whole from the document (in the same order whatever order its keys are in)."""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(document["versions"].items()))
    lines = [
        "# vmsnap, restic and borg on the same disk, all three encrypted and compressed",
        "",
        f"Written by `make bench-peers` (`benchmarks/dedup_peers.py`); {versions}; a "
        f"{document['size_mib']} MiB disk per workload; medians of {document['runs']} runs; load average "
        f"{document['load_at_start']} at the start, on this 2-core machine shared with other work: compare "
        "the figures of one table (taken side by side), not across machines. See "
        "`vmsnap/benchmark/dedup_peers.py` for what each figure does.",
        "",
        "- **random**: 1.5 GiB of incompressible data at scattered offsets of a 2 GiB disk;",
        "- **filesystem**: ext4 holding a copy of /usr/share (compressible, many small files).",
        "",
        "vmsnap reads the disk from a (paused) QEMU through its backup job and dirty bitmap; restic "
        "(`--compression auto`, repository v2) and borg (`repokey-blake2`, `--compression zstd,3`) back up a "
        "raw copy of the same content. Every figure ends with its writes fsync'd; restores are compared byte "
        "for byte. CPU: user + system seconds of every process involved, per GiB of the disk's data.",
        "",
    ]
    for workload in _ordered(document["workloads"]):
        result = document["workloads"][workload]
        gib = result["data_bytes"] / 2**30
        lines += [
            f"## {workload} ({gib:.2f} GiB of data)",
            "",
            "| tool | operation | median | MB/s | CPU s/GiB | runs (s) |",
            "|---|---|---|---|---|---|",
        ]
        tools = _ordered(result["tools"])
        for tool in tools:
            figures = result["tools"][tool]["figures"]
            for name in _ordered(figures):
                f = figures[name]
                lines.append(
                    f"| {tool} | {name} | {f['seconds']:.2f} s | {f['mb_per_s'] or 0:.0f} | "
                    f"{f['cpu_s_per_gib'] or 0:.2f} | {', '.join(f'{r:g}' for r in f['runs'])} |"
                )
        lines += [
            "",
            "| tool | repository after the full backup | after all second backups |",
            "|---|---|---|",
        ]
        for tool in tools:
            sizes = result["tools"][tool]["repository_bytes"]
            lines.append(
                f"| {tool} | {sizes.get('after full', 0) / 2**20:.0f} MiB | "
                f"{sizes.get('after all rounds', 0) / 2**20:.0f} MiB |"
            )
        lines += ["", "| ratio (peer's time / vmsnap's) | measured | target | status |", "|---|---|---|---|"]
        for key in sorted(result["ratios"], key=_ratio_place):
            value = result["ratios"][key]
            target = TARGETS[key.rsplit("_vs_", 1)[0]]
            lines.append(f"| {key} | {value:g} | >= {target:g} | {target_status(value, f'>= {target}')} |")
        lines.append("")
    return "\n".join(lines)
