"""A libvirt domain's definition kept with its backup, and redefined on restored images."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from vmsnap.errors import (
    LibvirtError,
    UnsupportedError,
    UsageError,
)
from vmsnap.vm.libvirt.domain import LibvirtDomain, libvirt_message
from vmsnap.vm.libvirt.firmware import clear_nvram, place_tpm_state, set_nvram, tpm_state_dir, tpm_version
from vmsnap.vm.machine_state import NVRAM, TPM, MachineState

try:
    import libvirt
except ImportError:  # pragma: no cover - LibvirtDomain() reports the missing package
    libvirt = None
from vmsnap.model import validate_name

# -- restoring a domain ---------------------------------------------------------------------------

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_CHAR_TAGS = frozenset({"serial", "console", "parallel", "channel", "redirdev"})
_CHAR_TYPES = frozenset({"pty", "null", "vc", "spicevmc", "spiceport", "qemu-vdagent", "unix"})
"""Character device types a copy may have: none writes a host file or device, or binds a host port (a unix
channel's path is dropped: libvirt makes the copy its own)."""


def saved_domain_xml(machine: LibvirtDomain) -> str:
    """The domain's persistent definition, to store beside a backup so a restore can redefine it."""
    return machine.xml(inactive=True)


def definition_problem(xml: str) -> str | None:
    """What makes ``xml`` no domain definition ("is not well-formed XML (…)", "has no <name>"), or None."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - a libvirt definition vmsnap saved
    except ET.ParseError as err:
        return f"is not well-formed XML ({err})"
    if root.tag != "domain":
        return f"is a <{root.tag}>, not a <domain>"
    if root.find("name") is None:
        return "has no <name>"
    return None


def restored_domain_xml(
    xml: str,
    *,
    name: str,
    images: Mapping[str, Path],
    nvram: tuple[Path, bytes] | None = None,
    check: bool = True,
) -> str:
    """A copy of a saved domain definition that runs on restored images and cannot clash with the original.

    The name is replaced, the UUID and MAC addresses dropped (libvirt makes new ones), every disk points
    at its restored qcow2 image, and agent sockets get libvirt's default paths. The UEFI variables file
    (``<nvram>``, as text or ``<source file=…>``) is ``nvram``'s path, written with its bytes (the variables
    kept with the backup); without them the path is dropped, so libvirt makes the new domain its own from
    the template: never the original's file. A serial port or console on a host file, device or port
    becomes a pty, and no character device keeps its ``<log>`` file. An emulated TPM's ``<source>`` (the
    original's state directory) is dropped: the new domain's state is libvirt's default one for its UUID.
    ``<emulator>`` is dropped: libvirt picks this host's QEMU.

    :param images: disk target (``vda``) → restored image; every disk of the domain must have one
    :param nvram: (path, content) of the new domain's UEFI variables
    :param check: refuse a definition that uses its host's resources (:func:`refuse_host_resources`)
    :raise UsageError: a disk of the saved domain has no restored image (it would share the original's), or
        ``xml`` is no domain definition (:func:`definition_problem`)
    :raise UnsupportedError: the definition uses its host's resources (``check``)
    """
    validate_name(name, "domain name")
    problem = definition_problem(xml)
    if problem is not None:
        raise UsageError(f"the saved domain XML {problem}", hint="is it a libvirt domain definition?")
    root = ET.fromstring(xml)  # noqa: S314 - a libvirt definition vmsnap saved
    name_node = root.find("name")
    assert name_node is not None
    name_node.text = name
    for tag in ("uuid", "description"):
        for node in root.findall(tag):
            root.remove(node)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    _swap_disks(devices, images)
    for interface in devices.findall("interface"):
        for mac in interface.findall("mac"):
            interface.remove(mac)
    _own_char_devices(devices)
    emulator = devices.find("emulator")
    if emulator is not None:
        devices.remove(emulator)  # libvirt picks this host's QEMU for the domain's arch and machine
    for backend in devices.iterfind("tpm/backend[@type='emulator']"):
        for source in backend.findall("source"):  # the original's state: the copy's is libvirt's default
            backend.remove(source)
    saved_nvram = root.find("os/nvram")
    if saved_nvram is not None:
        if nvram is not None:
            set_nvram(root, nvram[0], nvram[1])
        else:
            clear_nvram(saved_nvram)
    if check:
        refuse_host_resources(root)
    return ET.tostring(root, encoding="unicode")


def _swap_disks(devices: ET.Element, images: Mapping[str, Path]) -> None:
    """Point every ``<disk device='disk'>`` with a source at its restored qcow2 image.

    :raise UsageError: a disk has no image in ``images``
    """
    missing = []
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if disk.get("device", "disk") != "disk" or disk.find("source") is None:
            continue
        if dev not in images:
            missing.append(dev)
            continue
        disk.set("type", "file")
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", "qcow2")
        disk.insert(1, ET.Element("source", {"file": str(images[dev])}))
    if missing:
        raise UsageError(
            f"the restore has no image for disk(s) {', '.join(missing)} of the saved domain",
            hint="restore every disk of the backup (no --disk filter) to redefine the domain",
        )


def _own_char_devices(devices: ET.Element) -> None:
    """Character devices of the new domain's own: unix sockets at libvirt's paths, no ``<log>`` file, a
    serial port or console on a host file, device or port made a pty."""
    for char in list(devices.iter()):
        if char.tag not in _CHAR_TAGS:
            continue
        for log in char.findall("log"):
            char.remove(log)  # the original's log file
        source = char.find("source")
        if char.get("type") == "unix" and source is not None:
            source.attrib.pop("path", None)  # libvirt gives the new domain sockets of its own
        elif char.tag in ("serial", "console") and char.get("type", "pty") not in _CHAR_TYPES:
            char.set("type", "pty")  # the console stays; the original's file, device or port does not
            for child in char.findall("source") + char.findall("protocol"):
                char.remove(child)


def host_resource(root: ET.Element) -> str | None:
    """What a domain definition uses of its host that a second domain would share with it or take from it
    (a LUN or writable floppy, a shared directory, a host device, a character device on a host file, device
    or port, shared memory, QEMU arguments or overrides of its own), or None.

    A definition made by :func:`restored_domain_xml` has its disks, NVRAM, TPM state and emulator replaced
    already; this names what is left.
    """
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith(f"{{{QEMU_NS}}}"):
            return f"<qemu:{element.tag.split('}', 1)[1]}> (QEMU arguments libvirt does not check)"
    devices = root.find("devices")
    if devices is None:
        return None
    for disk in devices.findall("disk"):
        device = disk.get("device", "disk")
        if disk.find("source") is None or device in ("disk", "cdrom") or disk.find("readonly") is not None:
            continue
        return f"a writable <disk device='{device}'> ({_source(disk)})"
    for tag, why in (
        ("filesystem", "a host directory shared with the guest"),
        ("hostdev", "a host device passed through"),
        ("shmem", "memory shared with the host"),
    ):
        found = devices.find(tag)
        if found is not None:
            return f"<{tag}> ({why}: {_source(found)})"
    for memory in devices.findall("memory"):
        if memory.find("source/path") is not None:
            return f"<memory model='{memory.get('model')}'> on the host file {memory.findtext('source/path')}"
    for interface in devices.findall("interface"):
        if interface.get("type") in ("hostdev", "vhostuser", "vdpa"):
            return f"<interface type='{interface.get('type')}'> (a host device or socket)"
    for tpm in devices.findall("tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") != "emulator":
            return f"a TPM <backend type='{backend.get('type')}'> (the host's TPM)"
    for audio in devices.findall("audio"):
        if audio.get("type") == "file":
            return f"<audio type='file'> (writes {audio.get('path', '?')})"
    for tag in ("input", "smartcard"):
        for found in devices.findall(tag):
            if found.get("type") in ("passthrough", "evdev") or found.get("mode") == "host":
                return f"<{tag}> of the host ({_source(found)})"
    chars = [
        *(
            (tag, node)
            for tag in ("serial", "console", "parallel", "channel", "redirdev")
            for node in devices.findall(tag)
        ),
        *(("smartcard", node) for node in devices.findall("smartcard[@mode='passthrough']")),
        *(("rng backend", node) for node in devices.findall("rng/backend[@model='egd']")),
    ]
    for tag, node in chars:
        kind = node.get("type", "pty")
        if kind not in _CHAR_TYPES:
            return f"a <{tag} type='{kind}'> ({_source(node)}: a host file, device or port)"
    return None


def _source(element: ET.Element) -> str:
    source = element.find("source")
    if source is None:
        return element.findtext("device") or "?"
    return next((v for k, v in source.attrib.items() if k in ("file", "dev", "path", "dir", "name")), "?")


def refuse_host_resources(root: ET.Element) -> None:
    """:raise UnsupportedError: the definition uses something of its host (:func:`host_resource`)."""
    problem = host_resource(root)
    if problem is not None:
        raise UnsupportedError(
            f"the saved domain definition has {problem}, which a second domain would share with the original",
            hint="vmsnap defines or boots a copy only when it shares nothing writable with the original",
        )


def define_restored_domain(
    machine_or_uri: LibvirtDomain | str | None,
    xml: str,
    *,
    name: str,
    images: Mapping[str, Path],
    state: MachineState | None = None,
    nvram_dir: Path | None = None,
) -> str:
    """Define (not start) a new domain ``name`` from a saved definition over restored images, with the
    UEFI variables and TPM state kept with the backup (``state``) put back: the variables in
    ``nvram_dir/<name>_VARS.fd``, the TPM state where libvirt keeps the new domain's.

    :param machine_or_uri: a connected machine, or the libvirt URI to connect to
    :param state: the machine state kept with the backup (None: no firmware state to put back)
    :param nvram_dir: where the UEFI variables go (default: beside the first image)
    :return: the new domain's name
    :raise UsageError: a domain called ``name`` exists already, or a disk has no restored image
    :raise LibvirtError: libvirt refused the definition
    """
    from vmsnap.vm.libvirt.domain import open_connection

    files = state.files if state is not None else {}
    nvram = None
    if NVRAM in files:
        where = nvram_dir or (next(iter(images.values())).parent if images else Path("."))
        nvram = (where / f"{name}_VARS.fd", files[NVRAM])
    definition = restored_domain_xml(xml, name=name, images=images, nvram=nvram)
    if isinstance(machine_or_uri, LibvirtDomain):
        own, conn = False, machine_or_uri.connection
    else:
        own, conn = True, open_connection(machine_or_uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name)
            raise UsageError(f"a libvirt domain {name!r} exists already", hint="choose another --define name")
        try:
            domain = conn.defineXML(definition)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"libvirt refused to define domain {name!r}: {libvirt_message(err)}") from err
        version = tpm_version(ET.fromstring(definition))  # noqa: S314 - made above
        if TPM in files and version is not None:
            place_tpm_state(tpm_state_dir(str(domain.UUIDString()), version), files[TPM])
    finally:
        if own:
            conn.close()
    return name


def remove_domain(name: str, uri: str | None, *, uuid: str | None) -> bool:
    """Destroy the domain of UUID ``uuid`` when it is called ``name`` (and undefine it with its NVRAM and TPM
    state, were it persistent); True when there was one. A domain of that name with another UUID is not
    touched, nor is any domain when ``uuid`` is None (a session that recorded none). Never raises:
    libvirtd may be gone."""
    from vmsnap.vm.libvirt.domain import open_connection

    if libvirt is None or not uuid:
        return False
    try:
        connection = open_connection(uri)
    except LibvirtError:
        return False
    try:
        try:
            domain = connection.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return False
        if domain.name() != name:
            return False
        with contextlib.suppress(libvirt.libvirtError):
            if domain.isActive():
                domain.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        return True
    finally:
        with contextlib.suppress(Exception):
            connection.close()
