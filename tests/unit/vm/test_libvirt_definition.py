"""A saved libvirt definition redefined or booted as a copy: nothing of the original's host resources is kept
(its NVRAM in either form, its TPM state directory, its emulator), and what cannot be replaced is refused."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmsnap.errors import UnsupportedError
from vmsnap.verify_boot.libvirt_boot import boot_domain_xml
from vmsnap.vm.libvirt.definition import restored_domain_xml
from vmsnap.vm.machine_state import NVRAM, libvirt_state_source

QEMU = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"


def _domain(devices: str = "", os_extra: str = "", tail: str = "") -> str:
    return f"""<domain type='qemu' {QEMU}><name>web1</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
<memory unit='MiB'>256</memory>
<os><type arch='x86_64' machine='q35'>hvm</type>{os_extra}</os>
<devices><emulator>/tmp/evil/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/web1.qcow2'/>
<target dev='vda' bus='virtio'/></disk>{devices}
</devices>{tail}</domain>"""


def _boot(xml: str, tmp: Path) -> ET.Element:
    return boot_domain_xml(
        xml,
        name="vmsnap-boot-web1",
        uuid="99999999-0000-4000-8000-000000000000",
        images={"vda": tmp / "vda.qcow2"},
        console=tmp / "console.log",
        graphics=tmp / "vnc.sock",
        ports={},
    )


REFUSED = [
    ("<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sda' bus='scsi'/></disk>", "lun"),
    ("<disk type='file' device='floppy'><source file='/srv/fd.img'/><target dev='fda'/></disk>", "floppy"),
    (
        "<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv/share'/><target dir='s'/>"
        "</filesystem>",
        "<filesystem>",
    ),
    (
        "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/>"
        "</source></hostdev>",
        "<hostdev>",
    ),
    (
        "<parallel type='file'><source path='/srv/lpt.log'/><target port='0'/></parallel>",
        "parallel type='file'",
    ),
    (
        "<channel type='file'><source path='/srv/ch.log'/><target type='virtio' name='x'/></channel>",
        "channel type='file'",
    ),
    ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", "TPM"),
    ("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>", "<input>"),
    ("<shmem name='ivshmem'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>", "<shmem>"),
]


@pytest.mark.parametrize(("device", "what"), REFUSED)
def test_a_copy_refuses_what_it_would_share_with_the_original(tmp_path: Path, device: str, what: str) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(what)):
        _boot(_domain(device), tmp_path)
    with pytest.raises(UnsupportedError, match=re.escape(what)):
        restored_domain_xml(_domain(device), name="web2", images={"vda": tmp_path / "vda.qcow2"})


@pytest.mark.parametrize(
    "tail",
    [
        "<qemu:commandline><qemu:arg value='-debugcon'/><qemu:arg value='file:/srv/x'/></qemu:commandline>",
        "<qemu:override><qemu:device alias='ua-x'><qemu:frontend/></qemu:device></qemu:override>",
    ],
)
def test_the_original_s_own_qemu_arguments_are_refused(tmp_path: Path, tail: str) -> None:
    with pytest.raises(UnsupportedError, match="<qemu:"):
        _boot(_domain(tail=tail), tmp_path)
    with pytest.raises(UnsupportedError, match="<qemu:"):
        restored_domain_xml(_domain(tail=tail), name="web2", images={"vda": tmp_path / "vda.qcow2"})


def test_a_restored_domain_s_console_on_the_original_s_file_becomes_a_pty(tmp_path: Path) -> None:
    serial = (
        "<serial type='file'><source path='/srv/console.log'/><target port='0'/><log file='/srv/l'/></serial>"
    )
    restored = restored_domain_xml(_domain(serial), name="web2", images={"vda": tmp_path / "vda.qcow2"})
    assert "/srv/" not in restored
    assert ET.fromstring(restored).find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]


def test_a_read_only_floppy_and_a_cdrom_stay(tmp_path: Path) -> None:
    devices = (
        "<disk type='file' device='floppy'><source file='/srv/fd.img'/><target dev='fda'/><readonly/></disk>"
        "<disk type='file' device='cdrom'><source file='/srv/i.iso'/><target dev='sda' bus='sata'/></disk>"
    )
    root = _boot(_domain(devices), tmp_path)
    assert [d.get("device") for d in root.findall("devices/disk")] == ["disk", "floppy", "cdrom"]


def test_the_copy_has_this_host_s_emulator_and_its_own_tpm_state_and_nvram(tmp_path: Path) -> None:
    tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='dir' path='/srv/tpm'/>"
    tpm += "</backend></tpm>"
    nvram = (
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd' type='file'><source file='/srv/VARS.fd'/></nvram>"
    )
    xml = _domain(tpm, os_extra=nvram)
    root = _boot(xml, tmp_path)
    text = ET.tostring(root, encoding="unicode")
    assert "/tmp/evil" not in text and root.find("devices/emulator") is None
    assert "/srv/tpm" not in text and root.find("devices/tpm/backend/source") is None
    assert "/srv/VARS.fd" not in text
    restored = restored_domain_xml(
        xml, name="web2", images={"vda": tmp_path / "vda.qcow2"}, nvram=(tmp_path / "web2_VARS.fd", b"vars")
    )
    new = ET.fromstring(restored)
    assert new.findtext("os/nvram") == str(tmp_path / "web2_VARS.fd") and new.find("os/nvram/source") is None
    assert (tmp_path / "web2_VARS.fd").read_bytes() == b"vars"
    assert "/srv/tpm" not in restored and "/tmp/evil" not in restored


def test_nvram_named_by_its_source_is_captured() -> None:
    nvram = "<nvram type='file'><source file='/srv/VARS.fd'/></nvram>"
    source = libvirt_state_source(ET.fromstring(_domain(os_extra=nvram)))
    assert source is not None and source.files[NVRAM] == Path("/srv/VARS.fd")
    assert source.state.nvram == "/srv/VARS.fd"
