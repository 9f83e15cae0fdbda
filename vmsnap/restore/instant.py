"""Instant restore: a VM runs on its backup at once; the data is copied in the background until it no longer
needs the backup.

Two steps, each safe to repeat (the second one is also the resume):

1. :func:`prepare` serves each backup disk read-only over NBD from a daemon that outlives this process
   (qemu-storage-daemon for a qcow2 chain, nbdkit for a block reader) and creates ``TO/<disk>.qcow2`` whose
   backing file is that export (a ``json:`` pseudo-filename, backing format raw). A VM started on these
   images runs at once: what it has not written yet is read from the backup.
2. :func:`stream` runs QEMU's ``block-stream`` on each disk of the running VM (through its QMP socket) until
   no image has a backing file any more, then stops the servers and removes the state. The copy is QEMU's
   job and the servers are daemons, so killing vmsnap during the copy leaves the VM running and the copy
   going on; running :func:`stream` again waits for jobs that still run (changing their speed), re-issues
   ``block-stream`` for images that still have a backing file, and finishes.

The state is ``TO/.vmsnap-instant.json`` (0600): the sources, the images, where the servers run. Each disk's
NBD socket is reached through a stable path, ``RUN_DIR/<key>/<disk>.sock`` (a symlink to the current
server's socket), so a server that died (a host reboot empties ``/run``) is restarted by :func:`prepare`
and QEMU reconnects to it (``reconnect-delay``) without the images changing. :func:`prepare` refuses
``TO`` when a ``<disk>.qcow2`` exists that is not this restore's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import BlockJobError, NotFoundError, UsageError, VmsnapError
from vmsnap.files import make_private_dir, write_json_atomic
from vmsnap.image import qemu_img
from vmsnap.model import validate_name
from vmsnap.processes import crash_point
from vmsnap.restore.source import BackupSource, serve, source_from_json
from vmsnap.restore.state import (
    daemons_under,
    locked,
    owner,
    read_state,
    run_key,
    stop_daemon_dir,
    stop_daemons_under,
)
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.qmp import QMPMonitor

DEFAULT_RUN_DIR = Path("/run/vmsnap/instant")
STATE = ".vmsnap-instant.json"
POINTER = "restore.json"
"""In ``RUN_DIR/<key>/``: which restore directory these servers serve (for :func:`recover`)."""
STATE_FORMAT = 1
JOB_PREFIX = "vmsnap-instant-"
RECONNECT_DELAY = 60
"""Seconds QEMU waits for a restarted server before a read of not-yet-copied data fails."""

CRASH_POINTS = ("instant-after-serve", "instant-after-images", "instant-mid-stream")

StreamProgress = Callable[[str, int, int], None]
"""(disk, bytes copied, bytes to copy) — the stream jobs' own counters."""


def _no_progress(disk: str, done: int, total: int) -> None:
    """A StreamProgress that ignores its calls."""


@attrs.frozen
class InstantDisk:
    """One disk of an instant restore.

    :param name: the disk's name
    :param image: the new image the VM runs on (``TO/<name>.qcow2``)
    :param socket: the stable path of the NBD socket its backing file names
    :param virtual_size: its size in bytes
    """

    name: str
    image: Path
    socket: Path
    virtual_size: int

    @property
    def backing(self) -> str:
        """The image's backing file: a ``json:`` pseudo-filename for QEMU's NBD client."""
        nbd = {
            "driver": "nbd",
            "server": {"type": "unix", "path": str(self.socket)},
            "export": self.name,
            "reconnect-delay": RECONNECT_DELAY,
        }
        # the options of the raw backing node: its "file" child is the NBD client
        return "json:" + json.dumps({"file": nbd}, separators=(",", ":"), sort_keys=True)


