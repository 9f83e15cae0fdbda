"""A libvirt domain's firmware state put back: its UEFI variables file (``<os><nvram>``) and its emulated
TPM's state directory, as :mod:`vmsnap.vm.machine_state` captured them with a backup.

libvirt keeps a domain's swtpm state in ``swtpm_storage_dir/<uuid>/tpm2`` (``/var/lib/libvirt/swtpm`` by
default) and creates it (running ``swtpm_setup``: a new, empty TPM) only when that directory does not exist;
so the state is put there, owned by ``swtpm_user``/``swtpm_group`` of ``qemu.conf``, before the domain first
starts. The variables file is written where the new definition's ``<nvram>`` points (libvirt copies the
template only when the file does not exist).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from vmsnap.files import write_atomic
from vmsnap.vm.machine_state import SWTPM_DIR, untar_directory

QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def swtpm_owner(conf: Path = QEMU_CONF) -> tuple[int, int]:
    """(uid, gid) swtpm runs as: ``swtpm_user``/``swtpm_group`` of ``qemu.conf`` (default ``tss``); root's
    when that user does not exist."""
    text = ""
    with contextlib.suppress(OSError):
        text = conf.read_text()
    user = re.search(r'^\s*swtpm_user\s*=\s*"([^"]+)"', text, re.MULTILINE)
    group = re.search(r'^\s*swtpm_group\s*=\s*"([^"]+)"', text, re.MULTILINE)
    uid = gid = 0
    with contextlib.suppress(KeyError):
        uid = pwd.getpwnam(user.group(1) if user else "tss").pw_uid
    with contextlib.suppress(KeyError):
        gid = grp.getgrnam(group.group(1) if group else "tss").gr_gid
    return uid, gid


def tpm_state_dir(uuid: str, version: str = "2.0", *, root: Path = SWTPM_DIR) -> Path:
    """Where libvirt keeps the swtpm state of the domain ``uuid``."""
    return root / uuid / ("tpm2" if version == "2.0" else "tpm1.2")


def tpm_version(domain: ET.Element) -> str | None:
    """The version of a domain definition's emulated TPM, or None without one."""
    backend = domain.find("devices/tpm/backend[@type='emulator']")
    return backend.get("version", "2.0") if backend is not None else None


def place_tpm_state(directory: Path, data: bytes) -> list[Path]:
    """Write a captured TPM state (a tar, :func:`~vmsnap.vm.machine_state.tar_directory`) into
    ``directory`` for swtpm, owned as ``qemu.conf`` says (its parent, the domain's directory, too).

    :raise MachineStateError: the tar is damaged
    """
    files = untar_directory(data, directory)
    uid, gid = swtpm_owner()
    for path in (directory.parent, directory, *files):
        os.chown(path, uid, gid)
    return files


def clear_nvram(nvram: ET.Element) -> None:
    """Drop where an ``<nvram>`` element points (its text, its ``type`` and ``<source>``), keeping its
    ``template``."""
    nvram.text = None
    nvram.attrib.pop("type", None)
    for child in list(nvram):
        nvram.remove(child)


def set_nvram(domain: ET.Element, path: Path, data: bytes) -> None:
    """Write the captured variables to ``path`` (0600) and point the definition's ``<nvram>`` at it (as its
    text: whatever ``<source>`` it had is dropped)."""
    write_atomic(path, data)
    os_node = domain.find("os")
    if os_node is None:
        os_node = ET.SubElement(domain, "os")
    nvram = os_node.find("nvram")
    if nvram is None:
        nvram = ET.SubElement(os_node, "nvram")
    clear_nvram(nvram)
    nvram.text = str(path)
