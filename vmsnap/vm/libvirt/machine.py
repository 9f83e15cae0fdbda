"""LibvirtMachine: a libvirt domain as a vmsnap :class:`~vmsnap.vm.machine.Machine`.

libvirt owns the QMP socket and the agent channel, so commands go through its ``qemuMonitorCommand`` and
``qemuAgentCommand`` passthrough (:mod:`vmsnap.vm.libvirt.domain`). Beyond the channels, a domain keeps its
definition with each backup (so a restore can redefine it). Kept out of :mod:`vmsnap.vm.machine`: importing
vmsnap never needs libvirt.
"""

from __future__ import annotations

from vmsnap.vm.libvirt.definition import saved_domain_xml
from vmsnap.vm.libvirt.domain import (
    DEFAULT_URI,
    LibvirtAgentChannel,
    LibvirtDomain,
    LibvirtMonitor,
    libvirt_message,
    open_connection,
)
from vmsnap.vm.machine import OnThisHost
from vmsnap.vm.machine_state import MachineStateSource, libvirt_state_source

__all__ = [
    "DEFAULT_URI",
    "LibvirtAgentChannel",
    "LibvirtMachine",
    "LibvirtMonitor",
    "libvirt_message",
    "open_connection",
]


class LibvirtMachine(OnThisHost, LibvirtDomain):
    """A libvirt domain, running or shut off (see :class:`~vmsnap.vm.libvirt.domain.LibvirtDomain`).

    :param domain: the domain's name (or UUID)
    :param uri: libvirt connection URI (default ``qemu:///system``)
    :param runner: where host-side commands (qemu-img, qemu-nbd) run; default this host (a domain on another
        host is wrapped in a :class:`~vmsnap.vm.remote_machine.RemoteMachine` with that host's runner)
    :raise LibvirtError: libvirtd cannot be reached at ``uri``
    :raise NotFoundError: no such domain
    """

    def definition(self) -> str:
        """The domain's persistent XML, kept with each backup for ``restore --define``."""
        return saved_domain_xml(self)

    def machine_state(self) -> MachineStateSource | None:
        """The domain's UEFI variables (``<nvram>``) and emulated TPM state, when it has them (files on
        this host only)."""
        if self.runner.host != "local":
            return None
        return libvirt_state_source(self.xml_tree())

    def recover(self) -> list[str]:
        """Nothing: vmsnap keeps no state in libvirt (its strategies work through the passthrough and leave
        the domain as libvirt defined it; what a dead run left in QEMU is the strategy's to undo)."""
        return []
