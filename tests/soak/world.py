"""The soak's real parts: a guestless QEMU with qcow2 data disks (written through ``qemu-io`` as a guest
would), a SeaweedFS restarted by pid, ``vmsnap`` commands run as processes (so ``kill -9`` is real), and
the look for what a run may leave behind (block jobs, fleecing nodes, NBD servers and exports, overlays,
internal snapshots, processes, leases, journals)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tests.integration.s3.seaweed import SeaweedServer
from tests.soak.model import DiskSpec, Write
from vmsnap.errors import VmsnapError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.chunks.leases import READERS, read_head
from vmsnap.repo.stores.base import Store
from vmsnap.vm.qmp import QMPMonitor

VMSNAP = str(Path(sys.executable).with_name("vmsnap"))
BUCKET = "vmsnap-soak"
VM_NAME = "soakvm"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


class SoakVm:
    """A QEMU without a guest OS (``-machine q35,accel=kvm -cpu qemu64`` where KVM opens) with one qcow2
    image per :class:`DiskSpec`; the soak writes into it through QMP between operations."""

    def __init__(self, workdir: Path, disks: Sequence[DiskSpec]) -> None:
        self.workdir = workdir
        self.disks = list(disks)
        self.images = {d.name: workdir / f"{d.name}.qcow2" for d in disks}
        for disk in disks:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(self.images[disk.name]), str(disk.size)],
                check=True,
            )
        drives = [
            DriveSpec(self.images[d.name], d.name, bus=d.bus, serial=f"soak{i}") for i, d in enumerate(disks)
        ]
        self.process = QemuProcess(workdir, drives, name=VM_NAME)
        self._data_file = workdir / "write.bin"
        self.pristine: BlockState | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.process.qmp_socket

    def start(self) -> None:
        self.process.start()
        deadline = time.monotonic() + 30
        while True:  # the socket file appears before QEMU listens on it
            try:
                with self.monitor():
                    break
            except VmsnapError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.pristine = self.block_state()

    def monitor(self) -> QMPMonitor:
        return QMPMonitor(self.qmp_socket, timeout=60).connect()

    def write(self, writes: Sequence[tuple[Write, bytes]]) -> None:
        """Send writes to the guest's disks (as a guest would, through each device's block backend), then
        flush."""
        with self.monitor() as qmp:
            touched = set()
            for write, data in writes:
                if write.kind == "zero":
                    command = f"write -z {write.offset} {write.length}"
                elif write.kind == "pattern":
                    command = f"write -P {write.pattern} {write.offset} {write.length}"
                else:
                    self._data_file.write_bytes(data)
                    command = f"write -s {self._data_file} {write.offset} {write.length}"
                qemu_io(qmp, write.disk, command)
                touched.add(write.disk)
            for disk in sorted(touched):
                qemu_io(qmp, disk, "flush")

    def live_sha256(self, scratch: Path) -> dict[str, str]:
        """Each disk's guest-visible content now (flushed, read with ``qemu-img convert -U`` through whatever
        chain the disk has), as sha256."""
        with self.monitor() as qmp:
            for disk in self.disks:
                qemu_io(qmp, disk.name, "flush")
            current = {d.name: d for d in qmp.disks()}
        found = {}
        for disk in self.disks:
            raw = scratch / f"live-{disk.name}.raw"
            subprocess.run(
                [
                    "qemu-img",
                    "convert",
                    "-U",
                    "-f",
                    current[disk.name].format,
                    "-O",
                    "raw",
                    str(current[disk.name].file),
                    str(raw),
                ],
                check=True,
            )
            found[disk.name] = sha256_file(raw)
            raw.unlink()
        return found

    def block_state(self) -> BlockState:
        """What a finished (or recovered) run must leave as it found it."""
        with self.monitor() as qmp:
            disks = {d.name: (str(d.file), tuple(str(p) for p in d.backing_chain)) for d in qmp.disks()}
            bitmaps = {}
            snapshots = {}
            for block in qmp.query_block():
                inserted = block.get("inserted") or {}
                node = str(inserted.get("node-name", ""))
                bitmaps[node] = tuple(sorted(str(b.get("name")) for b in inserted.get("dirty-bitmaps", [])))
                image = inserted.get("image") or {}
                snapshots[node] = tuple(sorted(str(s.get("name")) for s in image.get("snapshots", [])))
            nbd_server = _nbd_server_running(qmp)
            return BlockState(
                disks=disks,
                nodes=tuple(sorted(qmp.node_names())),
                jobs=tuple(f"{j.id} ({j.type}, {j.status})" for j in qmp.query_jobs()),
                exports=tuple(str(e.get("id")) for e in qmp.query_block_exports()),
                status=qmp.status(),
                bitmaps=bitmaps,
                snapshots=snapshots,
                nbd_server=nbd_server,
            )

    def stop(self) -> None:
        self.process.stop()
        self.process.kill()


def _nbd_server_running(qmp: QMPMonitor) -> bool:
    """Whether QEMU's NBD server runs: QMP has no query for it, so stop it and see whether there was one
    (a server left running is a leftover either way)."""
    try:
        qmp.execute("nbd-server-stop")
    except VmsnapError:
        return False
    return True


@attrs.frozen
class BlockState:
    """The parts of a VM's block layer a backup may change while it runs."""

    disks: Mapping[str, tuple[str, tuple[str, ...]]]
    nodes: tuple[str, ...]
    jobs: tuple[str, ...]
    exports: tuple[str, ...]
    status: str
    bitmaps: Mapping[str, tuple[str, ...]]
    snapshots: Mapping[str, tuple[str, ...]]
    nbd_server: bool

    def leftovers(self, pristine: BlockState, bitmaps: Sequence[str]) -> list[str]:
        """What differs from ``pristine`` (the VM before the soak) and is not one of the dirty ``bitmaps``
        the backups keep."""
        found = []
        if self.disks != pristine.disks:
            found.append(
                f"disks on other images than before: {dict(self.disks)} (was {dict(pristine.disks)})"
            )
        extra = sorted(set(self.nodes) - set(pristine.nodes))
        if extra:
            found.append(f"block nodes left: {', '.join(extra)}")
        if self.jobs:
            found.append(f"block jobs left: {', '.join(self.jobs)}")
        if self.exports:
            found.append(f"block exports left: {', '.join(self.exports)}")
        if self.nbd_server:
            found.append("QEMU's NBD server was left running")
        if self.status != "running":
            found.append(f"the VM is {self.status}")
        for node, names in self.bitmaps.items():
            stray = [n for n in names if n not in bitmaps]
            if stray:
                found.append(f"dirty bitmaps left on {node}: {', '.join(stray)}")
        for node, names in self.snapshots.items():
            if names:
                found.append(f"internal snapshots left on {node}: {', '.join(names)}")
        return found


