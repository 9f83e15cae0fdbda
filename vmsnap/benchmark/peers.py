"""vmsnap and its peers on the same running libvirt domain: virtnbdbackup, libvirt's push backup, and vmsnap.

One domain, one image, the same data: every tool takes its full backups of it, every incremental round
changes the same 100 MiB before each tool's incremental, and every restore is compared with the disk. The
peer ratios compare vmsnap's figures from this domain (as ``vmsnap backup --domain NAME --connect URI``
takes them), never the bare-QEMU figures of :mod:`vmsnap.benchmark.throughput`. virtnbdbackup needs
libvirt; ``make bench-peers`` installs both, and :class:`vmsnap.lab.libvirtd.Libvirtd` starts libvirtd by
hand. The document :func:`run_peers` returns goes under ``"peers"`` in throughput.json.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import statistics
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.backup import Backup, BackupConfig, BackupResult
from vmsnap.benchmark.workload import (
    DURABLE_COPY,
    MiB,
    ThroughputFigure,
    fsync_tree,
    incremental_rounds,
    incremental_writes,
    make_test_image,
)
from vmsnap.errors import LibvirtError, UnsupportedError, VmsnapError
from vmsnap.restore.images import restore_images
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.select import MachineSpec, open_machine

TIMEOUT = 3600.0
# the QOM path of libvirt's first virtio-blk disk, as HMP's qemu-io -d wants it
QDEV_VDA = "/machine/peripheral/virtio-disk0/virtio-backend"

FULL = "virtnbdbackup full"
RESTORE = "virtnbdrestore (full + {n} incrementals)"
STARTUP = "virtnbdbackup -V (start-up only)"
PUSH = "libvirt backup-begin push full"
VMSNAP_FULL = "vmsnap full backup (chunks, same domain)"
VMSNAP_INCREMENTAL = "vmsnap incremental ({mib} MiB changed, same domain)"
VMSNAP_RESTORE = "vmsnap restore (full + {n} incrementals, same domain)"
DOMAIN_PREFIX = "vmsnap-bench-"

TARGETS = {"full_backup_vs_virtnbdbackup": ">= 4"}
"""The issue's goals for the peer ratios."""


class PeerError(VmsnapError):
    """A peer tool failed or produced a wrong result, so its figure would be meaningless."""


def backup_argv(uri: str, domain: str, level: str, output: Path, *, scratch: Path) -> list[str]:
    """virtnbdbackup's command line for one backup (``level`` full or inc) of every disk of ``domain``."""
    return [
        "virtnbdbackup",
        "-U",
        uri,
        "-d",
        domain,
        "-l",
        level,
        "-o",
        str(output),
        "-S",
        str(scratch),
        "-n",  # no progress bar
    ]


def restore_argv(uri: str, backup: Path, output: Path, *, logfile: Path) -> list[str]:
    """virtnbdrestore's command line: the whole chain in ``backup`` into images in ``output``."""
    return ["virtnbdrestore", "-U", uri, "-i", str(backup), "-o", str(output), "-n", "-L", str(logfile)]


@attrs.frozen
class BackupLog:
    """What virtnbdbackup's log says it did.

    :param data_bytes: disk → bytes of data extents it read
    :param checkpoint: the checkpoint it created (``virtnbdbackup.N``)
    :param finished: it logged ``Finished successfully``
    """

    data_bytes: Mapping[str, int]
    checkpoint: str | None
    finished: bool

    @property
    def total_bytes(self) -> int:
        return sum(self.data_bytes.values())


def parse_backup_log(text: str) -> BackupLog:
    """Read virtnbdbackup's log lines (it logs to stderr) into a :class:`BackupLog`."""
    data = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"backupDisk \[([^\]]+)\]: (\d+) bytes of data extents to backup", text)
    }
    checkpoint = re.search(r"Using checkpoint name: \[([^\]]+)\]", text)
    return BackupLog(data, checkpoint.group(1) if checkpoint else None, "Finished successfully" in text)


def parse_version(text: str) -> str:
    """The version ``virtnbdbackup -V`` printed (``1.9.15``), or ``unknown``."""
    found = re.search(r"\d+(?:\.\d+)+", text)
    return found.group(0) if found else "unknown"