@attrs.frozen
class InstantRestore:
    """A prepared instant restore: start the VM on :attr:`images`, then call :func:`stream`.

    :param to: the directory of the new images (and of the state file)
    :param disks: the disks, in the order given
    :param run_dir: where the servers run (``RUN_DIR/<key>``)
    :param resumed: True when :func:`prepare` found this restore already prepared
    """

    to: Path
    disks: tuple[InstantDisk, ...]
    run_dir: Path
    resumed: bool = False

    @property
    def images(self) -> dict[str, Path]:
        """Disk name → image to start the VM on."""
        return {d.name: d.image for d in self.disks}

    def qemu_args(self) -> list[str]:
        """QEMU options that attach each image as a virtio disk (``-blockdev`` in JSON form, so no path
        needs QEMU's comma escaping); the image's header names its backing file, QEMU opens it itself."""
        args: list[str] = []
        for disk in self.disks:
            node = f"restored-{disk.name}"
            blockdev = {
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": str(disk.image)},
            }
            args += ["-blockdev", json.dumps(blockdev, separators=(",", ":"))]
            args += ["-device", f"virtio-blk-pci,drive={node},serial={disk.name}"]
        return args

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap instant-restore`` after preparing."""
        return {
            "to": str(self.to),
            "resumed": self.resumed,
            "disks": [{"name": d.name, "image": str(d.image), "size": d.virtual_size} for d in self.disks],
        }


@attrs.frozen
class StreamResult:
    """What :func:`stream` did: disks copied now, disks already standalone, seconds spent."""

    streamed: tuple[str, ...]
    already_done: tuple[str, ...]
    seconds: float


def _nbd_size(uri: str) -> int:
    from vmsnap.image.nbd import nbd_connection

    with nbd_connection(uri) as handle:
        return int(handle.get_size())


def _link(socket: Path, target: Path) -> None:
    temporary = socket.with_name(f".{socket.name}.new")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, socket)


def prepare(
    sources: Mapping[str, BackupSource],
    to: Path,
    *,
    run_dir: Path = DEFAULT_RUN_DIR,
    runner: Runner | None = None,
) -> InstantRestore:
    """Serve the backup disks and create ``to/<disk>.qcow2`` on top of them (or resume a prepared restore:
    servers that died are started again, images not yet made are made).

    :param sources: disk name → backup disk
    :param to: the directory for the new images (created 0700 when missing)
    :param run_dir: where the servers run (0700)
    :param runner: runs qemu-img and the servers; must be this host
    :raise UsageError: no disks, a bad disk name, or ``to`` holds an image that is not this restore's
    :raise TransferError: a server refused to start
    """
    if not sources:
        raise UsageError("instant restore of no disks", hint="name at least one disk")
    for name in sources:
        validate_name(name, "disk name")
    run = runner or LocalRunner()
    to = Path(os.path.realpath(make_private_dir(to, tighten=True)))
    make_private_dir(run_dir, tighten=True)
    state_path = to / STATE
    with locked(to):
        state = read_state(state_path)
        identities = {name: source.identity for name, source in sources.items()}
        if state is not None:
            recorded = {name: disk["source"]["identity"] for name, disk in state["disks"].items()}
            if recorded != identities:
                raise UsageError(
                    f"{to} holds another instant restore ({', '.join(sorted(recorded))} from other backups)",
                    hint="choose another directory, or finish that one first",
                )
        else:
            for name in sources:
                if (to / f"{name}.qcow2").exists():
                    raise UsageError(
                        f"{to / f'{name}.qcow2'} exists already",
                        hint="instant restore never overwrites an image: choose an empty directory",
                    )
        servers = _servers_dir(run_dir, to)
        if state is None:
            state = {
                "format": STATE_FORMAT,
                "to": str(to),
                "run_dir": str(servers),
                "owner": owner(),
                "status": "preparing",
                "disks": {
                    name: {"source": source.to_json(), "image": str(to / f"{name}.qcow2")}
                    for name, source in sources.items()
                },
            }
            write_json_atomic(state_path, state)
        resumed = state["status"] != "preparing"
        _ensure_servers(state, servers, run)
        crash_point("instant-after-serve")
        disks = []
        for name in sources:
            record = state["disks"][name]
            disk = InstantDisk(name, Path(record["image"]), servers / f"{name}.sock", int(record["size"]))
            if not disk.image.exists():
                _create_image(disk, run)
            disks.append(disk)
        crash_point("instant-after-images")
        if state["status"] == "preparing":
            state["status"] = "prepared"
            write_json_atomic(state_path, state)
        return InstantRestore(to, tuple(disks), servers, resumed)


def _servers_dir(run_dir: Path, to: Path) -> Path:
    """``RUN_DIR/<key>/`` of the restore in ``to``, with its pointer back to ``to`` (made under the run
    directory's lock, so :func:`recover` never meets a directory without one that is being made)."""
    servers = run_dir / run_key(to)
    with locked(run_dir):
        make_private_dir(servers, tighten=True)
        if _pointer(servers) != to:
            write_json_atomic(servers / POINTER, {"to": str(to)})
    return servers


def _pointer(servers: Path) -> Path | None:
    """The restore directory a server directory serves, from its pointer; None without a readable one."""
    with contextlib.suppress(VmsnapError, KeyError, TypeError):
        data = read_state(servers / POINTER)
        if data is not None:
            return Path(str(data["to"]))
    return None


def _ensure_servers(state: dict[str, Any], servers: Path, runner: Runner) -> None:
    """Start a server for every disk whose server is not running, and point its stable socket path at it."""
    alive = {r.directory: r for r in daemons_under(servers) if r.alive()}
    missing = {}
    for name, disk in state["disks"].items():
        link = servers / f"{name}.sock"
        target = Path(os.path.realpath(link)) if link.is_symlink() else None
        if target is None or target.parent not in alive or not target.exists():
            missing[name] = source_from_json(disk["source"])
    if not missing:
        return
    for directory in servers.iterdir():  # what dead servers left (a pid without a record, sockets) goes
        if directory.is_dir() and not directory.is_symlink() and directory not in alive:
            stop_daemon_dir(directory, runner=runner)
            shutil.rmtree(directory, ignore_errors=True)
    with contextlib.ExitStack() as undo:
        served = serve(missing, parent=servers, stack=undo, nbd=True, runner=runner)
        for name, uri in served.uris.items():
            socket = Path(uri.split("socket=", 1)[1])
            _link(socket=servers / f"{name}.sock", target=socket)
            if "size" not in state["disks"][name]:
                state["disks"][name]["size"] = _nbd_size(uri)
        write_json_atomic(Path(state["to"]) / STATE, state)
        undo.pop_all()  # the servers outlive this process from here on


def _create_image(disk: InstantDisk, runner: Runner) -> None:
    partial = disk.image.with_name(f".{disk.image.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    # -u: the backing file is checked by the VM that opens it; its size is known
    qemu_img.create(
        runner, partial, "qcow2", disk.virtual_size, backing=disk.backing, backing_format="raw", unsafe=True
    )
    os.chmod(partial, 0o600)
    os.replace(partial, disk.image)


def _node_of(monitor: QMPMonitor, image: Path) -> tuple[str, bool] | None:
    """(format node name, has a backing file) of the running VM's disk on ``image``, or None."""
    wanted = os.path.realpath(image)
    for block in monitor.query_block():
        inserted = block.get("inserted") or {}
        if os.path.realpath(str(inserted.get("file", ""))) == wanted:
            has_backing = bool(inserted.get("image", {}).get("backing-image")) or bool(
                inserted.get("backing_file")
            )
            return str(inserted["node-name"]), has_backing
    return None


def stream(
    to: Path,
    qmp: Path | QMPMonitor,
    *,
    speed: int = 0,
    timeout: float = 24 * 3600.0,
    progress: StreamProgress = _no_progress,
) -> StreamResult:
    """Copy every disk of an instant restore into its image (``block-stream`` in the running VM), then stop
    the servers and remove the state. Repeat it to resume: running jobs are awaited (at ``speed``),
    images that still have a backing file get a new job.

    :param to: the restore's directory (as given to :func:`prepare`)
    :param qmp: the QMP socket of the QEMU running on the images (or a connected monitor)
    :param speed: bytes per second per disk (0: as fast as it goes)
    :param timeout: seconds to wait for the copies
    :param progress: called with each disk's job counters
    :raise NotFoundError: ``to`` holds no instant restore, or the VM does not run on one of its images
    :raise BlockJobError: a copy failed (the VM keeps running on the backup; run again to retry)
    """
    if speed < 0:
        raise UsageError(f"speed {speed} is negative")
    to = Path(os.path.realpath(to))
    state = read_restore(to)
    started = time.monotonic()
    own = not isinstance(qmp, QMPMonitor)
    monitor = QMPMonitor(qmp).connect() if not isinstance(qmp, QMPMonitor) else qmp
    try:
        streamed, done = _stream_all(to, state, monitor, speed, timeout, progress)
    finally:
        if own:
            monitor.close()
    with contextlib.suppress(NotFoundError):  # `vmsnap recover` may have finished it meanwhile
        finish(to)
    return StreamResult(tuple(streamed), tuple(done), time.monotonic() - started)


def _stream_all(
    to: Path,
    state: dict[str, Any],
    monitor: QMPMonitor,
    speed: int,
    timeout: float,
    progress: StreamProgress,
) -> tuple[list[str], list[str]]:
    jobs = {job.id: job for job in monitor.query_jobs()}
    waiting: dict[str, str] = {}
    done: list[str] = []
    for name, disk in state["disks"].items():
        found = _node_of(monitor, Path(disk["image"]))
        if found is None:
            raise NotFoundError(
                f"the VM behind this QMP socket does not run on {disk['image']}",
                hint="start the VM on the prepared images first, or give the QMP socket of the one that does",
            )
        node, has_backing = found
        job_id = JOB_PREFIX + name
        job = jobs.get(job_id)
        if job is not None and job.status in ("concluded", "null"):
            with contextlib.suppress(BlockJobError):  # dismissed here; a failed copy is retried below
                monitor.wait_job(job_id, timeout=30)
            job = None
            again = _node_of(monitor, Path(disk["image"]))
            has_backing = again is not None and again[1]
        if job is not None:
            monitor.block_job_set_speed(job_id, speed)
            waiting[name] = job_id
        elif has_backing:
            monitor.start_job("block-stream", {"device": node, "speed": speed}, job_id=job_id)
            waiting[name] = job_id
        else:
            done.append(name)
    mark_streaming(to, state)
    deadline = time.monotonic() + timeout
    for name, job_id in waiting.items():
        left = max(deadline - time.monotonic(), 1.0)
        monitor.wait_job(
            job_id, timeout=left, progress=lambda current, total, disk=name: progress(disk, current, total)
        )
        found = _node_of(monitor, Path(state["disks"][name]["image"]))
        if found is None or found[1]:
            raise BlockJobError(job_id, "finished, but the image still has a backing file", hint="run again")
    return list(waiting), done


def mark_streaming(to: Path, state: dict[str, Any]) -> None:
    """Record in the state that the copies run (started, or found running), before waiting for them."""
    state["status"] = "streaming"
    write_json_atomic(to / STATE, state)
    crash_point("instant-mid-stream")


def read_restore(to: Path) -> dict[str, Any]:
    """The state of the instant restore in ``to``.

    :raise NotFoundError: there is none
    """
    state = read_state(Path(os.path.realpath(to)) / STATE)
    if state is None:
        raise NotFoundError(f"{to} holds no instant restore", hint="run the instant restore (prepare) first")
    return state


def prepared(to: Path) -> InstantRestore:
    """The instant restore in ``to`` as :func:`prepare` made it (to report on it while copying).

    :raise NotFoundError: there is none
    """
    to = Path(os.path.realpath(to))
    state = read_restore(to)
    servers = Path(state["run_dir"])
    disks = tuple(
        InstantDisk(name, Path(disk["image"]), servers / f"{name}.sock", int(disk.get("size", 0)))
        for name, disk in state["disks"].items()
    )
    return InstantRestore(to, disks, servers, resumed=True)


def backing_of(image: Path, runner: Runner | None = None) -> str | None:
    """The backing file an image's header names (``qemu-img info -U``: a running QEMU may hold it)."""
    backing = qemu_img.info(runner, image, fmt="qcow2", force_share=True).get("backing-filename")
    return str(backing) if backing else None


def finish(to: Path, *, runner: Runner | None = None) -> None:
    """Once no image needs the backup any more: stop the servers and remove the state (the images stay).

    :raise NotFoundError: ``to`` holds no instant restore
    :raise BlockJobError: an image still has its backup as backing file (nothing is stopped)
    """
    to = Path(os.path.realpath(to))
    state = read_restore(to)
    for name, disk in state["disks"].items():
        if Path(disk["image"]).exists() and backing_of(Path(disk["image"]), runner) is not None:
            raise BlockJobError(
                JOB_PREFIX + name,
                f"{disk['image']} still reads from the backup",
                hint="run the instant restore again to copy the rest; its servers keep running",
            )
    with locked(to):
        _release(to, Path(state["run_dir"]), runner or LocalRunner())
    with contextlib.suppress(FileNotFoundError):
        (to / ".lock").unlink()


def _release(to: Path | None, servers: Path, runner: Runner) -> list[str]:
    """Stop a restore's servers, remove their directory and the restore's state; returns what was stopped."""
    stopped = stop_daemons_under(servers, runner=runner)
    shutil.rmtree(servers, ignore_errors=True)
    if to is not None:
        with contextlib.suppress(FileNotFoundError):
            (to / STATE).unlink()
    return stopped


def _still_needed(state: dict[str, Any], runner: Runner) -> bool:
    """True while an image of the restore exists and still has its backup as backing file."""
    for disk in state.get("disks", {}).values():
        image = Path(str(disk.get("image", "")))
        if image.is_file() and backing_of(image, runner) is not None:
            return True
    return False


def recover(*, run_dir: Path = DEFAULT_RUN_DIR, runner: Runner | None = None) -> list[str]:
    """Stop the servers of instant restores that no longer need them: every image was copied (the copy
    ended while no vmsnap waited for it) or is gone (the restore was given up: its images or its directory
    removed), and servers no restore names. Restores whose images still read from the backup keep theirs
    (the same command, run again, restarts a server that died).

    :param run_dir: the servers' run directory (as given to :func:`prepare`)
    :return: one line per restore cleaned
    """
    run = runner or LocalRunner()
    if not run_dir.is_dir():
        return []
    done: list[str] = []
    pointed: list[tuple[Path, Path]] = []
    with locked(run_dir):
        for servers in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            to = _pointer(servers)
            if to is None:
                stopped = _release(None, servers, run)
                done.append(
                    f"removed servers no instant restore names ({', '.join(stopped) or 'none running'})"
                )
            else:
                pointed.append((servers, to))
    for servers, to in pointed:
        done += _recover_one(servers, to, run)
    return done


def _recover_one(servers: Path, to: Path, runner: Runner) -> list[str]:
    if not to.is_dir():
        stopped = _release(None, servers, runner)
        return [
            f"stopped the servers of the instant restore in {to}, which is gone ({', '.join(stopped) or '-'})"
        ]
    with locked(to):
        try:
            state = read_state(to / STATE)
        except VmsnapError:
            return [
                f"kept the servers of {to}: its state file is damaged (remove {to / STATE} to let them go)"
            ]
        if state is not None and Path(str(state.get("run_dir"))) == servers:
            if _still_needed(state, runner):
                return []
            stopped = _release(to, servers, runner)
            why = "every image is standalone"
        else:
            stopped = _release(None, servers, runner)
            why = "no restore there uses them"
    with contextlib.suppress(FileNotFoundError):
        (to / ".lock").unlink()
    return [f"stopped the servers of the instant restore in {to}: {why} ({', '.join(stopped) or '-'})"]
