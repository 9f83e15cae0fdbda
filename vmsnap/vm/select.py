"""Which VM an operation acts on: a running QEMU, a libvirt domain or powered-off images, here or on another
host, named by a frozen :class:`MachineSpec` and opened into a :class:`~vmsnap.vm.machine.Machine` by
:func:`open_machine`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import attrs

from vmsnap.errors import UsageError
from vmsnap.vm.hosts import HostPool, HostSpec, connect_with_openssh
from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine
from vmsnap.vm.remote import RemoteHost
from vmsnap.vm.remote_machine import RemoteMachine


def _paths(values: Iterable[Path | str]) -> tuple[Path, ...]:
    return tuple(Path(v) for v in values)


def _host(value: HostSpec | str | None) -> HostSpec | None:
    return HostSpec.parse(value) if isinstance(value, str) else value


@attrs.frozen
class MachineSpec:
    """A VM named in exactly one way: a QEMU's QMP socket, a libvirt domain, or disk images.

    :param qmp: QMP unix socket of a running QEMU
    :param agent: that QEMU's guest agent socket (with ``qmp`` only)
    :param name: the VM's name in the repository (default: QEMU's ``-name``, or the first image's stem)
    :param domain: a libvirt domain's name or UUID
    :param connect: the libvirt connection URI (default ``qemu:///system``; with ``host``:
        ``qemu+ssh://HOST/system``)
    :param images: the disk images of a powered-off VM
    :param host: the VM runs on another host, reached over OpenSSH (``user@host``, ``host``,
        ``user@host:port``, an ``~/.ssh/config`` alias); the paths above are that host's
    :raise UsageError: no VM named, or more than one way at once, or a malformed host
    """

    qmp: Path | None = None
    agent: Path | None = None
    name: str | None = None
    domain: str | None = None
    connect: str | None = None
    images: tuple[Path, ...] = attrs.field(default=(), converter=_paths)
    host: HostSpec | None = attrs.field(default=None, converter=_host)

    def __attrs_post_init__(self) -> None:
        if sum(bool(way) for way in (self.qmp, self.domain, self.images)) != 1:
            raise UsageError(
                "name exactly one VM",
                hint="use --qmp SOCKET [--agent SOCKET], --domain NAME, or --image FILE ...",
            )
        if self.host is not None:
            for path in (self.qmp, self.agent, *self.images):
                if path is not None and not path.is_absolute():
                    raise UsageError(
                        f"{path}: a path on {self.host} must be absolute",
                        hint="give the full path as it is on that host",
                    )


def open_machine(spec: MachineSpec, *, hosts: HostPool | None = None) -> Machine:
    """Connect to the VM ``spec`` names (the caller closes it). libvirt is imported only for a domain.

    A VM on another host becomes a :class:`~vmsnap.vm.remote_machine.RemoteMachine`: its QMP and agent
    sockets forwarded over the host's SSH master connection (from ``hosts``, shared; else one opened for this
    machine and closed with it), its commands run there.

    :raise UnsupportedError: a domain is asked for and libvirt-python is missing
    :raise QMPConnectionError: nothing answers on the QMP socket
    :raise LibvirtError: libvirtd cannot be reached
    :raise NotFoundError: no such libvirt domain, or a socket that does not exist on the other host
    :raise CommandError: ssh cannot connect to the other host (BatchMode: never a prompt)
    """
    if spec.host is None:
        return _local_machine(spec)
    host = hosts.get(spec.host) if hosts is not None else connect_with_openssh(spec.host).open()
    forwards: list[str] = []
    try:
        machine = _machine_on(spec, spec.host, host, forwards)
    except BaseException:
        for remote in forwards:
            host.cancel(remote)
        if hosts is None:
            host.close()
        raise
    return RemoteMachine(machine, host, forwards=forwards, owns_host=hosts is None)


def _local_machine(spec: MachineSpec) -> Machine:
    if spec.qmp is not None:
        return QemuMachine(spec.qmp, spec.agent, name=spec.name)
    if spec.domain is not None:
        from vmsnap.vm.libvirt.machine import LibvirtMachine  # needs the optional libvirt extra

        return LibvirtMachine(spec.domain, uri=spec.connect)
    return OfflineMachine(list(spec.images), name=spec.name)


def _machine_on(spec: MachineSpec, where: HostSpec, host: RemoteHost, forwards: list[str]) -> Machine:
    """The machine on ``host``, its sockets forwarded (each recorded in ``forwards`` once it is)."""
    if spec.qmp is not None:
        qmp = host.forward(spec.qmp)
        forwards.append(str(spec.qmp))
        agent = None
        if spec.agent is not None:
            agent = host.forward(spec.agent)
            forwards.append(str(spec.agent))
        return QemuMachine(qmp, agent, name=spec.name, runner=host.runner)
    if spec.domain is not None:
        from vmsnap.vm.libvirt.machine import LibvirtMachine

        return LibvirtMachine(spec.domain, uri=spec.connect or where.libvirt_uri(), runner=host.runner)
    return OfflineMachine(list(spec.images), name=spec.name, runner=host.runner)
