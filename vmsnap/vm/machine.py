"""Machines: what vmsnap backs up — a running QEMU (QMP + agent sockets), a libvirt domain, or bare images.

A machine lists its disks and hands out the channels a strategy needs (QMP, the guest agent, a runner). It
also knows where it runs: a machine on this host reads its exports as they are (:class:`OnThisHost`); one on
another hypervisor (:class:`vmsnap.vm.remote_machine.RemoteMachine`) forwards them through SSH and keeps a
backup's work files on its own host.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from vmsnap.errors import NotFoundError, UnsupportedError, UsageError
from vmsnap.image import qemu_img
from vmsnap.model import Disk, ExportSource, validate_name
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.guards import GuardPlan, GuardTarget, LocalGuardSite
from vmsnap.vm.machine_state import MachineStateSource, qemu_state_source
from vmsnap.vm.qmp import QMPMonitor


@runtime_checkable
class Machine(Protocol):
    """A VM (running or not) whose disks can be snapshotted."""

    name: str
    runner: Runner

    @property
    def is_running(self) -> bool:
        """True when a QEMU process serves the disks (QMP is available)."""
        ...

    def disks(self) -> list[Disk]:
        """The machine's disks, in device order."""
        ...

    def qmp(self) -> QMPMonitor:
        """The connected QMP monitor.

        :raise UnsupportedError: the machine is not running
        """
        ...

    def agent(self) -> GuestAgent | None:
        """The guest agent, or None when the machine has no agent channel."""
        ...

    def definition(self) -> str | None:
        """A definition to keep with each backup so that a restore can recreate the VM (a libvirt
        domain's XML), or None when the machine has none."""
        ...

    def machine_state(self) -> MachineStateSource | None:
        """Where the machine's state besides its disks is (a bare QEMU's command line and firmware
        variables, a libvirt domain's UEFI variables and TPM state), to capture with each backup
        (:mod:`vmsnap.vm.machine_state`); None when there is none vmsnap can read from here."""
        ...

    def recover(self) -> list[str]:
        """Undo what a dead vmsnap run left in the machine's manager; one line per action. Today's machines
        have nothing to undo there (vmsnap keeps no state in libvirt)."""
        ...

    def guard_plan(self) -> GuardPlan | None:
        """How a thaw guard reaches the guest agent without this process, and where it runs
        (:mod:`vmsnap.vm.guards`); None when the machine has no agent channel a guard can use."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    def reachable(self, source: ExportSource) -> AbstractContextManager[ExportSource]:
        """``source`` (a strategy's export, named as the machine's host sees it) as a reader on this host
        can open it, for the body of the ``with``: the same source for a machine on this host; an NBD
        export whose socket is forwarded (a file served over NBD first) for one on another host.

        :raise VmsnapError: it cannot be made reachable (the message names the export and the host)
        """
        ...

    def workspace(self, path: Path) -> AbstractContextManager[Path]:
        """``path``, a private local directory for a backup's work files (fleecing), as the machine's host
        needs it for the body: nothing to do on this host; on another host the same path is made there
        (0700) and removed afterwards, because QEMU writes those files where it runs."""
        ...


class OnThisHost:
    """What a machine on this host does about where it runs: nothing (its exports and files are here)."""

    def reachable(self, source: ExportSource) -> AbstractContextManager[ExportSource]:
        """``source`` itself."""
        return contextlib.nullcontext(source)

    @contextlib.contextmanager
    def workspace(self, path: Path) -> Iterator[Path]:
        """``path`` itself (the repository made it)."""
        yield path


def find_disk(disks: Sequence[Disk], name: str) -> Disk:
    """The disk called ``name`` (disk name, node name or file path).

    :raise NotFoundError: listing the names that exist
    """
    for disk in disks:
        if name in (disk.name, disk.node_name, str(disk.file)):
            return disk
    names = ", ".join(d.name for d in disks) or "none"
    raise NotFoundError(f"no disk {name!r}", hint=f"disks of this machine: {names}")


class QemuMachine(OnThisHost):
    """A running QEMU reached through its QMP socket (and, optionally, its guest agent socket).

    :param qmp_socket: ``-qmp unix:PATH,server=on,wait=off``
    :param agent_socket: the chardev socket behind virtio-serial port ``org.qemu.guest_agent.0``
    :param name: the VM's name in the repository; default: QEMU's ``-name``, else the socket's stem
    :param runner: where host-side commands run (qemu-img, qemu-nbd, btrfs …)
    """

    def __init__(
        self,
        qmp_socket: str | os.PathLike[str],
        agent_socket: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        runner: Runner | None = None,
        qmp_timeout: float = 30.0,
    ) -> None:
        self.qmp_socket = Path(qmp_socket)
        self.agent_socket = Path(agent_socket) if agent_socket is not None else None
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self._qmp_timeout = qmp_timeout
        self._monitor: QMPMonitor | None = None
        self._agent: GuestAgent | None = None
        if name is None:
            qemu_name = self.qmp().name()
            name = qemu_name or self.qmp_socket.stem
        self.name = validate_name(name, "VM name")

    @property
    def is_running(self) -> bool:
        return True

    def qmp(self) -> QMPMonitor:
        if self._monitor is None:
            self._monitor = QMPMonitor(self.qmp_socket, timeout=self._qmp_timeout).connect()
        return self._monitor

    def agent(self) -> GuestAgent | None:
        if self.agent_socket is None:
            return None
        if self._agent is None:
            self._agent = GuestAgent.from_socket(self.agent_socket)
        return self._agent

    def disks(self) -> list[Disk]:
        return self.qmp().disks()

    def definition(self) -> str | None:
        return None

    def machine_state(self) -> MachineStateSource | None:
        """The command line of the QEMU behind the QMP socket, its disks and writable pflash (this host
        only: the process is found by the socket's peer)."""
        if self.runner.host != "local":
            return None
        return qemu_state_source(self.qmp_socket, self.qmp())

    def recover(self) -> list[str]:
        return []

    def guard_plan(self) -> GuardPlan | None:
        """A guard on this host, on the agent's socket (and the QMP socket, to resume a VM left paused)."""
        if self.agent_socket is None:
            return None
        return GuardPlan(GuardTarget.socket(self.agent_socket, qmp=self.qmp_socket), LocalGuardSite())

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QemuMachine(name={self.name!r}, qmp={str(self.qmp_socket)!r})"


def offline_disk(runner: Runner, image: Path, name: str, *, default_format: str = "raw") -> Disk:
    """The :class:`Disk` of an image no QEMU holds open, from ``qemu-img info --backing-chain``.

    :raise CommandError: qemu-img cannot read it (not an image, damaged), with a hint saying so
    """
    chain = qemu_img.readable_chain(runner, image)
    top = chain[0]
    return Disk(
        name=name,
        node_name="",
        file=image,
        format=str(top.get("format", default_format)),
        virtual_size=int(top["virtual-size"]),
        backing_chain=tuple(Path(c["filename"]) for c in chain[1:]),
    )


class OfflineMachine(OnThisHost):
    """Disk images of a VM that is not running (qemu-img and qemu-nbd do the work).

    :param images: the images; each disk is named after its file's stem unless ``disk_names`` says otherwise
    :param name: the VM's name in the repository (default: the first image's stem)
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        disk_names: Sequence[str] | None = None,
        runner: Runner | None = None,
    ) -> None:
        if not images:
            raise UsageError("an offline machine needs at least one image", hint="pass --image FILE")
        self.images = [Path(i) for i in images]
        self.runner: Runner = runner if runner is not None else LocalRunner()
        self.name = validate_name(name or self.images[0].stem, "VM name")
        names = list(disk_names) if disk_names is not None else [p.stem for p in self.images]
        if len(names) != len(self.images):
            raise UsageError("disk_names must name every image")
        if len(set(names)) != len(names):
            raise UsageError(
                f"two images would share a disk name: {names}", hint="give them distinct file names"
            )
        self.disk_names = [validate_name(n, "disk name") for n in names]

    @property
    def is_running(self) -> bool:
        return False

    def qmp(self) -> QMPMonitor:
        raise UnsupportedError(f"{self.name} is not running: there is no QMP monitor for offline images")

    def agent(self) -> GuestAgent | None:
        return None

    def disks(self) -> list[Disk]:
        disks = []
        here = self.runner.host == "local"  # on another host qemu-img says what is missing
        for image, disk_name in zip(self.images, self.disk_names, strict=True):
            if here and not image.exists():
                raise NotFoundError(f"image {image} does not exist", hint="check the --image path")
            disks.append(offline_disk(self.runner, image.resolve() if here else image, disk_name))
        return disks

    def definition(self) -> str | None:
        return None

    def machine_state(self) -> MachineStateSource | None:
        return None

    def recover(self) -> list[str]:
        return []

    def guard_plan(self) -> GuardPlan | None:
        return None  # nothing runs, nothing freezes

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"OfflineMachine(name={self.name!r}, images={[str(i) for i in self.images]!r})"
