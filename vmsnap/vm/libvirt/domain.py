"""A libvirt domain with QMP and the guest agent through libvirt (:class:`LibvirtDomain`); the snapshot,
backup and definition modules build on it, and :class:`~vmsnap.vm.libvirt.machine.LibvirtMachine` adds what
the backup orchestrator asks of a machine.

libvirt owns the QMP socket and the agent channel, so commands go through its ``qemuMonitorCommand`` and
``qemuAgentCommand`` passthrough. Kept out of :mod:`vmsnap.vm.machine`: importing vmsnap never needs libvirt.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

from vmsnap.errors import (
    AgentCommandError,
    AgentNotRespondingError,
    LibvirtError,
    NotFoundError,
    QMPCommandError,
    QMPConnectionError,
    UnsupportedError,
    UsageError,
)
from vmsnap.model import Disk, validate_name
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.guards import GuardPlan, GuardTarget, LocalGuardSite
from vmsnap.vm.machine import offline_disk
from vmsnap.vm.qmp import JobInfo, QMPMonitor, _qdev_name

try:
    import libvirt
    import libvirt_qemu
except ImportError:  # pragma: no cover - exercised only where libvirt-python is missing
    libvirt = None
    libvirt_qemu = None

DEFAULT_URI = "qemu:///system"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
IMAGE_FORMATS = frozenset({"qcow2", "raw", "qed", "vmdk", "vdi", "vpc", "vhdx", "luks", "parallels"})

_silenced = False


def _require_libvirt() -> None:
    if libvirt is None or libvirt_qemu is None:
        raise UnsupportedError(
            "libvirt-python is not installed, so libvirt domains cannot be used",
            hint="install python3-libvirt (Debian) or the 'libvirt' extra: pip install 'vmsnap[libvirt]'",
        )
    global _silenced
    if not _silenced:
        # libvirt prints every error to stderr by default; vmsnap reports them itself, once
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _silenced = True


def libvirt_message(err: Exception) -> str:
    """libvirt's own one-line text of an error (without the trailing newline some messages carry)."""
    text = err.get_error_message() if hasattr(err, "get_error_message") else None
    return " ".join(str(text or err).split())


def is_local_uri(uri: str | None) -> bool:
    """True when a libvirt URI names this host's libvirtd (no host part: ``qemu:///system``,
    ``qemu+unix:///system?socket=…``; None is the default, ``qemu:///system``)."""
    if uri is None:
        return True
    return urllib.parse.urlsplit(uri).netloc == ""


def open_connection(uri: str | None = None) -> Any:
    """Open a read-write libvirt connection.

    :param uri: e.g. ``qemu:///system`` (the default) or ``qemu:///system?socket=/run/x/libvirt-sock``
    :raise LibvirtError: libvirtd is not running, the URI is malformed or refused
    """
    _require_libvirt()
    target = uri or DEFAULT_URI
    try:
        return libvirt.open(target)
    except libvirt.libvirtError as err:
        raise LibvirtError(
            f"cannot connect to libvirt at {target}: {libvirt_message(err)}",
            hint="check that libvirtd runs and that --connect names it (try: virsh -c URI list --all)",
        ) from err


