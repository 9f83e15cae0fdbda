"""Measure what each snapshot technique costs on this machine: writes while it exists, delete, rollback.

Image-level, side by side in one run: ``qemu-img bench`` (O_DIRECT, native AIO) on the same image with and
without the snapshot; ``qemu-img commit``/``rebase``/``snapshot`` and ``btrfs`` on a loop device for cleanup.
Every figure is the median of several runs; bytes written come from the kernel's I/O accounting. LVM is
measured in the lab guest (:mod:`.lvm_lab`).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.benchmark.lvm_lab import lvm_in_lab_guest
from vmsnap.benchmark.measure import Measurement, RunResult, measure, progress_line
from vmsnap.errors import VmsnapError
from vmsnap.files import fsync_file
from vmsnap.runner import LocalRunner, Runner

MiB = 1024 * 1024
CLUSTER = 64 * 1024


@attrs.define
class CostBench:
    """The strategy cost harness.

    :param workdir: scratch directory (images are created and removed here)
    :param quick: smaller images and fewer sizes (CI-friendly)
    :param runs: repetitions per figure (the median is reported)
    :param progress: called with a line describing each step
    :param size_mib: override the image size (tests use a few MiB)
    :param written_sizes_mib: override the amounts written before delete/rollback
    :param notes: per strategy measured elsewhere than on this host, ``where`` (marks its cells) and
        ``detail`` (the note under the table)
    """

    workdir: Path
    quick: bool = False
    runs: int = 3
    runner: Runner = attrs.Factory(LocalRunner)
    progress: Callable[[str], None] = lambda line: None
    size_mib: int | None = None
    written_sizes_mib: Sequence[int] | None = None
    measurements: list[Measurement] = attrs.Factory(list)
    skipped: dict[str, str] = attrs.Factory(dict)
    notes: dict[str, dict[str, str]] = attrs.Factory(dict)

    @property
    def image_mib(self) -> int:
        """Image size: 256 MiB quick, 512 MiB full (room for the largest write before cleanup), size_mib."""
        return self.size_mib or (256 if self.quick else 512)

    @property
    def written_mib(self) -> list[int]:
        """Data written after the snapshot before deleting or rolling back."""
        if self.written_sizes_mib is not None:
            return list(self.written_sizes_mib)
        return [16, 64] if self.quick else [64, 256, 512]

    # -- primitives -----------------------------------------------------------------------------

    def _qemu_img(self, *args: str, timeout: float = 600) -> str:
        return self.runner.run(["qemu-img", *args], timeout=timeout).stdout

    def _fill(self, image: Path, mib: int, pattern: int = 0xAB, offset_mib: int = 0) -> None:
        self.runner.run(
            ["qemu-io", "-f", "qcow2" if image.suffix == ".qcow2" else "raw", "-c",
             f"write -P {pattern} {offset_mib}M {mib}M", str(image)],
            timeout=600,
        )  # fmt: skip

    def _create(
        self, image: Path, *, fmt: str = "qcow2", options: str = "", backing: Path | None = None
    ) -> Path:
        argv = ["create", "-q", "-f", fmt]
        if options:
            argv += ["-o", options]
        if backing is not None:
            argv += ["-b", str(backing), "-F", "qcow2", str(image)]
        else:
            argv += [str(image), f"{self.image_mib}M"]
        self._qemu_img(*argv)
        return image

    def _bench_write(self, target: str, *, fmt: str | None = "qcow2", mib: int | None = None) -> float:
        """MB/s of sequential 64 KiB O_DIRECT writes over ``mib`` (default: the whole image)."""
        count = (mib or self.image_mib) * MiB // CLUSTER
        argv = ["bench", "-w", "-t", "none", "-i", "native", "-c", str(count), "-s", str(CLUSTER), "-d", "16"]
        if fmt is not None:
            argv += ["-f", fmt]
        out = self._qemu_img(*argv, target)
        match = re.search(r"Run completed in ([0-9.]+) seconds", out)
        if not match:
            raise VmsnapError(f"qemu-img bench printed no timing: {out.strip()[-200:]}")
        seconds = max(float(match.group(1)), 1e-6)
        return count * CLUSTER / seconds / 1e6

    @contextlib.contextmanager
    def _io_meter(self) -> Iterator[dict[str, float]]:
        """Seconds and bytes written (by finished child processes) for the body."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
        started = time.perf_counter()
        result = {"seconds": 0.0, "bytes": 0.0}
        yield result
        result["seconds"] = time.perf_counter() - started
        result["bytes"] = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - before) * 512.0

    def _cleanup_run(
        self, prepare: Callable[[int], Path], cleanup: Callable[[Path], object]
    ) -> Callable[[int], tuple[float, float]]:
        """One run of a delete or rollback figure: ``prepare(i)`` untimed, then ``cleanup`` of what it made,
        timed, with the bytes it wrote."""

        def one(i: int) -> tuple[float, float]:
            prepared = prepare(i)
            with self._io_meter() as io:
                cleanup(prepared)
            return io["seconds"], io["bytes"]

        return one

    def _record(
        self, strategy: str, metric: str, variant: str, unit: str, one_run: Callable[[int], RunResult]
    ) -> Measurement:
        m = measure(strategy, metric, variant, unit, one_run, self.runs)
        self.measurements.append(m)
        self.progress(progress_line(m))
        return m

    def _scratch(self, name: str) -> Path:
        path = self.workdir / name
        if path.exists():
            self._remove_tree(path)
        path.mkdir(parents=True)
        return path

    def _remove_tree(self, path: Path) -> None:
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir() and not child.is_symlink():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()

    # -- qcow2 strategies -----------------------------------------------------------------------

    def internal(self) -> None:
        """Internal snapshots, with lazy_refcounts off and on."""
        for lazy in ("off", "on"):
            variant = f"lazy_refcounts={lazy}"
            d = self._scratch(f"internal-{lazy}")

            def fresh(i: int, d: Path = d, lazy: str = lazy) -> Path:
                image = self._create(d / f"i{i}.qcow2", options=f"lazy_refcounts={lazy}")
                self._fill(image, self.image_mib)
                return image

            def baseline(i: int) -> float:
                return self._bench_write(str(fresh(i)))

            def first(i: int) -> float:
                image = fresh(i)
                self._qemu_img("snapshot", "-c", "s1", str(image))
                return self._bench_write(str(image))

            def again(i: int) -> float:
                image = fresh(i)
                self._qemu_img("snapshot", "-c", "s1", str(image))
                self._bench_write(str(image))
                return self._bench_write(str(image))

            self._record("internal", "write_baseline", variant, "MB/s", baseline)
            self._record("internal", "write_first", variant, "MB/s", first)
            self._record("internal", "write_again", variant, "MB/s", again)
        d = self._scratch("internal-cleanup")
        for mib in self.written_mib:
            for metric, prefix, flag in (("delete", "del", "-d"), ("rollback", "rb", "-a")):

                def written(i: int, prefix: str = prefix, mib: int = mib) -> Path:
                    image = self._create(d / f"{prefix}{i}.qcow2", options="lazy_refcounts=on")
                    self._fill(image, self.image_mib)
                    self._qemu_img("snapshot", "-c", "s1", str(image))
                    self._fill(image, mib, pattern=0xCD)
                    return image

                def apply(image: Path, flag: str = flag) -> None:
                    self._qemu_img("snapshot", flag, "s1", str(image))

                self._record("internal", metric, f"{mib} MiB written", "s", self._cleanup_run(written, apply))

    def external(self) -> None:
        """External overlays: writes into the overlay, commit and stream to delete, drop to roll back."""
        d = self._scratch("external")

        def base(i: int) -> Path:
            image = self._create(d / f"b{i}.qcow2")
            self._fill(image, self.image_mib)
            return image

        def overlay(i: int) -> Path:
            return self._create(d / f"o{i}.qcow2", backing=base(i))

        self._record("external", "write_baseline", "", "MB/s", lambda i: self._bench_write(str(base(i))))
        self._record("external", "write_first", "", "MB/s", lambda i: self._bench_write(str(overlay(i))))

        def again(i: int) -> float:
            top = overlay(i)
            self._bench_write(str(top))
            return self._bench_write(str(top))

        self._record("external", "write_again", "", "MB/s", again)
        for mib in self.written_mib:

            def written(i: int, mib: int = mib) -> Path:
                top = overlay(i)
                self._fill(top, mib, pattern=0xCD)
                return top

            def commit(top: Path) -> None:
                self._qemu_img("commit", "-q", str(top))

            def stream(top: Path) -> None:
                self._qemu_img("rebase", "-q", "-b", "", str(top))

            cleanups = (
                ("delete", f"commit, {mib} MiB written", commit),
                ("delete", f"stream, {mib} MiB written", stream),
                ("rollback", f"{mib} MiB written", Path.unlink),
            )
            for metric, variant, cleanup in cleanups:
                self._record("external", metric, variant, "s", self._cleanup_run(written, cleanup))

    def backup(self) -> None:
        """blockdev-backup: copy-before-write costs guest writes while a backup runs; restore to roll back."""
        d = self._scratch("backup")

        def source(i: int) -> Path:
            image = self._create(d / f"s{i}.qcow2")
            self._fill(image, self.image_mib)
            return image

        def cbw(i: int) -> str:
            src = source(i)
            target = self._create(d / f"t{i}.qcow2")
            return "json:" + _json(
                {
                    "driver": "copy-before-write",
                    "file": {"driver": "qcow2", "file": {"driver": "file", "filename": str(src)}},
                    "target": {"driver": "qcow2", "file": {"driver": "file", "filename": str(target)}},
                }
            )

        self._record("backup", "write_baseline", "", "MB/s", lambda i: self._bench_write(str(source(i))))
        self._record(
            "backup",
            "write_first",
            "copy-before-write",
            "MB/s",
            lambda i: self._bench_write(cbw(i), fmt=None),
        )

        def target(i: int) -> Path:
            image = self._create(d / f"del{i}.qcow2")
            self._fill(image, self.image_mib)
            return image

        def restore(backup: Path) -> None:
            disk = backup.with_name(f"restored-{backup.name}")
            self._qemu_img("convert", "-q", "-O", "qcow2", str(backup), str(disk))
            fsync_file(disk)

        self._record("backup", "delete", "remove target", "s", self._cleanup_run(target, Path.unlink))
        self._record(
            "backup", "rollback", f"restore {self.image_mib} MiB", "s", self._cleanup_run(source, restore)
        )

    # -- btrfs on a loop device ---------------------------------------------------------------

    @contextlib.contextmanager
    def _loop_btrfs(self) -> Iterator[Path]:
        d = self._scratch("btrfs")
        backing = d / "fs.img"
        mnt = d / "mnt"
        mnt.mkdir()
        size = (self.image_mib * 16 + 1024) * MiB  # sparse: room for the cleaner to lag behind
        with open(backing, "wb") as f:
            f.truncate(size)
        device = self.runner.run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
        try:
            self.runner.run(["mkfs.btrfs", "-q", device])
            self.runner.run(["mount", "-o", "nodiscard", device, str(mnt)])  # discard on a loop file is slow
            try:
                yield mnt
            finally:
                self.runner.run(["umount", str(mnt)], ok_codes=(0, 32))
        finally:
            self.runner.run(["losetup", "-d", device], ok_codes=(0, 1))

    @property
    def btrfs_write_mib(self) -> int:
        """The Btrfs write-cost image: at most 256 MiB (loop-device Btrfs is slow to fill and to clean)."""
        return min(self.image_mib, 256)

    def _clear(self, mnt: Path) -> None:
        """Delete every subvolume the Btrfs benchmark made (snapshots first); the cleaner frees them later
        (waiting with ``subvolume sync`` took minutes on a loop device, so the file system is large)."""
        for pattern in ("snap-*", "aside", "vol-*"):
            for sub in sorted(mnt.glob(pattern)):
                self.runner.run(["btrfs", "-q", "subvolume", "delete", str(sub)])

    def btrfs(self) -> None:
        """Btrfs subvolume snapshots of a raw image, with and without nodatacow."""
        if os.geteuid() != 0 or not self.runner.which("mkfs.btrfs"):
            self.skipped["btrfs"] = "needs root and btrfs-progs for a loop-mounted Btrfs"
            return
        with self._loop_btrfs() as mnt:
            self._btrfs_write_costs(mnt)
            self._btrfs_cleanup_costs(mnt)

    def _btrfs_image(self, mnt: Path, vol: Path, *, mib: int, nodatacow: bool) -> Path:
        """A new subvolume ``vol`` (the only one: earlier runs' are deleted) holding a ``mib`` raw image."""
        self._clear(mnt)  # one run's volume at a time: the loop filesystem stays small
        self.runner.run(["btrfs", "-q", "subvolume", "create", str(vol)])
        image = vol / "disk.raw"
        image.touch()
        if nodatacow:
            self.runner.run(["chattr", "+C", str(image)])
        with open(image, "r+b") as f:
            f.truncate(mib * MiB)
        return image

    def _btrfs_write_costs(self, mnt: Path) -> None:
        mib = self.btrfs_write_mib
        for cow in ("nodatacow", "datacow"):

            def volume(i: int, cow: str = cow) -> Path:
                vol = mnt / f"vol-{cow}-{i}"
                self._fill(self._btrfs_image(mnt, vol, mib=mib, nodatacow=cow == "nodatacow"), mib)
                self.runner.run(["btrfs", "filesystem", "sync", str(mnt)])
                return vol

            def snapshotted(i: int, cow: str = cow) -> Path:
                vol = volume(i)
                snap = mnt / f"snap-{cow}-{i}"
                self.runner.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(snap)])
                return vol

            def baseline(i: int) -> float:
                return self._bench_write(str(volume(i) / "disk.raw"), fmt="raw", mib=mib)

            def first(i: int) -> float:
                return self._bench_write(str(snapshotted(i) / "disk.raw"), fmt="raw", mib=mib)

            def again(i: int) -> float:
                image = str(snapshotted(i) / "disk.raw")
                self._bench_write(image, fmt="raw", mib=mib)
                return self._bench_write(image, fmt="raw", mib=mib)

            self._record("btrfs", "write_baseline", cow, "MB/s", baseline)
            self._record("btrfs", "write_first", cow, "MB/s", first)
            self._record("btrfs", "write_again", cow, "MB/s", again)

    def _btrfs_cleanup_costs(self, mnt: Path) -> None:
        """Delete and roll back one nodatacow volume's snapshot after writing to the volume."""
        vol, snap, aside = mnt / "vol-nodatacow-0", mnt / "snap-nodatacow-0", mnt / "aside"

        def delete(snap: Path) -> None:
            self.runner.run(["btrfs", "-q", "subvolume", "delete", "--commit-each", str(snap)])

        def rollback(snap: Path) -> None:
            vol.rename(aside)
            self.runner.run(["btrfs", "-q", "subvolume", "snapshot", str(snap), str(vol)])
            self.runner.run(["btrfs", "-q", "subvolume", "delete", "--commit-each", str(aside)])

        for mib in self.written_mib:

            def prepared(i: int, mib: int = mib) -> Path:
                image = self._btrfs_image(mnt, vol, mib=self.image_mib, nodatacow=True)
                # the cleanup cost depends on what was written since the snapshot, so the base only needs
                # data where those writes go (filling all of it per run made this stage take minutes)
                self._fill(image, mib)
                self.runner.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(snap)])
                self._fill(image, mib, pattern=0xCD)
                self.runner.run(["btrfs", "filesystem", "sync", str(mnt)])
                return snap

            for metric, cleanup in (("delete", delete), ("rollback", rollback)):
                self._record("btrfs", metric, f"{mib} MiB written", "s", self._cleanup_run(prepared, cleanup))

    @property
    def lvm_mib(self) -> int:
        """The LVM origin's size in the lab guest: 64 MiB quick, 128 MiB full (TCG writes a snapshotted LV at
        some 20 MB/s), size_mib."""
        return self.size_mib or (64 if self.quick else 128)

    @property
    def lvm_written_mib(self) -> list[int]:
        """Data written to the LVM origin before delete/rollback (at most the origin's size)."""
        if self.written_sizes_mib is not None:
            return list(self.written_sizes_mib)
        return [m for m in ([16, 64] if self.quick else [16, 64, 128]) if m <= self.lvm_mib]

    def lvm(self) -> None:
        """LVM snapshots, classic and thin, measured in the lab guest: never on this host's own volumes, even
        when this host has device-mapper."""
        outcome = lvm_in_lab_guest(
            self._scratch("lvm"),
            lv_mib=self.lvm_mib,
            written_mib=self.lvm_written_mib,
            runs=self.runs,
            progress=self.progress,
        )
        self.measurements.extend(outcome.measurements)
        if outcome.skipped is not None:
            self.skipped["lvm"] = outcome.skipped
        else:
            self.notes["lvm"] = {"where": outcome.where, "detail": outcome.detail}

    def run(self, strategies: Sequence[str] = ("internal", "external", "backup", "btrfs", "lvm")) -> None:
        """Run the named strategies' benchmarks in order."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in strategies:
            getattr(self, name)()


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))
