"""Synchronous QMP client on ``qemu.qmp``: one typed method per command vmsnap sends, jobs awaited on events.

One :class:`QMPMonitor` owns one connection and a private event loop; events are buffered from the moment
of connecting, so a job that finishes before we start waiting is never missed. Actions for a
:meth:`QMPMonitor.transaction` are data, built by the typed functions of :mod:`vmsnap.vm.qmp_actions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp import QMPError as _LibQMPError

from vmsnap.errors import BlockJobError, QMPCommandError, QMPConnectionError
from vmsnap.model import Disk

T = TypeVar("T")

JobState = str  # created, running, paused, ready, standby, waiting, pending, aborting, concluded, null


@attrs.frozen
class JobInfo:
    """One entry of ``query-jobs``."""

    id: str
    type: str
    status: JobState
    current_progress: int
    total_progress: int
    error: str | None = None


class QMPMonitor:
    """A connection to one QEMU (or qemu-storage-daemon) QMP socket.

    :param socket_path: the unix socket QEMU listens on (``-qmp unix:PATH,server=on,wait=off``)
    :param timeout: seconds to wait for connecting and for each command's answer
    :raise QMPConnectionError: from :meth:`connect` when the socket is missing, dead, busy or not QMP
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"vmsnap:{self.socket_path.name}")
        self._backlog: list[dict[str, Any]] = []
        self._connected = False

    # -- connection -------------------------------------------------------------------------------

    def connect(self) -> QMPMonitor:
        """Connect and negotiate capabilities.

        :raise QMPConnectionError: socket missing, not a socket, refusing, busy or not speaking QMP
        """
        path = self.socket_path
        if not path.exists():
            raise QMPConnectionError(f"QMP socket {path} does not exist")
        if not stat.S_ISSOCK(path.stat().st_mode):
            raise QMPConnectionError(f"{path} is not a unix socket")
        try:
            self._run(self._client.connect(str(path)), self.timeout)
        except TimeoutError as err:
            self._abandon()
            raise QMPConnectionError(
                f"no QMP greeting on {path} within {self.timeout:g} s",
                hint="another client may hold the QMP socket (QEMU serves one at a time), or it is not QMP",
            ) from err
        except ConnectError as err:
            self._abandon()
            cause = err.exc if getattr(err, "exc", None) is not None else err
            raise QMPConnectionError(f"cannot connect to QMP socket {path}: {cause}") from err
        except (_LibQMPError, OSError) as err:
            self._abandon()
            raise QMPConnectionError(f"{path} does not speak QMP: {err}") from err
        self._connected = True
        return self

    def _abandon(self) -> None:
        with contextlib.suppress(Exception):  # best effort on a connection that already failed
            self._run(self._client.disconnect(), 5)

    def close(self) -> None:
        """Disconnect (idempotent)."""
        if self._connected:
            self._connected = False
            with contextlib.suppress(Exception):  # the peer may be gone already
                self._run(self._client.disconnect(), 5)
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> QMPMonitor:
        if not self._connected:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, awaitable: Awaitable[T], timeout: float | None) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(awaitable, timeout))

    # -- commands ---------------------------------------------------------------------------------

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        :raise QMPCommandError: QEMU answered with an error (command, error class and text kept)
        :raise QMPConnectionError: the connection broke or QEMU did not answer in time
        """
        if not self._connected:
            raise QMPConnectionError(f"not connected to {self.socket_path}", hint="call connect() first")
        args = dict(arguments) if arguments else None
        try:
            return self._run(self._client.execute(command, args), timeout or self.timeout)
        except ExecuteError as err:
            raise QMPCommandError(command, err.error_class, str(err), arguments=args) from err
        except TimeoutError as err:
            raise QMPConnectionError(
                f"QEMU did not answer {command} within {timeout or self.timeout:g} s on {self.socket_path}",
                hint="QEMU may be hung; check its process and log",
            ) from err
        except (_LibQMPError, OSError, EOFError) as err:
            self._connected = False
            raise QMPConnectionError(
                f"QMP connection to {self.socket_path} lost during {command}: {err}"
            ) from err

    def add_fd(self, fd: int) -> int:
        """Pass the open descriptor ``fd`` to QEMU (``SCM_RIGHTS``, then ``add-fd``) in a new fd set; returns
        the set's id: QEMU opens ``/dev/fdset/<id>`` as that descriptor, whatever user it runs as. Remove it
        with ``remove-fd``.

        :raise QMPCommandError: QEMU refused it
        :raise QMPConnectionError: not connected, or the connection broke
        """
        if not self._connected:
            raise QMPConnectionError(f"not connected to {self.socket_path}", hint="call connect() first")
        try:
            self._client.send_fd_scm(fd)
        except (_LibQMPError, OSError) as err:
            raise QMPConnectionError(f"cannot pass a descriptor to {self.socket_path}: {err}") from err
        return int(self.execute("add-fd")["fdset-id"])

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (e.g. ``qemu-io``) and return its text output."""
        out = self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    def transaction(
        self, actions: Sequence[Mapping[str, Any]], *, completion_mode: str | None = None
    ) -> None:
        """Run ``actions`` atomically: all succeed or none takes effect.

        :param actions: ``{"type": ..., "data": {...}}`` items
        :param completion_mode: "grouped" makes jobs started by the actions fail or succeed together
        """
        args: dict[str, Any] = {"actions": [dict(a) for a in actions]}
        if completion_mode:
            args["properties"] = {"completion-mode": completion_mode}
        self.execute("transaction", args)

    def status(self) -> str:
        """The VM's run state ("running", "paused", "prelaunch", …)."""
        return str(self.execute("query-status")["status"])

    def name(self) -> str | None:
        """The name QEMU was started with (``-name``; ``query-name``), or None."""
        name = self.execute("query-name").get("name")
        return str(name) if name else None

    def quit(self) -> None:
        """Quit QEMU cleanly (``quit``: persistent bitmaps are written)."""
        self.execute("quit")

    def block_job_set_speed(self, job_id: str, speed: int) -> None:
        """Change a running block job's rate limit in bytes/s, 0 for none (``block-job-set-speed``)."""
        self.execute("block-job-set-speed", {"device": job_id, "speed": speed})

    def stop(self) -> None:
        """Pause the vCPUs (``stop``)."""
        self.execute("stop")

    def cont(self) -> None:
        """Resume the vCPUs (``cont``)."""
        self.execute("cont")

    def blockdev_add(self, options: Mapping[str, Any]) -> None:
        """Add a block node (``blockdev-add``)."""
        self.execute("blockdev-add", options)

    def blockdev_del(self, node_name: str) -> None:
        """Remove a block node that nothing uses any more (``blockdev-del``)."""
        self.execute("blockdev-del", {"node-name": node_name})

    def query_block(self) -> list[dict[str, Any]]:
        """Raw ``query-block``."""
        return list(self.execute("query-block"))

    def query_named_block_nodes(self) -> list[dict[str, Any]]:
        """Raw ``query-named-block-nodes`` (flat)."""
        return list(self.execute("query-named-block-nodes", {"flat": True}))

    def node_names(self) -> set[str]:
        """Every named block node."""
        return {n["node-name"] for n in self.query_named_block_nodes() if n.get("node-name")}

    def disks(self) -> list[Disk]:
        """The disks attached to guest devices, parsed from ``query-block`` (empty drives skipped)."""
        nodes = self.query_named_block_nodes()
        return disks_from_query_block(self.query_block(), nodes)

    def dirty_bitmaps(self, node_name: str) -> list[dict[str, Any]]:
        """The dirty bitmaps of a node (name, recording, persistent, inconsistent, count, granularity)."""
        for node in self.query_named_block_nodes():
            if node.get("node-name") == node_name:
                return list(node.get("dirty-bitmaps", []))
        return []

    def block_dirty_bitmap_remove(self, node_name: str, name: str) -> None:
        """Remove dirty bitmap ``name`` of ``node_name`` (a persistent one also from the image).

        :raise QMPCommandError: no such bitmap or node, or a job uses the bitmap
        """
        self.execute("block-dirty-bitmap-remove", {"node": node_name, "name": name})

    def filter_child(self, node_name: str, child: str = "file") -> str:
        """The node name of child ``child`` of node ``node_name`` (e.g. what a filter sits on); "" if unknown.

        QEMU 10.1 lists each node's children in ``query-named-block-nodes`` (``children``), which is read
        first. Older QEMUs (7.2 here) report children nowhere in a stable command, so the unstable
        ``x-debug-query-block-graph`` answers there; it is asked in this method only, and its answer is
        only used to name a node that is then removed, never to decide what data is kept.

        :raise QMPConnectionError: the connection broke
        """
        for node in self.query_named_block_nodes():
            if node.get("node-name") == node_name and "children" in node:
                found = (str(c.get("node-name", "")) for c in node["children"] if c.get("child") == child)
                return next(found, "")
        try:
            graph = self.execute("x-debug-query-block-graph")
        except QMPCommandError:
            return ""
        names = {n["id"]: n.get("name", "") for n in graph.get("nodes", [])}
        ids = {name: node_id for node_id, name in names.items()}
        for edge in graph.get("edges", []):
            if edge.get("parent") == ids.get(node_name) and edge.get("name") == child:
                return str(names.get(edge.get("child"), ""))
        return ""

    # -- devices ----------------------------------------------------------------------------------

    def device_node(self, qdev: str) -> str | None:
        """The node a guest device (``qdev``, its QOM path or id) reads and writes; None if it has none."""
        for block in self.query_block():
            if block.get("qdev") == qdev and block.get("inserted"):
                return str(block["inserted"].get("node-name"))
        return None

    def qom_set(self, path: str, prop: str, value: Any) -> None:
        """Set QOM property ``prop`` of object ``path`` (``qom-set``).

        :raise QMPCommandError: no such object or property, or the value is refused
        """
        self.execute("qom-set", {"path": path, "property": prop, "value": value})

    def set_device_node(self, qdev: str, node_name: str) -> None:
        """Make guest device ``qdev`` use block node ``node_name`` (its ``drive`` property), live.

        Setting the node a device already has aborts QEMU 7.2, so nothing is sent then.

        :raise QMPCommandError: QEMU refused the swap (the node's permissions conflict with the device's)
        """
        if self.device_node(qdev) == node_name:
            return
        self.qom_set(qdev, "drive", node_name)

    # -- NBD server and exports -------------------------------------------------------------------

    def nbd_server_start(self, socket_path: str | os.PathLike[str]) -> None:
        """Start QEMU's NBD server on a unix socket (QEMU runs one NBD server at a time).

        :raise QMPCommandError: a server runs already, or the socket cannot be bound
        """
        self.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket_path)}}})

    def nbd_server_stop(self) -> None:
        """Stop QEMU's NBD server (and with it every NBD export).

        :raise QMPCommandError: no NBD server runs
        """
        self.execute("nbd-server-stop")

    def block_export_add_nbd(
        self, export_id: str, node_name: str, *, name: str, bitmaps: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Export node ``node_name`` read-only on QEMU's NBD server as export ``name``.

        :param export_id: the export's id (for :meth:`block_export_del`)
        :param bitmaps: (node, bitmap) pairs exposed as ``qemu:dirty-bitmap:BITMAP`` metadata contexts
        :raise QMPCommandError: no NBD server runs, the id or name is taken, or a bitmap is missing
        """
        arguments: dict[str, Any] = {"type": "nbd", "id": export_id, "node-name": node_name, "name": name}
        arguments["writable"] = False
        if bitmaps:
            arguments["bitmaps"] = [{"node": node, "name": bitmap} for node, bitmap in bitmaps]
        self.execute("block-export-add", arguments)

    def block_export_del(self, export_id: str, *, hard: bool = True) -> None:
        """Remove a block export; ``hard`` disconnects its clients instead of waiting for them.

        The export is gone once QEMU sends ``BLOCK_EXPORT_DELETED`` (see :meth:`wait_event`).

        :raise QMPCommandError: no such export
        """
        self.execute("block-export-del", {"id": export_id, "mode": "hard" if hard else "safe"})

    def query_block_exports(self) -> list[dict[str, Any]]:
        """Raw ``query-block-exports``: the block exports (id, type, node-name, shutting-down)."""
        return list(self.execute("query-block-exports"))

    # -- events and jobs --------------------------------------------------------------------------

    def events(self, *, wait: float = 0.0) -> list[dict[str, Any]]:
        """Take every buffered event (waiting up to ``wait`` seconds for the first one)."""
        self._pump(wait)
        taken, self._backlog = self._backlog, []
        return taken

    def events_buffered(self) -> None:
        """Move the events that arrived into the buffer, without waiting."""
        self._pump(0)

    def _pump(self, wait: float) -> None:
        listener = self._client.events
        self._run(asyncio.sleep(0), None)
        self._backlog.extend(dict(m) for m in listener.clear())
        if self._backlog or wait <= 0:
            return
        try:
            self._backlog.append(dict(self._run(listener.get(), wait)))
        except TimeoutError:
            return
        self._backlog.extend(dict(m) for m in listener.clear())

    def wait_event(
        self, name: str, *, match: Mapping[str, Any] | None = None, timeout: float
    ) -> dict[str, Any]:
        """Wait for event ``name`` whose ``data`` contains ``match``; other events stay buffered.

        :raise QMPConnectionError: on timeout (naming the event)
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for i, event in enumerate(self._backlog):
                if event.get("event") == name and _matches(event.get("data", {}), match or {}):
                    return self._backlog.pop(i)
            seen = len(self._backlog)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPConnectionError(f"no {name} event within {timeout:g} s")
            self._pump_new(left, seen)

    def _pump_new(self, wait: float, seen: int) -> None:
        listener = self._client.events
        self._backlog.extend(dict(m) for m in listener.clear())
        if len(self._backlog) > seen:
            return
        try:
            self._backlog.append(dict(self._run(listener.get(), wait)))
        except TimeoutError:
            return

    def query_jobs(self) -> list[JobInfo]:
        """``query-jobs`` parsed."""
        return [
            JobInfo(
                id=j["id"],
                type=j["type"],
                status=j["status"],
                current_progress=int(j.get("current-progress", 0)),
                total_progress=int(j.get("total-progress", 0)),
                error=j.get("error"),
            )
            for j in self.execute("query-jobs")
        ]

    def job(self, job_id: str) -> JobInfo | None:
        """The job with this id, or None."""
        return next((j for j in self.query_jobs() if j.id == job_id), None)

    def job_cancel(self, job_id: str) -> None:
        """Ask a job to stop (``job-cancel``); it concludes a moment later (see :meth:`wait_job`).

        :raise QMPCommandError: no such job, or it cannot be cancelled in its state
        """
        self.execute("job-cancel", {"id": job_id})

    def job_complete(self, job_id: str) -> None:
        """Tell a job that is ready (mirror, active commit) to finish (``job-complete``).

        :raise QMPCommandError: no such job, or it is not ready
        """
        self.execute("job-complete", {"id": job_id})

    def job_dismiss(self, job_id: str) -> None:
        """Remove a concluded job from ``query-jobs`` (``job-dismiss``).

        :raise QMPCommandError: no such job, or it has not concluded
        """
        self.execute("job-dismiss", {"id": job_id})

    def start_job(self, command: str, arguments: Mapping[str, Any], *, job_id: str) -> None:
        """Start a block job with an explicit id and ``auto-dismiss`` off, so its error can be read."""
        self.execute(command, {**arguments, "job-id": job_id, "auto-dismiss": False})

    def wait_job(
        self,
        job_id: str,
        *,
        timeout: float,
        until: Iterable[JobState] = ("concluded",),
        complete_on_ready: bool = False,
        progress: Any = None,
    ) -> JobInfo | None:
        """Wait on JOB_STATUS_CHANGE events until the job reaches a state in ``until``.

        A job that concludes is dismissed here; if it failed, :class:`BlockJobError` is raised with QEMU's
        error. ``complete_on_ready`` sends ``job-complete`` when the job is ready (mirror, active commit).
        On timeout the job is cancelled, then :class:`BlockJobError` is raised.

        :return: the job's info at the state reached, or None once it is concluded and dismissed
        """
        wanted = set(until)
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        if info is None:
            raise BlockJobError(job_id, "no such job", hint="it may have been dismissed already")
        status = info.status
        while True:
            if status == "ready" and complete_on_ready:
                self.job_complete(job_id)
                complete_on_ready = False
            elif status in wanted and status != "concluded":
                return self.job(job_id)
            if status == "concluded":
                self._conclude(job_id)
                return None
            if progress is not None:
                current = self.job(job_id)
                if current is not None:
                    progress(current.current_progress, current.total_progress)
            left = deadline - time.monotonic()
            if left <= 0:
                self._cancel_after_timeout(job_id, timeout)
            try:
                event = self.wait_event("JOB_STATUS_CHANGE", match={"id": job_id}, timeout=min(left, 1.0))
                status = event["data"]["status"]
            except QMPConnectionError:
                # no event this second: re-read the state (also covers a job we cannot hear about)
                current = self.job(job_id)
                if current is None:
                    return None
                status = current.status

    def _conclude(self, job_id: str) -> None:
        info = self.job(job_id)
        if info is not None:
            self.job_dismiss(job_id)
        # a state read by query (no event within a second) leaves the job's later events buffered: drop them
        self.events_buffered()
        self._backlog = [
            e
            for e in self._backlog
            if not (e.get("event") == "JOB_STATUS_CHANGE" and e.get("data", {}).get("id") == job_id)
        ]
        if info is not None and info.error:
            raise BlockJobError(job_id, f"failed: {info.error}")

    def _cancel_after_timeout(self, job_id: str, timeout: float) -> None:
        with contextlib.suppress(BlockJobError, QMPCommandError):
            self.job_cancel(job_id)
            self.wait_job(job_id, timeout=30)
        raise BlockJobError(job_id, f"did not finish within {timeout:g} s; it was cancelled")

    def run_job(
        self,
        command: str,
        arguments: Mapping[str, Any],
        *,
        job_id: str,
        timeout: float = 3600.0,
        complete_on_ready: bool = False,
        progress: Any = None,
    ) -> None:
        """Start a job and wait until it has concluded (and is dismissed); raise if it failed."""
        self.start_job(command, arguments, job_id=job_id)
        self.wait_job(job_id, timeout=timeout, complete_on_ready=complete_on_ready, progress=progress)

    def block_commit(
        self,
        job_id: str,
        *,
        device: str,
        top_node: str,
        base_node: str,
        timeout: float,
        complete_on_ready: bool,
    ) -> None:
        """Merge ``top_node`` into ``base_node`` below it in ``device``'s chain and wait for the job.

        :param complete_on_ready: ``top_node`` is the active layer: the job is completed when ready, which
            moves the device onto ``base_node``
        :raise QMPCommandError: QEMU refused to start the job
        :raise BlockJobError: the job failed or ran past ``timeout`` (it was cancelled)
        """
        arguments = {"device": device, "top-node": top_node, "base-node": base_node}
        self.run_job(
            "block-commit", arguments, job_id=job_id, timeout=timeout, complete_on_ready=complete_on_ready
        )

    def block_stream(self, job_id: str, *, node: str, base_node: str | None, timeout: float) -> None:
        """Copy what lies below ``node`` down to ``base_node`` (None: the whole chain) into ``node``; wait.

        :raise QMPCommandError: QEMU refused to start the job
        :raise BlockJobError: the job failed or ran past ``timeout`` (it was cancelled)
        """
        arguments = {"device": node} if base_node is None else {"device": node, "base-node": base_node}
        self.run_job("block-stream", arguments, job_id=job_id, timeout=timeout)

    def snapshot_save(
        self, job_id: str, *, tag: str, vmstate: str, devices: Sequence[str], timeout: float
    ) -> None:
        """Save the VM's RAM into node ``vmstate`` and an internal snapshot ``tag`` of every node in
        ``devices``; wait for the job (the VM pauses while it runs).

        The snapshot jobs take no ``auto-dismiss``: :meth:`wait_job` dismisses them and raises their error.

        :raise QMPCommandError: QEMU refused to start the job
        :raise BlockJobError: the job failed (no disk keeps the snapshot) or ran past ``timeout``
        """
        self.execute(
            "snapshot-save", {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": list(devices)}
        )
        self.wait_job(job_id, timeout=timeout)

    def snapshot_load(
        self, job_id: str, *, tag: str, vmstate: str, devices: Sequence[str], timeout: float
    ) -> None:
        """Revert every node in ``devices`` to internal snapshot ``tag`` and load the RAM from node
        ``vmstate``; wait for the job. A failed load leaves the VM paused.

        :raise QMPCommandError: QEMU refused to start the job
        :raise BlockJobError: the job failed or ran past ``timeout``
        """
        self.execute(
            "snapshot-load", {"job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": list(devices)}
        )
        self.wait_job(job_id, timeout=timeout)

    def blockdev_snapshot_delete_internal_sync(self, node_name: str, name: str) -> None:
        """Delete internal snapshot ``name`` from the qcow2 image of ``node_name``.

        :raise QMPCommandError: no such snapshot or node
        """
        self.execute("blockdev-snapshot-delete-internal-sync", {"device": node_name, "name": name})


def _matches(data: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    return all(data.get(k) == v for k, v in match.items())


def _qdev_name(qdev: str) -> str:
    """``/machine/peripheral/disk0/virtio-backend`` → ``disk0``; a bare id stays as it is."""
    parts = [p for p in qdev.split("/") if p]
    if "peripheral" in parts:
        i = parts.index("peripheral")
        if i + 1 < len(parts):
            return parts[i + 1]
    return parts[-1] if parts else qdev


def _backing_chain(image: Mapping[str, Any]) -> tuple[Path, ...]:
    chain: list[Path] = []
    current = image.get("backing-image")
    while current:
        chain.append(Path(current["filename"]))
        current = current.get("backing-image")
    return tuple(chain)


def is_firmware_flash(block: Mapping[str, Any]) -> bool:
    """True for a ``query-block`` entry of a firmware flash device (``-drive if=pflash``, or a
    ``pflash0``/``pflash1`` machine property): the firmware and its variables, not a disk."""
    qdev = str(block.get("qdev") or "")
    return "/system.flash" in qdev or str(block.get("device") or "").startswith("pflash")


def disks_from_query_block(
    blocks: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]
) -> list[Disk]:
    """Parse ``query-block`` (+ ``query-named-block-nodes`` for protocol nodes) into :class:`Disk` values."""
    disks: list[Disk] = []
    for block in blocks:
        inserted = block.get("inserted")
        if not inserted or is_firmware_flash(block):
            continue  # firmware flash is machine state (vmsnap.vm.machine_state), not a disk
        node_name = str(inserted.get("node-name", ""))
        qdev = block.get("qdev") or None
        name = _qdev_name(qdev) if qdev else (block.get("device") or node_name)
        image = inserted.get("image", {})
        filename = str(inserted.get("file", image.get("filename", "")))
        file_node = ""
        for node in nodes:
            if (
                node.get("node-name")
                and node.get("node-name") != node_name
                and node.get("drv") in ("file", "host_device")
                and node.get("file") == filename
            ):
                file_node = str(node["node-name"])
                break
        disks.append(
            Disk(
                name=str(name),
                node_name=node_name,
                file=Path(filename),
                format=str(inserted.get("drv", image.get("format", "raw"))),
                virtual_size=int(image.get("virtual-size", 0)),
                backing_chain=_backing_chain(image),
                qdev=qdev,
                file_node=file_node,
                read_only=bool(inserted.get("ro", False)),
            )
        )
    return disks
