"""Which VM an operation acts on: a running QEMU, a libvirt domain or powered-off images, named by a frozen
:class:`MachineSpec` and opened into a :class:`~vmsnap.vm.machine.Machine` by :func:`open_machine`.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from vmsnap.errors import UnsupportedError, UsageError
from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine


@attrs.frozen
class MachineSpec:
    """A VM named in exactly one way: a QEMU's QMP socket, a libvirt domain, or disk images.

    :param qmp: QMP unix socket of a running QEMU
    :param agent: that QEMU's guest agent socket (with ``qmp`` only)
    :param name: the VM's name in the repository (default: QEMU's ``-name``, or the first image's stem)
    :param domain: a libvirt domain's name or UUID
    :param connect: the libvirt connection URI (default ``qemu:///system``)
    :param images: the disk images of a powered-off VM
    :param host: ``user@host`` when the VM runs on another host (not supported yet)
    :raise UsageError: no VM named, or more than one way at once
    """

    qmp: Path | None = None
    agent: Path | None = None
    name: str | None = None
    domain: str | None = None
    connect: str | None = None
    images: tuple[Path, ...] = attrs.field(default=(), converter=tuple)
    host: str | None = None

    def __attrs_post_init__(self) -> None:
        if sum(bool(way) for way in (self.qmp, self.domain, self.images)) != 1:
            raise UsageError(
                "name exactly one VM",
                hint="use --qmp SOCKET [--agent SOCKET], --domain NAME, or --image FILE ...",
            )


def open_machine(spec: MachineSpec) -> Machine:
    """Connect to the VM ``spec`` names (the caller closes it). libvirt is imported only for a domain.

    :raise UnsupportedError: ``spec.host`` is set (remote VMs are not supported yet), or a domain is asked
        for and libvirt-python is missing
    :raise QMPConnectionError: nothing answers on the QMP socket
    :raise LibvirtError: libvirtd cannot be reached
    :raise NotFoundError: no such libvirt domain
    """
    if spec.host is not None:
        raise UnsupportedError(
            f"VMs on another host ({spec.host}) are not supported yet",
            hint="run vmsnap on the host where the VM runs",
        )
    if spec.qmp is not None:
        return QemuMachine(spec.qmp, spec.agent, name=spec.name)
    if spec.domain is not None:
        from vmsnap.vm.libvirt.machine import LibvirtMachine  # needs the optional libvirt extra

        return LibvirtMachine(spec.domain, uri=spec.connect)
    return OfflineMachine(list(spec.images), name=spec.name)
