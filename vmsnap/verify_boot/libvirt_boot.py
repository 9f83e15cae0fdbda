"""Boot a libvirt domain's backup: a transient domain made from the saved definition (:func:`boot_domain_xml`)
on the session's overlays, with the backup's UEFI variables and TPM state, and removed afterwards.

A transient domain (``virDomainCreateXML``) leaves no definition behind;
:func:`vmsnap.vm.libvirt.definition.remove_domain` destroys it by the UUID recorded before it was created
(and only when it bears the copy's name) for :func:`~vmsnap.restore.boot_session.recover`.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmsnap.restore.boot_session import BootSession, BootStartError
from vmsnap.verify_boot.probe import screenshot
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.libvirt.definition import QEMU_NS, refuse_host_resources, restored_domain_xml
from vmsnap.vm.libvirt.domain import (
    AGENT_CHANNEL,
    LibvirtAgentChannel,
    LibvirtMonitor,
    libvirt_message,
    open_connection,
)
from vmsnap.vm.libvirt.firmware import place_tpm_state, set_nvram, tpm_state_dir, tpm_version
from vmsnap.vm.machine_state import NVRAM, TPM, MachineState

NIC_SLOT = "0x19"
"""The PCI slot of the restricted NIC added to a copy (on the root bus)."""


def boot_domain_xml(
    xml: str,
    *,
    name: str,
    uuid: str,
    images: Mapping[str, Path],
    console: Path,
    graphics: Path,
    ports: Mapping[int, int],
) -> ET.Element:
    """The definition of a throwaway copy of a saved domain (see :func:`restored_domain_xml` for the disks,
    name and MACs): a new UUID; no ``<interface>`` (a restricted user-mode NIC forwarding ``ports`` from
    127.0.0.1 is added through ``<qemu:commandline>`` when ports are asked); serial ports and consoles
    replaced by one serial port logging to ``console``; graphics replaced by VNC on the private unix
    socket ``graphics``; a guest agent channel added when the definition has none. The emulator is this
    host's (libvirt's default), the TPM state and NVRAM the session's.

    :raise UsageError: a disk of the definition has no image
    :raise UnsupportedError: the definition uses its host's resources (a LUN or writable floppy, a shared
        directory, a host device, a character device on a host file, ``<qemu:commandline>``, …:
        :func:`~vmsnap.vm.libvirt.definition.host_resource`)
    """
    ET.register_namespace("qemu", QEMU_NS)
    definition = restored_domain_xml(xml, name=name, images=images, check=False)
    root = ET.fromstring(definition)  # noqa: S314 - made just above
    uuid_node = ET.Element("uuid")
    uuid_node.text = uuid
    root.insert(1, uuid_node)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    had_serial = any(True for _ in devices.iter("serial")) or any(True for _ in devices.iter("console"))
    had_graphics = devices.find("graphics") is not None
    for tag in ("interface", "serial", "console", "graphics"):
        for node in devices.findall(tag):
            devices.remove(node)
    refuse_host_resources(root)  # before the copy's own console file and QEMU arguments are added
    if had_serial:
        serial = ET.SubElement(devices, "serial", {"type": "file"})
        ET.SubElement(serial, "source", {"path": str(console)})
        ET.SubElement(serial, "target", {"port": "0"})
    if had_graphics:
        ET.SubElement(devices, "graphics", {"type": "vnc", "socket": str(graphics)})
    if not any(t.get("name") == AGENT_CHANNEL for t in devices.iterfind("channel/target")):
        channel = ET.SubElement(devices, "channel", {"type": "unix"})
        ET.SubElement(channel, "source", {"mode": "bind"})
        ET.SubElement(channel, "target", {"type": "virtio", "name": AGENT_CHANNEL})
    if ports:
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in sorted(ports.items()))
        # QEMU sees these arguments before libvirt's devices: an address of its own, which libvirt's
        # allocator (integrated devices from slot 1 up, root ports after them) does not hand out
        machine = root.find("os/type")
        bus = "pcie.0" if machine is not None and "q35" in (machine.get("machine") or "") else "pci.0"
        commandline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for arg in (
            "-netdev",
            f"user,id=vmsnap-net0,restrict=on,{forwards}",
            "-device",
            f"virtio-net-pci,netdev=vmsnap-net0,bus={bus},addr={NIC_SLOT}",
        ):
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", {"value": arg})
    return root


@attrs.define
class DomainCopy:
    """A running throwaway domain.

    :param domain: its ``virDomain``
    :param console: its serial console log (None: the definition has no serial port)
    :param accelerator: "kvm" or "tcg"
    """

    connection: Any
    domain: Any
    name: str
    console: Path | None
    accelerator: str

    def alive(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.domain.isActive())
        return False

    def monitor(self) -> LibvirtMonitor:
        return LibvirtMonitor(self.domain)

    def agent(self) -> GuestAgent:
        return GuestAgent(LibvirtAgentChannel(self.domain))

    def screenshot(self, path: Path) -> str | None:
        """Its screen into ``path`` (PNG, ``screendump`` through libvirt); None on success, else why not."""
        return screenshot(self.monitor(), path)

    def stop(self) -> None:
        """Destroy the domain (it is transient: nothing of it is left in libvirt) and close the connection."""
        with contextlib.suppress(Exception):
            if self.domain.isActive():
                self.domain.destroy()
        with contextlib.suppress(Exception):
            self.connection.close()


def start_domain_copy(
    session: BootSession,
    xml: str,
    state: MachineState | None,
    overlays: Mapping[str, Path],
    *,
    name: str,
    uuid: str,
    uri: str | None,
    ports: Mapping[int, int],
) -> DomainCopy:
    """Create and start the throwaway domain of a saved definition on ``overlays``, with the backup's UEFI
    variables and TPM state when it kept them.

    :raise BootStartError: libvirt refused to create or start it
    """
    import libvirt

    console = session.directory / "console.log"
    root = boot_domain_xml(
        xml,
        name=name,
        uuid=uuid,
        images=overlays,
        console=console,
        graphics=session.directory / "vnc.sock",
        ports=ports,
    )
    files = state.files if state is not None else {}
    if NVRAM in files and root.find("os/nvram") is not None:
        set_nvram(root, session.directory / "nvram.fd", files[NVRAM])
    version = tpm_version(root)
    if TPM in files and version is not None:
        tpm_dir = tpm_state_dir(uuid, version)
        session.record(tpm_dir=str(tpm_dir))
        place_tpm_state(tpm_dir, files[TPM])
    accelerator = "kvm" if root.get("type") == "kvm" else "tcg"
    has_console = root.find("devices/serial[@type='file']") is not None
    session.record(domain={"name": name, "uri": uri, "uuid": uuid})  # cleanup removes this UUID only
    connection = open_connection(uri)
    try:
        domain = connection.createXML(ET.tostring(root, encoding="unicode"), 0)
    except libvirt.libvirtError as err:
        connection.close()
        raise BootStartError(f"libvirt could not start the copy {name}: {libvirt_message(err)}") from err
    return DomainCopy(connection, domain, name, console if has_console else None, accelerator)
