"""The lab guest as a libvirt domain, booted from its root disk (and, for the whole-machine tests, by OVMF
with an emulated TPM): its definition, its start, and raw TPM 2.0 commands sent from inside it."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from vmsnap.lab.image import LabImage
from vmsnap.lab.rootfs import ROOT_APPEND, make_root_disk
from vmsnap.runner import CommandResult
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.agent_runner import AgentRunner
from vmsnap.vm.libvirt.domain import LibvirtAgentChannel

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def lab_domain_xml(
    name: str,
    image: LabImage,
    root: Path,
    console: Path,
    *,
    uefi_vars: Path | None = None,
    tpm: bool = False,
) -> str:
    """The lab guest with its root on ``root`` (vda, serial ``root``), a VGA display, a serial console
    logging to ``console`` and a guest agent channel; with ``uefi_vars``, booted by OVMF (the kernel as
    an EFI application, variables in that file made from OVMF's template); with ``tpm``, an emulated TPM
    2.0."""
    if not root.exists():
        make_root_disk(image, root, size="128M")
    kernel = image.bzimage if uefi_vars is not None else image.kernel
    assert kernel is not None
    firmware = ""
    if uefi_vars is not None:
        firmware = (
            f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
            f"<nvram template='{OVMF_VARS}'>{escape(str(uefi_vars))}</nvram>"
        )
    # the last console= is /dev/console: the serial port; PVH sets up no text console (the early one is kept)
    cmdline = f"{image.append} {ROOT_APPEND} earlyprintk=vga,keep"
    if uefi_vars is not None:
        cmdline = f"console=tty0 {image.append} {ROOT_APPEND}"
    tpm_device = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>" if tpm else ""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type>{firmware}"
        f"<kernel>{escape(str(kernel))}</kernel><initrd>{escape(str(image.initrd))}</initrd>"
        f"<cmdline>{escape(cmdline)}</cmdline></os>"
        "<cpu mode='custom' match='exact' check='none'><model fallback='allow'>qemu64</model></cpu>"
        "<features><acpi/></features><on_reboot>destroy</on_reboot>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file={quoteattr(str(root))}/><target dev='vda' bus='virtio'/><serial>root</serial></disk>"
        f"<serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>"
        "<channel type='unix'><source mode='bind'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        f"{tpm_device}<video><model type='vga'/></video>"
        "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
        "<memballoon model='none'/></devices></domain>"
    )


def wait_for_agent(dom: Any, timeout: float) -> GuestAgent:
    """The domain's guest agent once it answers."""
    agent = GuestAgent(LibvirtAgentChannel(dom))
    deadline = time.monotonic() + timeout
    while not agent.is_responding(timeout=3):
        assert time.monotonic() < deadline, "the guest agent did not answer"
        time.sleep(1)
    return agent


def sh(agent: GuestAgent, script: str) -> CommandResult:
    return AgentRunner(agent, "domain").run(["sh", "-c", script], timeout=120)


# -- a TPM 2.0 NV index, by raw commands (the guest has no tpm2-tools) ----------------------------------

NV_INDEX = 0x01500016
_OWNER = 0x40000001
_PASSWORD_SESSION = struct.pack(">IIHBH", 9, 0x40000009, 0, 0, 0)  # size, TPM_RS_PW, nonce, attrs, hmac
# ownerwrite | authwrite | ownerread | authread | no_da
_ATTRIBUTES = 0x00000002 | 0x00000004 | 0x00020000 | 0x00040000 | 0x02000000


def _command(code: int, handles: bytes, parameters: bytes) -> bytes:
    body = handles + _PASSWORD_SESSION + parameters
    return struct.pack(">HII", 0x8002, 10 + len(body), code) + body


def nv_define(size: int) -> bytes:
    public = struct.pack(">IHIHH", NV_INDEX, 0x000B, _ATTRIBUTES, 0, size)
    return _command(
        0x12A, struct.pack(">I", _OWNER), struct.pack(">H", 0) + struct.pack(">H", len(public)) + public
    )


def nv_write(data: bytes) -> bytes:
    return _command(
        0x137,
        struct.pack(">II", NV_INDEX, NV_INDEX),
        struct.pack(">H", len(data)) + data + struct.pack(">H", 0),
    )


def nv_read(size: int) -> bytes:
    return _command(0x14E, struct.pack(">II", NV_INDEX, NV_INDEX), struct.pack(">HH", size, 0))


def tpm(agent: GuestAgent, command: bytes) -> bytes:
    """Send one command to the guest's TPM (/dev/tpmrm0) and return the response; asserts success."""
    agent.write_file("/tmp/tpm.cmd", command)
    send = "dd if=/tmp/tpm.cmd bs=4096 count=1 >&3 2>/dev/null"
    receive = "dd bs=4096 count=1 <&3 > /tmp/tpm.rsp 2>/dev/null"
    sh(agent, f"exec 3<>/dev/tpmrm0; {send}; {receive}")
    response = agent.read_file("/tmp/tpm.rsp")
    code = struct.unpack(">I", response[6:10])[0]
    assert code == 0, f"TPM response code {code:#x}"
    return response


def nv_value(agent: GuestAgent, size: int) -> bytes:
    """The NV index's content."""
    response = tpm(agent, nv_read(size))
    (length,) = struct.unpack(">H", response[14:16])
    return response[16 : 16 + length]