def figure(name: str, runs: Sequence[float], data_bytes: int, **extra: Any) -> dict[str, Any]:
    """One timed peer operation as a JSON object: median seconds, MB/s of ``data_bytes``, every run."""
    seconds = statistics.median(runs)
    return {
        "name": name,
        "seconds": round(seconds, 4),
        "mb_per_s": round(data_bytes / seconds / 1e6, 1) if seconds > 0 else 0.0,
        "runs": [round(v, 4) for v in runs],
        "data_bytes": data_bytes,
        **extra,
    }


def _seconds(figures: Mapping[str, Mapping[str, Any]], prefix: str) -> float | None:
    """The median seconds of the first figure whose name starts with ``prefix``."""
    return next((f["seconds"] for n, f in figures.items() if n.startswith(prefix)), None)


def peer_ratios(ours: Iterable[ThroughputFigure], peers: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """vmsnap's speed relative to each peer (peer seconds / vmsnap seconds: above 1, vmsnap is faster).

    Both sides of every vmsnap-versus-peer ratio come from ``peers``: vmsnap measured on the same domain as
    the peers. ``ours`` only gives the ``qemu-img convert`` limit the ``*_vs_convert`` ratios divide.

    :param ours: the ThroughputBench figures
    :param peers: name → figure, as :func:`figure` makes them (the peers' and vmsnap's on that domain)
    """
    limit = next((f.seconds for f in ours if f.name == DURABLE_COPY), None)
    full = _seconds(peers, "vmsnap full backup")
    incremental = _seconds(peers, "vmsnap incremental")
    restore = _seconds(peers, "vmsnap restore")
    peer_full = _seconds(peers, FULL)
    push = _seconds(peers, PUSH)
    pairs = {
        "full_backup_vs_virtnbdbackup": (peer_full, full),
        "incremental_vs_virtnbdbackup": (_seconds(peers, "virtnbdbackup inc"), incremental),
        "restore_vs_virtnbdrestore": (_seconds(peers, "virtnbdrestore"), restore),
        "full_backup_vs_backup_begin_push": (push, full),
        "domain_full_backup_vs_convert": (limit, full),
        "virtnbdbackup_full_vs_convert": (limit, peer_full),
        "backup_begin_push_vs_convert": (limit, push),
    }
    return {k: round(a / b, 3) for k, (a, b) in pairs.items() if a and b}


def _restored_image(directory: Path) -> Path:
    images = sorted(p for p in directory.iterdir() if p.suffix in (".qcow2", ".img", ".raw"))
    if len(images) != 1:
        raise PeerError(f"virtnbdrestore left {[p.name for p in images]} in {directory}, expected one image")
    return images[0]


@attrs.define
class PeerBench:
    """On one running domain: libvirt's push backup, then virtnbdbackup's and vmsnap's full backups,
    incrementals after the same changes, and restores of both chains (see the module docstring).

    vmsnap runs in this process, as ``vmsnap backup --domain NAME --connect URI`` and ``vmsnap restore``
    do after parsing their options (CLI defaults: a new chunks repository, the strategy and transport
    chosen automatically); virtnbdbackup runs as a command, so its figures include its interpreter's
    start-up, which :data:`STARTUP` measures on its own.

    :param workdir: scratch (needs about 6x the data size free)
    :param uri: the libvirtd to use
    :param run_dir: that libvirtd's ``qemu_run_dir`` (to stop the domain's QEMU if libvirtd dies)
    :param size_mib / data_mib / incremental_mib / runs: as :class:`ThroughputBench`
    """

    workdir: Path
    uri: str
    size_mib: int
    data_mib: int
    incremental_mib: int = 100
    runs: int = 3
    run_dir: Path = Path("/run/libvirt/qemu")
    runner: Runner = attrs.Factory(LocalRunner)
    progress: Callable[[str], None] = lambda line: None
    figures: dict[str, dict[str, Any]] = attrs.Factory(dict)
    versions: dict[str, str] = attrs.Factory(dict)

    def _record(self, fig: dict[str, Any]) -> None:
        self.figures[fig["name"]] = fig
        self.progress(f"{fig['name']:52} {fig['seconds']:8.3f} s  {fig['mb_per_s']:8.0f} MB/s")

    def _backup(self, domain: str, level: str, output: Path) -> tuple[float, BackupLog]:
        started = time.perf_counter()
        result = self.runner.run(
            backup_argv(self.uri, domain, level, output, scratch=self.workdir), timeout=TIMEOUT
        )
        if output.exists():
            fsync_tree(output)
        seconds = time.perf_counter() - started
        text = result.stdout + result.stderr
        log = parse_backup_log(text)
        if not log.finished:
            raise PeerError(f"virtnbdbackup -l {level} did not finish: {text[-1500:]}")
        return seconds, log

    def _vmsnap_backup(self, domain: str, repo: Path, *, incremental: bool) -> tuple[float, BackupResult]:
        """One vmsnap backup of ``domain`` into ``repo`` (created when new), timed until its files are
        fsync'd; the machine is opened and closed inside the time, as the CLI does.

        :raise PeerError: an incremental backup was not taken as one (or a full one as full)
        """
        started = time.perf_counter()
        spec = MachineSpec(domain=domain, connect=self.uri)
        with contextlib.closing(open_machine(spec)) as machine:
            result = Backup(machine, BackupConfig(repo=repo, incremental=incremental)).run()
        fsync_tree(repo)
        seconds = time.perf_counter() - started
        wanted = "incremental" if incremental else "full"
        if result.kind != wanted:
            raise PeerError(
                f"vmsnap's backup of {domain} was a {result.kind} one, not {wanted}: {list(result.notes)}"
            )
        return seconds, result

    def _identical(self, a: Path, b: Path, *, shared: bool = False) -> bool:
        """``qemu-img compare``; ``shared`` (-U) reads an image a running QEMU holds."""
        argv = ["qemu-img", "compare", *(["-U"] if shared else []), str(a), str(b)]
        return self.runner.run(argv, ok_codes=(0, 1), timeout=TIMEOUT).exit_code == 0

    def run(self) -> None:
        """Measure every figure on a fresh image of the bench's kind (see the module docstring)."""
        from vmsnap.lab.libvirtd import define_domain, remove_domain

        for tool in ("virtnbdbackup", "virtnbdrestore"):
            if self.runner.which(tool) is None:
                raise UnsupportedError(f"{tool} is not installed", hint="make bench-peers installs it")
        self.versions["virtnbdbackup"] = parse_version(self.runner.run(["virtnbdbackup", "-V"]).stdout)
        self._startup()
        image = self.workdir / "peer-disk.qcow2"
        self.progress(f"making a {self.size_mib} MiB image with {self.data_mib} MiB for the domain …")
        data = make_test_image(image, size_mib=self.size_mib, data_mib=self.data_mib)  # vmsnap's image
        import libvirt

        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot connect to {self.uri}: {err}") from err
        name = f"{DOMAIN_PREFIX}{secrets.token_hex(3)}"
        dom = None
        try:
            self.versions["libvirt"] = _libvirt_version(conn.getLibVersion())
            for old in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE):
                if old.name().startswith(DOMAIN_PREFIX):  # left defined by a run whose libvirtd died
                    remove_domain(old)
            dom = define_domain(conn, name, {"vda": image})
            dom.create()
            self._push(dom, image, data)
            chain = self._full(name, data)
            repo, vm = self._vmsnap_full(name, data)
            rounds = self._incrementals(dom, name, chain, repo)
            remove_domain(dom)  # QEMU has written everything to the image; the restores compare against it
            dom = None
            self._restores(chain, image, data, rounds)
            self._vmsnap_restores(repo, vm, image, data, rounds)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"the peer benchmark's domain {name}: {err}") from err
        finally:
            if dom is not None:
                remove_domain(dom, name=name, run_dir=self.run_dir)
            conn.close()

    def _startup(self) -> None:
        """How long ``virtnbdbackup -V`` takes: the start-up that each of its figures includes."""
        runs = []
        for _ in range(self.runs):
            started = time.perf_counter()
            self.runner.run(["virtnbdbackup", "-V"])
            runs.append(time.perf_counter() - started)
        self._record(figure(STARTUP, runs, 0))

    def _push(self, dom: Any, image: Path, data: int) -> None:
        import libvirt

        def one(i: int) -> float:
            target = self.workdir / f"push{i}.qcow2"
            xml = (
                "<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'>"
                f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>"
            )
            started = time.perf_counter()
            dom.backupBegin(xml, None, 0)
            while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                time.sleep(0.01)
            fsync_tree(target)
            seconds = time.perf_counter() - started
            stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            if not stats.get("success", False):
                raise PeerError(f"libvirt's push backup failed: {stats}")
            if i == 0 and not self._identical(target, image, shared=True):
                raise PeerError(f"libvirt's push backup {target} differs from the disk {image}")
            target.unlink()
            return seconds

        self._record(figure(PUSH, [one(i) for i in range(self.runs)], data, verified=True))

    def _full(self, domain: str, data: int) -> Path:
        runs = []
        for i in range(self.runs):
            output = self.workdir / f"vnb-full{i}"
            seconds, log = self._backup(domain, "full", output)
            runs.append(seconds)
            if i < self.runs - 1:
                shutil.rmtree(output)
        self._record(figure(FULL, runs, data, read_bytes=log.total_bytes))
        return output  # the last full backup starts the incremental chain

    def _vmsnap_full(self, domain: str, data: int) -> tuple[Path, str]:
        """vmsnap's full backups, each into a new repository; the last one's repository (returned, with
        the VM's name in it) takes the incrementals."""
        runs, written = [], []
        for i in range(self.runs):
            repo = self.workdir / f"vmsnap-repo{i}"
            seconds, result = self._vmsnap_backup(domain, repo, incremental=False)
            runs.append(seconds)
            written.append(sum(d.bytes_written for d in result.disks))
            if i < self.runs - 1:
                shutil.rmtree(repo)
        self._record(figure(VMSNAP_FULL, runs, data, written_bytes=written))
        return repo, result.vm

    def _incrementals(self, dom: Any, domain: str, chain: Path, repo: Path) -> int:
        """Per round: the same writes, then virtnbdbackup's and vmsnap's incrementals, taking turns at going
        first (the second finds what the first read in the page cache)."""
        import libvirt_qemu

        def hmp(command: str) -> None:
            reply = libvirt_qemu.qemuMonitorCommand(
                dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            ).strip()
            if reply:  # qemu-io prints nothing on success
                raise PeerError(f"HMP {command!r} answered {reply!r}")

        runs: list[float] = []
        read: list[int] = []
        ours: list[float] = []
        written: list[int] = []

        def peer() -> None:
            seconds, log = self._backup(domain, "inc", chain)
            runs.append(seconds)
            read.append(log.total_bytes)

        def vmsnap() -> None:
            seconds, result = self._vmsnap_backup(domain, repo, incremental=True)
            ours.append(seconds)
            written.append(sum(d.bytes_written for d in result.disks))

        # the same writes at the same offsets as the throughput run's incrementals
        for round_, writes in enumerate(
            incremental_writes(size_mib=self.size_mib, incremental_mib=self.incremental_mib, runs=self.runs)
        ):
            for write in writes:
                hmp(f'qemu-io -d {QDEV_VDA} "{write}"')
            hmp(f'qemu-io -d {QDEV_VDA} "flush"')
            for backup in (peer, vmsnap) if round_ % 2 == 0 else (vmsnap, peer):
                backup()
        changed = self.incremental_mib * MiB
        name = f"virtnbdbackup incremental ({self.incremental_mib} MiB changed)"
        self._record(figure(name, runs, changed, read_bytes=read))
        name = VMSNAP_INCREMENTAL.format(mib=self.incremental_mib)
        self._record(figure(name, ours, changed, written_bytes=written))
        return incremental_rounds(self.runs)

    def _restores(self, chain: Path, image: Path, data: int, rounds: int) -> None:
        runs = []
        for i in range(self.runs):
            output = self.workdir / f"vnb-restore{i}"
            started = time.perf_counter()
            self.runner.run(
                restore_argv(self.uri, chain, output, logfile=self.workdir / "restore.log"), timeout=TIMEOUT
            )
            # virtnbdrestore exits after sending SIGTERM to its qemu-nbd, which then still flushes the
            # image: the restore is done when that qemu-nbd is gone
            wait_for_qemu_nbd(output)
            fsync_tree(output)
            runs.append(time.perf_counter() - started)
            restored = _restored_image(output)
            if not self._identical(restored, image):
                raise PeerError(f"virtnbdrestore's {restored} differs from the disk {image}")
            shutil.rmtree(output)
        self._record(figure(RESTORE.format(n=rounds), runs, data, verified=True))

    def _vmsnap_restores(self, repo: Path, vm: str, image: Path, data: int, rounds: int) -> None:
        """vmsnap's restore of the latest backup (``vmsnap restore --repo R --vm VM --to DIR``), which
        checks every disk's sha256 itself; compared with the disk as the peers' restores are."""
        runs = []
        for i in range(self.runs):
            output = self.workdir / f"vmsnap-restore{i}"
            started = time.perf_counter()
            result = restore_images(repo, vm, None, output)
            fsync_tree(output)
            runs.append(time.perf_counter() - started)
            restored = [d.path for d in result.disks]
            if len(restored) != 1 or not self._identical(restored[0], image):
                raise PeerError(f"vmsnap's restore {restored} differs from the disk {image}")
            shutil.rmtree(output)
        self._record(figure(VMSNAP_RESTORE.format(n=rounds), runs, data, verified=True))


