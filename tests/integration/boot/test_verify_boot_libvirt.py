"""A libvirt domain's backup booted (``verify --boot`` as a transient domain from its saved definition), and
the whole machine: a domain booted by OVMF with an emulated TPM (swtpm) writes an EFI variable and a TPM NV
index from inside, is backed up, changes both, and is restored with ``--define``: the restored domain boots
and sees both as of the backup. Real libvirtd (private), QEMU, OVMF, swtpm, the lab guest under TCG."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.boot.conftest import leftovers
from tests.integration.boot.libvirt_guest import (
    OVMF_CODE,
    lab_domain_xml,
    nv_define,
    nv_value,
    nv_write,
    sh,
    tpm,
    wait_for_agent,
)
from tests.integration.cli_helpers import cli_process
from tests.integration.libvirt.conftest import Libvirtd, libvirtd
from vmsnap.lab.image import LabImage

__all__ = ["libvirtd"]  # the session's private libvirtd (a fixture)

pytestmark = [pytest.mark.guest, pytest.mark.libvirt]

VARIABLE = "/sys/firmware/efi/efivars/VmsnapProof-2f0c8e4e-8a2b-4a55-9b0e-3c5f2a1d7e11"
RC_LOCAL = (
    "#!/bin/sh\nmkdir -p /srv/www\necho vmsnap-boot-ok > /srv/www/index.html\nhttpd -p 8080 -h /srv/www\n"
)


@pytest.fixture
def domains(libvirtd: Libvirtd) -> Iterator[list[str]]:
    """Names of the domains a test makes; each is destroyed and undefined (with its NVRAM and TPM state)
    afterwards."""
    import libvirt

    names: list[str] = []
    yield names
    conn = libvirt.open(libvirtd.uri)
    try:
        for dom in conn.listAllDomains(0):
            if dom.name() in names:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


def _start(libvirtd: Libvirtd, xml: str) -> tuple[Any, Any]:
    import libvirt

    conn = libvirt.open(libvirtd.uri)
    dom = conn.defineXML(xml)
    dom.create()
    return conn, dom


def _boot_copies(libvirtd: Libvirtd) -> list[str]:
    import libvirt

    conn = libvirt.open(libvirtd.uri)
    try:
        return [d.name() for d in conn.listAllDomains(0) if d.name().startswith("vmsnap-boot-")]
    finally:
        conn.close()


def test_a_libvirt_domains_backup_boots_from_its_definition(
    libvirtd: Libvirtd, lab_image: LabImage, domains: list[str], run_root: Path, tmp_path: Path
) -> None:
    name = libvirtd.new_domain_name()
    domains.append(name)
    xml = lab_domain_xml(name, lab_image, tmp_path / "root.qcow2", tmp_path / "console.log")
    conn, dom = _start(libvirtd, xml)
    try:
        agent = wait_for_agent(dom, 300)
        proof = secrets.token_hex(16)
        agent.write_file("/root/proof", proof.encode())
        agent.write_file("/etc/rc.local", RC_LOCAL.encode())
        sh(agent, "chmod 755 /etc/rc.local; sync")
        backup = cli_process(
            "backup", "--repo", tmp_path / "repo", "--domain", name, "--connect", libvirtd.uri
        )
        assert backup.code == 0, backup.err
        result = cli_process(
            "verify", "--boot", "--repo", tmp_path / "repo", "--vm", name, "--connect", libvirtd.uri,
            "--check", "cat /root/proof", "--port", "8080", "--timeout", "300", "--json", timeout=900,
        )  # fmt: skip
        assert result.code == 0, result.err
        boot = result.json()["boot"]
        assert boot["kind"] == "libvirt" and boot["verdict"] == "passed"
        assert boot["checks"][0]["output"] == proof and boot["ports"][0]["open"]
        assert boot["screenshot"] is not None and boot["console_tail"]
        assert _boot_copies(libvirtd) == [] and leftovers(run_root) == []
        assert dom.isActive()  # the live domain runs on
    finally:
        conn.close()


def _efi_value(agent: Any) -> str:
    return sh(agent, f"od -An -tx1 {VARIABLE} | tr -d ' \\n'").stdout


@pytest.mark.timeout(1800)  # two boots through OVMF under TCG: several minutes each on a loaded 2-core host
def test_uefi_variables_and_tpm_state_come_back_with_restore_define(
    libvirtd: Libvirtd, lab_image: LabImage, domains: list[str], run_root: Path, tmp_path: Path
) -> None:
    for path in (OVMF_CODE, Path("/usr/bin/swtpm")):
        assert path.exists(), f"{path} is missing: install ovmf and swtpm (scripts/packages.d/boot.txt)"
    name = libvirtd.new_domain_name()
    domains.append(name)
    xml = lab_domain_xml(
        name,
        lab_image,
        tmp_path / "root.qcow2",
        tmp_path / "console.log",
        uefi_vars=tmp_path / "vars.fd",
        tpm=True,
    )
    conn, dom = _start(libvirtd, xml)
    try:
        agent = wait_for_agent(dom, 600)
        before, after = secrets.token_bytes(8), secrets.token_bytes(8)
        nv_before, nv_after = secrets.token_bytes(32), secrets.token_bytes(32)
        # an EFI variable (non-volatile, boot and runtime access) and a TPM NV index, written from inside
        sh(agent, f"printf '\\007\\000\\000\\000{_octal(before)}' > {VARIABLE}")
        tpm(agent, nv_define(32))
        tpm(agent, nv_write(nv_before))
        expected_efi = _efi_value(agent)
        assert expected_efi == "07000000" + before.hex()
        backup = cli_process(
            "backup", "--repo", tmp_path / "repo", "--domain", name, "--connect", libvirtd.uri
        )
        assert backup.code == 0, backup.err
        sh(agent, f"chattr -i {VARIABLE}; printf '\\007\\000\\000\\000{_octal(after)}' > {VARIABLE}")
        tpm(agent, nv_write(nv_after))
        assert _efi_value(agent) == "07000000" + after.hex() and nv_value(agent, 32) == nv_after
        dom.destroy()  # the original is lost; its variables file and TPM hold the changed values
    finally:
        conn.close()

    restored = f"{name}-r"
    domains.append(restored)
    result = cli_process(
        "restore", "--repo", tmp_path / "repo", "--vm", name, "--to", tmp_path / "restored",
        "--define", restored, "--connect", libvirtd.uri, "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert (tmp_path / "restored" / f"{restored}_VARS.fd").is_file()
    import libvirt

    conn = libvirt.open(libvirtd.uri)
    try:
        copy = conn.lookupByName(restored)
        copy.create()
        restored_agent = wait_for_agent(copy, 600)
        assert _efi_value(restored_agent) == expected_efi
        assert nv_value(restored_agent, 32) == nv_before
    finally:
        conn.close()


def _octal(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


def test_swtpm_is_installed() -> None:
    """The whole-machine test needs swtpm and swtpm_setup (libvirt runs both)."""
    missing = [tool for tool in ("swtpm", "swtpm_setup") if shutil.which(tool) is None]
    assert not missing, f"install swtpm swtpm-tools (scripts/packages.d/boot.txt): {missing} missing"
    assert os.path.exists(OVMF_CODE), "install ovmf (scripts/packages.d/boot.txt)"
