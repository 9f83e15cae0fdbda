"""A libvirt domain's definition kept with its backup, and redefined on restored images."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from vmsnap.errors import (
    LibvirtError,
    UsageError,
)
from vmsnap.vm.libvirt.domain import LibvirtDomain, libvirt_message

try:
    import libvirt
except ImportError:  # pragma: no cover - LibvirtDomain() reports the missing package
    libvirt = None
from vmsnap.model import validate_name

# -- restoring a domain ---------------------------------------------------------------------------


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


def restored_domain_xml(xml: str, *, name: str, images: Mapping[str, Path]) -> str:
    """A copy of a saved domain definition that runs on restored images and cannot clash with the original.

    The name is replaced, the UUID and MAC addresses dropped (libvirt makes new ones), every disk points
    at its restored qcow2 image, and agent sockets get libvirt's default paths.

    :param images: disk target (``vda``) → restored image; every disk of the domain must have one
    :raise UsageError: a disk of the saved domain has no restored image (it would share the original's), or
        ``xml`` is no domain definition (:func:`definition_problem`)
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
    missing = []
    for disk in devices.findall("disk") if devices is not None else []:
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
    for interface in devices.findall("interface") if devices is not None else []:
        for mac in interface.findall("mac"):
            interface.remove(mac)
    for channel in devices.findall("channel") if devices is not None else []:
        source = channel.find("source")
        if channel.get("type") == "unix" and source is not None:
            source.attrib.pop("path", None)
    return ET.tostring(root, encoding="unicode")


def define_restored_domain(
    machine_or_uri: LibvirtDomain | str | None, xml: str, *, name: str, images: Mapping[str, Path]
) -> str:
    """Define (not start) a new domain ``name`` from a saved definition over restored images.

    :param machine_or_uri: a connected machine, or the libvirt URI to connect to
    :return: the new domain's name
    :raise UsageError: a domain called ``name`` exists already, or a disk has no restored image
    :raise LibvirtError: libvirt refused the definition
    """
    from vmsnap.vm.libvirt.domain import open_connection

    definition = restored_domain_xml(xml, name=name, images=images)
    if isinstance(machine_or_uri, LibvirtDomain):
        own, conn = False, machine_or_uri.connection
    else:
        own, conn = True, open_connection(machine_or_uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name)
            raise UsageError(f"a libvirt domain {name!r} exists already", hint="choose another --define name")
        try:
            conn.defineXML(definition)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"libvirt refused to define domain {name!r}: {libvirt_message(err)}") from err
    finally:
        if own:
            conn.close()
    return name
