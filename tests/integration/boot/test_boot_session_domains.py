"""A boot session removes its own libvirt domain and no other: a copy whose name another domain has already
fails to start, and the session's cleanup leaves that other domain alone (it is found by the UUID the
session chose, not by name). Real private libvirtd; no guest boots."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.integration.libvirt.conftest import Libvirtd, libvirtd
from vmsnap.restore.boot_session import BootSession, BootStartError
from vmsnap.verify_boot.libvirt_boot import start_domain_copy
from vmsnap.vm.libvirt.definition import remove_domain

__all__ = ["libvirtd"]  # the session's private libvirtd (a fixture)

pytestmark = [pytest.mark.libvirt]


def _xml(name: str, disk: Path, domain_uuid: str | None = None) -> str:
    uuid_node = f"<uuid>{domain_uuid}</uuid>" if domain_uuid else ""
    return (
        f"<domain type='qemu'><name>{name}</name>{uuid_node}<memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )


def test_cleanup_leaves_another_domain_of_the_copy_s_name_alone(libvirtd: Libvirtd, tmp_path: Path) -> None:
    import libvirt

    name = libvirtd.new_domain_name()
    conn = libvirt.open(libvirtd.uri)
    try:
        other = conn.defineXML(_xml(name, tmp_path / "other.qcow2"))
        session = BootSession(tmp_path / "session")
        with pytest.raises(BootStartError, match="could not start the copy"):
            start_domain_copy(
                session,
                _xml("saved", tmp_path / "saved.qcow2"),
                None,
                {"vda": tmp_path / "overlay.qcow2"},
                name=name,
                uuid=str(uuid.uuid4()),
                uri=libvirtd.uri,
                ports={},
            )
        session.cleanup()
        assert conn.lookupByName(name).UUIDString() == other.UUIDString()  # still defined
        assert not remove_domain(name, libvirtd.uri, uuid=None)  # no UUID recorded: nothing is touched
        assert not remove_domain("another-name", libvirtd.uri, uuid=other.UUIDString())  # name differs
        assert remove_domain(name, libvirtd.uri, uuid=other.UUIDString())
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
    finally:
        conn.close()