class LibvirtMonitor(QMPMonitor):
    """QMP through libvirt's ``qemuMonitorCommand`` passthrough, with the same methods as :class:`QMPMonitor`.

    libvirt does not forward QMP events to passthrough clients, so :meth:`wait_event` synthesises the job
    events (``JOB_STATUS_CHANGE``, ``BLOCK_JOB_READY``, ``BLOCK_JOB_COMPLETED``) by polling ``query-jobs``;
    :meth:`QMPMonitor.wait_job` and :meth:`QMPMonitor.run_job` therefore work unchanged. Other events cannot
    be waited for and raise :class:`QMPConnectionError` at once.

    :param domain: a ``virDomain`` of a running domain
    :param timeout: kept for interface compatibility; libvirt applies its own monitor timeouts
    """

    def __init__(self, domain: Any, *, timeout: float = 30.0) -> None:
        # QMPMonitor.__init__ would open an event loop and a socket client we never use
        _require_libvirt()
        self._domain = domain
        self.domain_name = str(domain.name())
        self.socket_path = Path(f"libvirt:{self.domain_name}")
        self.timeout = timeout
        self._backlog = []
        self._connected = True
        self._job_status: dict[str, str] = {}

    def events_buffered(self) -> None:
        """Nothing arrives by itself through libvirt's passthrough: events are made up by polling."""

    def connect(self) -> LibvirtMonitor:
        """Nothing to do: libvirt holds the connection. Checks that the domain runs."""
        self.execute("query-status")
        return self

    def close(self) -> None:
        """Forget the domain (the libvirt connection belongs to the machine)."""
        self._connected = False

    def __enter__(self) -> LibvirtMonitor:
        return self

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command through libvirt and return its ``return`` value.

        :raise QMPCommandError: QEMU answered with an error
        :raise QMPConnectionError: libvirt could not pass the command (domain not running, libvirtd gone)
        """
        args = dict(arguments) if arguments else None
        request: dict[str, Any] = {"execute": command}
        if args:
            request["arguments"] = args
        try:
            reply = libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(request), 0)
        except libvirt.libvirtError as err:
            raise QMPConnectionError(
                f"libvirt could not pass QMP {command} to domain {self.domain_name}: {libvirt_message(err)}",
                hint="check that the domain is running (virsh domstate) and that libvirtd is up",
            ) from err
        message = json.loads(reply)
        if "error" in message:
            error = message["error"]
            raise QMPCommandError(
                command, str(error.get("class", "?")), str(error.get("desc", "")), arguments=args
            )
        return message.get("return")

    # -- events, synthesised from query-jobs ---------------------------------------------------------

    def query_jobs(self) -> list[JobInfo]:
        """``query-jobs`` parsed; also remembers each job's state so :meth:`wait_event` sees changes."""
        jobs = super().query_jobs()
        self._job_status.update({j.id: j.status for j in jobs})
        return jobs

    def events(self, *, wait: float = 0.0) -> list[dict[str, Any]]:
        """Always empty: libvirt keeps QMP events to itself."""
        return []

    def _pump(self, wait: float) -> None:
        """Nothing to take in (there is no event socket; :meth:`QMPMonitor.wait_job` calls this)."""

    def wait_event(
        self, name: str, *, match: Mapping[str, Any] | None = None, timeout: float
    ) -> dict[str, Any]:
        """Poll ``query-jobs`` until a job event ``name`` would have been sent; return it as QEMU would.

        :raise QMPConnectionError: on timeout, or for an event that cannot be synthesised
        """
        match = dict(match or {})
        job_id = match.get("id", match.get("device"))
        if name not in ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED") or not job_id:
            raise QMPConnectionError(
                f"QMP event {name} cannot be received through libvirt passthrough",
                hint="wait on a job by polling query-jobs (QMPMonitor.wait_job does)",
            )
        deadline = time.monotonic() + timeout
        interval = 0.005
        while True:
            before = self._job_status.get(job_id)
            info = next((j for j in super().query_jobs() if j.id == job_id), None)
            status = info.status if info is not None else "null"
            if info is not None:
                self._job_status[job_id] = status
            else:
                self._job_status.pop(job_id, None)
            event = self._synthesise(name, job_id, status, before, match)
            if event is not None:
                return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPConnectionError(f"no {name} event within {timeout:g} s")
            time.sleep(min(interval, left))
            interval = min(interval * 1.5, 0.1)

    @staticmethod
    def _synthesise(
        name: str, job_id: str, status: str, before: str | None, match: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        if name == "JOB_STATUS_CHANGE":
            wanted = match.get("status")
            hit = status == wanted if wanted is not None else status != before
            return {"event": name, "data": {"id": job_id, "status": status}} if hit else None
        if name == "BLOCK_JOB_READY" and status == "ready":
            return {"event": name, "data": {"device": job_id}}
        if name == "BLOCK_JOB_COMPLETED" and status in ("concluded", "null"):
            return {"event": name, "data": {"device": job_id}}
        return None


class LibvirtAgentChannel:
    """Guest agent commands through libvirt's ``qemuAgentCommand`` (libvirt does the sync handshake)."""

    def __init__(self, domain: Any) -> None:
        _require_libvirt()
        self._domain = domain
        self.description = f"guest agent of libvirt domain {domain.name()}"

    def execute(self, command: str, arguments: Mapping[str, Any] | None, *, timeout: float) -> Any:
        """Send one guest-* command and return its ``return`` value.

        :raise AgentNotRespondingError: no agent configured or connected, or it did not answer in time
        :raise AgentCommandError: the agent answered with an error
        """
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        seconds = max(1, math.ceil(timeout))
        try:
            reply = libvirt_qemu.qemuAgentCommand(self._domain, json.dumps(request), seconds, 0)
        except libvirt.libvirtError as err:
            text = libvirt_message(err)
            marker = f"unable to execute QEMU agent command '{command}':"
            if marker in text:
                raise AgentCommandError(command, "libvirt", text.split(marker, 1)[1].strip()) from err
            raise AgentNotRespondingError(f"{self.description}: {text}") from err
        if reply is None:
            return None
        message = json.loads(reply)
        if "error" in message:
            error = message["error"]
            raise AgentCommandError(command, str(error.get("class", "?")), str(error.get("desc", "")))
        return message.get("return")

    def close(self) -> None:
        """Nothing to release (the connection belongs to the machine)."""


class LibvirtDomain:
    """A libvirt domain, running or shut off.

    Running: disks come from the live domain XML (target dev as the disk's name) joined with QMP
    ``query-block`` through passthrough (node names, backing chains); QMP and the agent go through libvirt.
    Shut off: disks come from the persistent XML and ``qemu-img info`` of their images, like
    :class:`~vmsnap.vm.machine.OfflineMachine`.

    :param domain: the domain's name (or UUID)
    :param uri: libvirt connection URI (default ``qemu:///system``)
    :param runner: where host-side commands (qemu-img, qemu-nbd) run; default this host
    :raise LibvirtError: libvirtd cannot be reached at ``uri``
    :raise NotFoundError: no such domain
    """

    def __init__(self, domain: str, *, uri: str | None = None, runner: Runner | None = None) -> None:
        if not domain:
            raise UsageError("--domain needs a domain name", hint="virsh list --all shows the domains")
        self.uri = uri or DEFAULT_URI
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self.connection = open_connection(self.uri)
        try:
            self.domain = self._lookup(domain)
            self.name = validate_name(str(self.domain.name()), "VM name")
        except BaseException:
            self.close()
            raise
        self._monitor: LibvirtMonitor | None = None

    def _lookup(self, domain: str) -> Any:
        try:
            return self.connection.lookupByName(domain)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError(f"looking up domain {domain!r} failed: {libvirt_message(err)}") from err
        with contextlib.suppress(libvirt.libvirtError):
            return self.connection.lookupByUUIDString(domain)
        raise NotFoundError(
            f"no libvirt domain {domain!r} at {self.uri}",
            hint=f"virsh -c {self.uri} list --all shows the domains",
        )

    # -- Machine protocol ----------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """True when the domain is active (paused counts: QEMU is there)."""
        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError as err:
            raise LibvirtError(
                f"cannot read the state of domain {self.name}: {libvirt_message(err)}"
            ) from err

    def qmp(self) -> LibvirtMonitor:
        """The domain's QMP monitor through libvirt passthrough.

        :raise UnsupportedError: the domain is shut off
        """
        if not self.is_running:
            raise UnsupportedError(
                f"libvirt domain {self.name} is not running: there is no QMP monitor",
                hint="start it (virsh start) or use a strategy that works on offline images",
            )
        if self._monitor is None:
            self._monitor = LibvirtMonitor(self.domain)
        return self._monitor

    def agent(self) -> GuestAgent | None:
        """The guest agent through libvirt, or None without an ``org.qemu.guest_agent.0`` channel."""
        if not self.is_running or not self.has_agent_channel():
            return None
        return GuestAgent(LibvirtAgentChannel(self.domain))

    def guard_plan(self) -> GuardPlan | None:
        """A guard on this host with a libvirt connection of its own to the same URI (for ``qemu+ssh://``
        that is libvirt's own ssh, which does not die with vmsnap), addressing the domain by UUID."""
        if not self.is_running or not self.has_agent_channel():
            return None
        try:
            uuid = str(self.domain.UUIDString())
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot read the UUID of domain {self.name}: {libvirt_message(err)}") from err
        return GuardPlan(GuardTarget.libvirt(self.uri, uuid, self.name), LocalGuardSite())

    def has_agent_channel(self) -> bool:
        """True when the domain XML has a virtio-serial channel for the QEMU guest agent."""
        root = self.xml_tree()
        return any(
            target.get("name") == AGENT_CHANNEL for target in root.iterfind("./devices/channel/target")
        )

    def disks(self) -> list[Disk]:
        """The domain's disks (device='disk' with a file or block source), in XML order.

        :raise UnsupportedError: a disk is of a kind vmsnap cannot read (network, volume)
        :raise NotFoundError: a shut-off domain's image is missing
        """
        entries = list(self._xml_disks())
        if not self.is_running:
            return [self._offline_disk(entry) for entry in entries]
        by_alias = {_qdev_name(d.qdev): d for d in self.qmp().disks() if d.qdev}
        disks = []
        for entry in entries:
            found = by_alias.get(entry["alias"])
            if found is None:
                raise LibvirtError(
                    f"disk {entry['target']} of domain {self.name} (alias {entry['alias']!r}) "
                    "is not in QEMU's query-block",
                    hint="the domain may have been changed behind libvirt's back; run vmsnap recover",
                )
            disks.append(
                Disk(
                    name=entry["target"],
                    node_name=found.node_name,
                    file=found.file,
                    # a filter on top (copy-before-write while a pull backup runs) is no image format
                    format=found.format if found.format in IMAGE_FORMATS else entry["format"],
                    virtual_size=found.virtual_size,
                    backing_chain=found.backing_chain,
                    qdev=found.qdev,
                    file_node=found.file_node,
                    read_only=found.read_only,
                )
            )
        return disks

    def close(self) -> None:
        """Close the libvirt connection (idempotent)."""
        self._monitor = None
        connection, self.connection = getattr(self, "connection", None), None
        if connection is not None:
            with contextlib.suppress(Exception):  # libvirtd may be gone already
                connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LibvirtDomain(domain={getattr(self, 'name', '?')!r}, uri={self.uri!r})"

    # -- libvirt specifics ---------------------------------------------------------------------------

    def xml(self, *, inactive: bool = False) -> str:
        """The domain XML: live when running (unless ``inactive``), else the persistent definition."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return str(self.domain.XMLDesc(flags))
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot read the XML of domain {self.name}: {libvirt_message(err)}") from err

    def xml_tree(self, *, inactive: bool = False) -> ET.Element:
        """:meth:`xml` parsed."""
        return ET.fromstring(self.xml(inactive=inactive))  # noqa: S314 - libvirt's own XML

    def block_targets(self) -> dict[str, str]:
        """What ``virsh domblklist`` shows: target dev → active source file (or device)."""
        return {e["target"]: e["source"] for e in self._xml_disks()}

    def _xml_disks(self) -> Iterable[dict[str, str]]:
        for disk in self.xml_tree().iterfind("./devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue
            target = disk.find("target")
            source = disk.find("source")
            driver = disk.find("driver")
            alias = disk.find("alias")
            dev = target.get("dev", "") if target is not None else ""
            kind = disk.get("type", "file")
            if kind not in ("file", "block"):
                raise UnsupportedError(
                    f"disk {dev} of domain {self.name} is of type {kind!r}; "
                    "vmsnap handles file and block disks"
                )
            path = "" if source is None else source.get("file" if kind == "file" else "dev", "")
            if not path:
                continue  # an empty drive
            yield {
                "target": validate_name(dev, "disk name"),
                "source": path,
                "format": driver.get("type", "raw") if driver is not None else "raw",
                "alias": alias.get("name", "") if alias is not None else "",
            }

    def _offline_disk(self, entry: Mapping[str, str]) -> Disk:
        image = Path(entry["source"])
        if not image.exists():
            raise NotFoundError(
                f"image {image} of disk {entry['target']} of domain {self.name} does not exist",
                hint="fix the domain's <source> (virsh edit) or restore the image",
            )
        return offline_disk(self.runner, image, entry["target"], default_format=entry["format"])
