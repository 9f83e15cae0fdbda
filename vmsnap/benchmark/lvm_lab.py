"""The LVM row of the strategy costs, measured inside the lab guest: never on this host's own volumes.

The guest gets a blank raw disk of its own as a volume group and times there (``dd oflag=direct``,
``lvremove``, ``lvconvert --merge``); ratios to writes without a snapshot compare with the host's rows.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from vmsnap.benchmark.measure import Measurement, RunResult, median_of, progress_line
from vmsnap.errors import VmsnapError
from vmsnap.runner import Runner

MiB = 1024 * 1024
VG = "vmsnapbench"
ORIGIN = f"{VG}/origin"
SNAPSHOT = f"{VG}/snap"
POOL = f"{VG}/pool"
PV_SERIAL = "pvbench"
REQUEST_KIB = 64
"""dd's request size: the host's rows write 64 KiB requests too (theirs at queue depth 16, dd's at 1)."""

#: ``mark`` prints ``vmsnap-mark <uptime seconds> <sectors written to /sys/block/$dev>``: two marks bracket
#: what is timed (``/proc/uptime`` ticks in 10 ms; the guest has no clock finer than that in its shell)
MARK = (
    "mark() {\n"
    "    read t _ < /proc/uptime\n"
    '    read _ _ _ _ _ _ w _ < "/sys/block/$dev/stat"\n'
    '    echo "vmsnap-mark $t $w"\n'
    "}\n"
)

#: ``sh -c TIMED sh DEV ARGV…``: run ARGV between two marks of the block device DEV
TIMED = MARK + 'set -e\ndev=$1\nshift\nmark\n"$@" >/dev/null\nmark\n'

#: ``sh -c MERGE sh DEV VG/SNAPSHOT DM-NAME-OF-ORIGIN``: merge a classic snapshot back; the second mark is
#: when device-mapper says the merge is done (``snapshot-merge`` reports allocated == metadata sectors),
#: not when lvconvert, polling every second, notices and tidies up
MERGE = MARK + (
    "set -e\n"
    "dev=$1 snapshot=$2 origin=$3\n"
    "mark\n"
    'lvm lvconvert --merge -i 1 "$snapshot" > /tmp/vmsnap-merge.log 2>&1 &\n'
    "pid=$!\n"
    "while :; do\n"
    '    set -- $(dmsetup status "$origin" || true)\n'
    '    if [ "${3:-}" = snapshot-merge ] && [ "${4%/*}" = "${5:-}" ]; then break; fi\n'
    '    if [ "${3:-}" = linear ]; then break; fi\n'
    '    if ! kill -0 "$pid" 2>/dev/null && [ "${3:-}" != snapshot-merge ]; then break; fi\n'
    "    sleep 0.02\n"
    "done\n"
    "mark\n"
    'wait "$pid" || { cat /tmp/vmsnap-merge.log >&2; exit 1; }\n'
)


class LvmLabError(VmsnapError):
    """The lab guest's LVM measurement printed something the harness cannot read."""

    default_hint = "run the harness again with --runs 1 and look at the guest command's output in the message"


@attrs.frozen
class Timed:
    """What happened between two marks in the guest: seconds, and bytes the physical disk was sent."""

    seconds: float
    bytes_written: float


def parse_marks(stdout: str) -> Timed:
    """The interval between the first and the last ``vmsnap-mark`` line of a guest script's output.

    :raise LvmLabError: fewer than two marks
    """
    marks = [line.split()[1:3] for line in stdout.splitlines() if line.startswith("vmsnap-mark ")]
    if len(marks) < 2 or any(len(m) != 2 for m in marks):
        raise LvmLabError(f"the guest printed no pair of marks: {stdout.strip()[-300:]!r}")
    try:
        (t0, w0), (t1, w1) = (float(marks[0][0]), int(marks[0][1])), (float(marks[-1][0]), int(marks[-1][1]))
    except ValueError as err:
        raise LvmLabError(f"the guest printed a mark that is not two numbers: {marks!r}") from err
    # one 10 ms tick is the clock's resolution: a faster step reads as half a tick, not as free
    return Timed(max(t1 - t0, 0.005), max(w1 - w0, 0) * 512.0)


_DD_COPIED = re.compile(r"^(\d+) bytes\b.*copied, ([0-9.]+(?:e[-+]?\d+)?) s\b", re.MULTILINE)


def parse_dd(stderr: str) -> float:
    """MB/s from coreutils dd's summary (``67108864 bytes (67 MB, 64 MiB) copied, 1.02 s, 65.8 MB/s``),
    computed from bytes and seconds rather than read from its rounded rate.

    :raise LvmLabError: no summary line
    """
    match = _DD_COPIED.search(stderr)
    if match is None:
        raise LvmLabError(f"dd printed no summary: {stderr.strip()[-300:]!r}")
    return int(match.group(1)) / max(float(match.group(2)), 1e-6) / 1e6


def with_relative(cleanup: Measurement, mib: int, baseline_mb_per_s: float) -> Measurement:
    """``cleanup`` with its time as a multiple of writing its ``mib`` MiB at ``baseline_mb_per_s``."""
    if baseline_mb_per_s <= 0:
        return cleanup
    write_seconds = mib * MiB / 1e6 / baseline_mb_per_s
    return attrs.evolve(cleanup, relative=round(cleanup.value / write_seconds, 3))


def dm_name(full_name: str) -> str:
    """device-mapper's name of LV ``vg/lv`` (``-`` doubled in each part, joined by ``-``)."""
    vg, lv = full_name.split("/")
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


@attrs.define
class LvmLabBench:
    """The LVM measurements inside a guest whose disk ``device`` (``vda``) is free to become a volume group.

    Classic snapshots (device-mapper ``snapshot``, 4 KiB chunks) and thin ones (a thin pool), each on an
    ``lv_mib`` LV written in full before anything is timed: write speed without a snapshot, with one (first
    and second pass), then, after writing each of ``written_mib``, ``lvremove`` and a merge back.

    :param runner: runs commands inside the guest (its AgentRunner)
    :param device: the guest's name of the disk (under /sys/block)
    """

    runner: Runner
    device: str
    lv_mib: int
    written_mib: Sequence[int]
    runs: int = 3
    progress: Callable[[str], None] = lambda line: None
    measurements: list[Measurement] = attrs.Factory(list)
    chunk_kib: dict[str, int] = attrs.Factory(dict)

    def _lvm(self, *args: str) -> None:
        self.runner.run(["lvm", *args], timeout=600)

    def _write(self, full_name: str, mib: int) -> float:
        """MB/s of ``mib`` MiB of 64 KiB O_DIRECT writes from the start of the LV."""
        count = mib * 1024 // REQUEST_KIB
        target = f"of=/dev/{full_name}"
        argv = ["dd", "if=/dev/zero", target, f"bs={REQUEST_KIB}K", f"count={count}", "oflag=direct"]
        return parse_dd(self.runner.run(argv, timeout=1800).stderr)

    def _timed(self, *argv: str) -> Timed:
        return parse_marks(
            self.runner.run(["sh", "-c", TIMED, "sh", self.device, *argv], timeout=1800).stdout
        )

    def _record(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        self.progress(progress_line(m))
        return m

    def setup(self, pv: str) -> None:
        """Make ``pv`` (a path in the guest) the volume group this bench uses."""
        self._lvm("pvcreate", "-q", "-y", pv)
        self._lvm("vgcreate", "-q", VG, pv)

    def classic_origin(self) -> None:
        """A plain LV, written in full (a sparse disk file on the host allocates on the first write)."""
        self._lvm("lvcreate", "-q", "-y", "-W", "y", "-n", "origin", "-L", f"{self.lv_mib}M", VG)
        self._write(ORIGIN, self.lv_mib)

    def thin_origin(self) -> None:
        """A thin LV in a pool with room for it twice, written in full."""
        pool_mib = 2 * self.lv_mib + 8
        self._lvm("lvcreate", "-q", "-y", "-W", "y", "-T", POOL, "-L", f"{pool_mib}M")
        self._lvm("lvcreate", "-q", "-y", "-W", "y", "-V", f"{self.lv_mib}M", "-T", POOL, "-n", "origin")
        self._write(ORIGIN, self.lv_mib)

    def _snapshot(self, thin: bool) -> None:
        # a classic COW area larger than needed: LVM trims it to the most the origin can use
        size = [] if thin else ["-L", f"{self.lv_mib + self.lv_mib // 16 + 4}M"]
        self._lvm("lvcreate", "-q", "-s", "-n", "snap", *size, ORIGIN)

    def _remove_snapshot(self) -> None:
        self._lvm("lvremove", "-q", "-y", SNAPSHOT)

    def writes(self, variant: str, thin: bool) -> float:
        """Write speed without a snapshot, with a new one, and a second pass; returns the baseline MB/s."""
        baseline: list[RunResult] = []
        first: list[RunResult] = []
        again: list[RunResult] = []
        for _ in range(self.runs):
            baseline.append(self._write(ORIGIN, self.lv_mib))
            self._snapshot(thin)
            if variant not in self.chunk_kib:
                self.chunk_kib[variant] = self._chunk_kib(POOL if thin else SNAPSHOT)
            first.append(self._write(ORIGIN, self.lv_mib))
            again.append(self._write(ORIGIN, self.lv_mib))
            self._remove_snapshot()
        base = self._record(median_of("lvm", "write_baseline", variant, "MB/s", baseline))
        self._record(median_of("lvm", "write_first", variant, "MB/s", first))
        self._record(median_of("lvm", "write_again", variant, "MB/s", again))
        return base.value

    def _chunk_kib(self, full_name: str) -> int:
        """The copy-on-write unit of a classic snapshot or a thin pool (0 when lvs says nothing)."""
        argv = ["lvm", "lvs", "--noheadings", "--units", "k", "--nosuffix", "-o", "chunk_size", full_name]
        try:
            return round(float(self.runner.run(argv, timeout=120).stdout.strip() or 0))
        except ValueError:
            return 0

    def chunks_text(self) -> str:
        """``classic 4 KiB chunks, thin 64 KiB chunks``, for the note."""
        return ", ".join(f"{variant} {kib} KiB chunks" for variant, kib in self.chunk_kib.items() if kib)

    def cleanups(self, variant: str, thin: bool, baseline_mb_per_s: float) -> None:
        """``lvremove`` and a merge back after writing each of ``written_mib`` MiB, timed with the bytes the
        disk was sent."""
        for mib in self.written_mib:
            for metric in ("delete", "rollback"):
                results: list[RunResult] = []
                for _ in range(self.runs):
                    self._snapshot(thin)
                    self._write(ORIGIN, mib)
                    timed = self._cleanup(metric, thin)
                    self._check_snapshot_gone(metric)
                    results.append((timed.seconds, timed.bytes_written))
                m = median_of("lvm", metric, f"{variant}, {mib} MiB written", "s", results)
                self._record(with_relative(m, mib, baseline_mb_per_s))

    def _check_snapshot_gone(self, metric: str) -> None:
        """A deferred merge (or a failed remove) would leave the snapshot: its time would not be the cost."""
        names = self.runner.run(["lvm", "lvs", "--noheadings", "-o", "lv_name", VG], timeout=120).stdout
        if "snap" in names.split():
            raise LvmLabError(f"{SNAPSHOT} is still there after the timed {metric}: LVM deferred it")

    def _cleanup(self, metric: str, thin: bool) -> Timed:
        if metric == "delete":
            return self._timed("lvm", "lvremove", "-q", "-y", SNAPSHOT)
        if thin:  # a thin merge swaps metadata: lvconvert ends when it is done
            return self._timed("lvm", "lvconvert", "--merge", "-i", "1", SNAPSHOT)
        script = ["sh", "-c", MERGE, "sh", self.device, SNAPSHOT, dm_name(ORIGIN)]
        return parse_marks(self.runner.run(script, timeout=1800).stdout)

    def run(self, pv: str, *, thin: bool = True) -> None:
        """Every figure: classic snapshots, then thin ones (each on an origin of its own)."""
        self.setup(pv)
        variants = [("classic", False), ("thin", True)] if thin else [("classic", False)]
        for variant, is_thin in variants:
            if is_thin:
                self.thin_origin()
            else:
                self.classic_origin()
            baseline = self.writes(variant, is_thin)
            self.cleanups(variant, is_thin, baseline)
            self._lvm("lvremove", "-q", "-y", VG)


@attrs.frozen
class LabOutcome:
    """What the lab guest measured, or why it measured nothing.

    :param where: how the row is marked in the table (``in the lab guest under TCG``)
    :param detail: the guest and the method, for the note under the table
    """

    measurements: tuple[Measurement, ...] = ()
    skipped: str | None = None
    where: str = ""
    detail: str = ""


def lvm_in_lab_guest(
    workdir: Path,
    *,
    lv_mib: int,
    written_mib: Sequence[int],
    runs: int,
    progress: Callable[[str], None] = lambda line: None,
    thin: bool = True,
) -> LabOutcome:
    """Boot the lab guest with a blank disk and measure LVM there (see :class:`LvmLabBench`).

    Never the host's volumes, even when this host has device-mapper: a benchmark must not snapshot them.
    When no lab guest can be built or booted, or a command in it fails, the outcome says why and holds no
    measurements.
    """
    from vmsnap.lab.guest import LabGuest, LabGuestError
    from vmsnap.lab.image import LabImageError, build_lab_image
    from vmsnap.lab.qemu import DriveSpec

    if shutil.which("qemu-system-x86_64") is None:
        return LabOutcome(skipped="the lab guest needs qemu-system-x86_64, which is not installed")
    try:
        image = build_lab_image(progress=progress)
    except LabImageError as err:
        return LabOutcome(skipped=f"no lab guest image could be built ({err.message})")
    workdir.mkdir(parents=True, exist_ok=True)
    pv_image = workdir / "pv.raw"
    with open(pv_image, "wb") as f:
        f.truncate((2 * lv_mib + 64) * MiB)  # sparse: room for an origin and its snapshot, or a pool
    drive = DriveSpec(pv_image, PV_SERIAL, format="raw", serial=PV_SERIAL)
    progress("lvm       booting the lab guest (LVM is measured inside it, never on this host)")
    try:
        guest = LabGuest(workdir, extra_drives=[drive], data_disk_size=None, image=image, name="lvmbench")
        guest.start()
    except LabGuestError as err:
        return LabOutcome(skipped=f"the lab guest did not boot ({err.message})")
    try:
        runner = guest.runner
        pv = f"/dev/disk/by-id/virtio-{PV_SERIAL}"
        device = runner.run(["readlink", "-f", pv]).stdout.strip().rsplit("/", 1)[-1]
        kernel = runner.run(["uname", "-r"]).stdout.strip()
        cpus = runner.run(["nproc"]).stdout.strip()
        bench = LvmLabBench(runner, device, lv_mib, written_mib, runs=runs, progress=progress)
        bench.run(pv, thin=thin)
        accel = guest.process.accel.upper() if guest.process is not None else "QEMU"
    except VmsnapError as err:
        # the host's rows measured before this one are worth keeping: the table says what went wrong here
        progress(f"lvm       failed in the lab guest: {err.message}")
        return LabOutcome(skipped=f"the measurement in the lab guest failed ({err.message})")
    finally:
        guest.stop()
    return LabOutcome(
        measurements=tuple(bench.measurements),
        where=f"measured in the lab guest under {accel}",
        detail=(
            f"measured in the lab guest under {accel} (kernel {kernel}, {cpus} vCPU, {lv_mib} MiB LVs on a "
            f"raw virtio disk; {bench.chunks_text()}): dd oflag=direct, {REQUEST_KIB} KiB requests, queue "
            "depth 1; delete and rollback timed in the guest (10 ms ticks), bytes from the disk's write "
            "counter. Compare the ratios: the absolute MB/s and seconds are the emulator's."
        ),
    )