class S3Server:
    """The soak's SeaweedFS: started once, restarted by pid (killed, or stopped with a short grace), always
    on the same data directory and ports."""

    def __init__(self, workdir: Path) -> None:
        self.server = SeaweedServer(workdir)
        self.restarts = 0

    def start(self) -> None:
        self.server.start()
        import boto3

        access, secret = self.server.profile_keys["vmsnap-test"]
        client = boto3.session.Session(
            aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1"
        ).client("s3", endpoint_url=self.server.endpoint_url)
        try:
            client.create_bucket(Bucket=BUCKET)
        finally:
            client.close()

    def env(self) -> dict[str, str]:
        return self.server.env()

    def restart(self, *, graceful: bool) -> float:
        """Stop the server (SIGKILL, or SIGTERM and SIGKILL after 2 s) and start it again; the seconds it
        was away."""
        started = time.monotonic()
        if graceful:
            self.server.stop(grace=2.0)
        else:
            self.server.kill()
        self.server.restart()
        self.restarts += 1
        return time.monotonic() - started

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def stop(self) -> None:
        self.server.stop(grace=3.0)


@attrs.frozen
class Outcome:
    """How one command ended: exit code (``-9``: killed), its output and how long it ran."""

    code: int
    out: str
    err: str
    seconds: float
    killed: bool
    label: str = ""
    """The command's log files are ``logs/LABEL.out`` and ``.err``."""

    @property
    def number(self) -> str:
        return "#" + self.label.split("-")[0].lstrip("0")

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.killed

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("vmsnap: error:")]
        return lines[-1] if lines else (self.err.strip().splitlines() or ["(no output)"])[-1]


class Command:
    """One ``vmsnap`` process in a session of its own, its output in files under ``logs``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], logs: Path, label: str) -> None:
        self.argv = [VMSNAP, *argv]
        self.label = label
        self._out = logs / f"{label}.out"
        self._err = logs / f"{label}.err"
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env),
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.killed = False

    def kill(self) -> bool:
        """``kill -9`` the vmsnap process (only it: what it started stays, as after a crash); False when it
        had ended already."""
        if self.popen.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.killed = True
        return True

    def wait(self, timeout: float) -> Outcome:
        """Wait for the process; one that outlives ``timeout`` is killed and reported as hung (exit status
        1 and a ``soak:`` line: a failure no fault of the soak's explains)."""
        try:
            self.popen.wait(timeout)
            hung = False
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            hung = True
        code = self.popen.returncode
        err = self._err.read_text(errors="replace")
        if hung:
            code = 1
            err += f"\nsoak: hung: killed after {timeout:g} s\n"
        return Outcome(
            code,
            self._out.read_text(errors="replace"),
            err,
            time.monotonic() - self.started,
            code == -signal.SIGKILL,  # by the soak, or by itself at a crash point
            self.label,
        )


def stray_processes(workdir: Path, ours: Sequence[int]) -> list[str]:
    """Processes (other than ``ours``) whose command line names something under ``workdir``: servers and
    copies a dead run left, and vmsnap processes still running."""
    found = []
    needle = str(workdir)
    skip = {*ours, *_ancestors()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(needle in a for a in argv):
            found.append(f"pid {entry.name}: {' '.join(argv)[:200]}")
    return found


def _ancestors() -> set[int]:
    """This process and its parents (whose command lines may name the work directory)."""
    found = set()
    pid = os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def held_leases(store: Store) -> list[str]:
    """The leases of a chunks repository's ``store`` still held: a reader lease (deleted when its reader
    ends, by ``recover`` when it died) or a writer or gc series whose head is not released (each series
    keeps its released head)."""
    found = [f"a reader lease is left: {s.key}" for s in store.list(READERS)]
    series = sorted({s.key.rsplit("/", 1)[0] for s in store.list("locks/") if not s.key.startswith(READERS)})
    for name in series:
        head = read_head(store, name)
        if head is not None and head.held():
            what = head.record.describe() if head.record is not None else "not a lease object"
            found.append(f"a lease is left held: {head.key}: {what}")
    return found