def qemu_nbd_pids(under: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of ``qemu-nbd`` processes serving a file under ``under`` (as named on their command line)."""
    prefix = str(under).rstrip("/").encode() + b"/"
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].rsplit(b"/", 1)[-1] == b"qemu-nbd" and any(a.startswith(prefix) for a in argv[1:]):
            pids.append(int(entry.name))
    return pids


def wait_for_qemu_nbd(under: Path, *, timeout: float = 600.0, proc: Path = Path("/proc")) -> None:
    """Wait until no qemu-nbd serves a file under ``under`` (only waits: the process is not ours).

    :raise PeerError: one still runs after ``timeout`` seconds
    """
    deadline = time.monotonic() + timeout
    while pids := qemu_nbd_pids(under, proc):
        if time.monotonic() > deadline:
            raise PeerError(f"qemu-nbd {pids} still serves {under} after {timeout:g} s")
        time.sleep(0.01)


def _libvirt_version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def run_peers(
    scratch: Path,
    *,
    size_mib: int,
    data_mib: int,
    incremental_mib: int,
    runs: int,
    ours: Sequence[ThroughputFigure],
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Measure virtnbdbackup's and vmsnap's full, incremental and restore (and libvirt's push backup) on one
    libvirt domain, with the workload that vmsnap's throughput run measured (see
    :mod:`vmsnap.benchmark.workload`).

    :param scratch: the throughput run's scratch directory
    :param size_mib / data_mib / incremental_mib / runs: that run's workload
    :param ours: that run's figures, for the ratios
    :return: ``{"versions", "figures": {name: figure}, "ratios", "targets"}`` for throughput.json's
        ``"peers"``
    :raise UnsupportedError: virtnbdbackup, libvirtd or libvirt-python is not available here
    :raise PeerError: a peer or vmsnap failed, or restored an image that differs from the disk
    """
    from vmsnap.lab.libvirtd import Libvirtd

    if shutil.which("virtnbdbackup") is None:
        raise UnsupportedError("virtnbdbackup is not installed", hint="make bench-peers installs it")
    workdir = scratch / "peers"
    workdir.mkdir(exist_ok=True)
    with Libvirtd() as libvirtd:
        peers = PeerBench(
            workdir,
            libvirtd.uri,
            size_mib=size_mib,
            data_mib=data_mib,
            incremental_mib=incremental_mib,
            runs=runs,
            run_dir=libvirtd.qemu_run_dir,
            progress=progress,
        )
        peers.run()
    return {
        "versions": peers.versions,
        "figures": peers.figures,
        "ratios": peer_ratios(ours, peers.figures),
        "targets": dict(TARGETS),
    }


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
