"""A job's ``domain`` globs expanded against a real (private) libvirtd, here and through ``qemu+ssh://`` over
the real sshd on 127.0.0.1 (libvirt's own ssh transport, netcat proxy to the private socket)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.libvirt.conftest import DOMAIN_PREFIX, Libvirtd, domain_xml, libvirt
from vmsnap.errors import UsageError
from vmsnap.jobs.default import list_libvirt_domains
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import parse_job
from vmsnap.runner import SshRunner


@pytest.fixture
def two_domains(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """Two defined (not started) domains ``<prefix>-a`` and ``<prefix>-b``; yields (prefix, a, b)."""
    prefix = f"{DOMAIN_PREFIX}job-{secrets.token_hex(3)}"
    names = (f"{prefix}-a", f"{prefix}-b")
    conn = libvirt.open(libvirtd.uri)
    defined = []
    try:
        for name in names:
            libvirtd.names.add(name)
            image = make_image(tmp_path / f"{name}.qcow2", "1M")
            defined.append(conn.defineXML(domain_xml(name, {"vda": image})))
        yield prefix, names[0], names[1]
    finally:
        for dom in defined:
            dom.undefine()
        conn.close()


def job_text(pattern: str, connect: str) -> str:
    return (
        f'repository = "/backups"\n[[vm]]\ndomain = "{pattern}"\nexclude = ["*-b"]\nconnect = "{connect}"\n'
    )


def test_domain_globs_against_a_real_libvirtd(libvirtd: Libvirtd, two_domains: tuple[str, str, str]) -> None:
    prefix, first, _ = two_domains
    specs, failures = expand_vms(parse_job(job_text(f"{prefix}-*", libvirtd.uri)), list_libvirt_domains)
    assert failures == ()
    assert [(s.name, s.kind, s.domain, s.connect) for s in specs] == [(first, "libvirt", first, libvirtd.uri)]
    with pytest.raises(UsageError, match=r"line 3: .* matches only domains that exclude takes out"):
        expand_vms(parse_job(job_text(f"{prefix}-b", libvirtd.uri)), list_libvirt_domains)


def test_domain_globs_through_qemu_ssh(
    libvirtd: Libvirtd, two_domains: tuple[str, str, str], sshd: SshRunner, tmp_path: Path
) -> None:
    if shutil.which("nc") is None:
        pytest.fail(
            "netcat is not installed (apt-get install netcat-openbsd): libvirt's ssh proxy needs it here"
        )
    # libvirt runs OpenSSH itself and has no known_hosts option for it: a wrapper adds the test's known_hosts
    wrapper = tmp_path / "ssh"
    wrapper.write_text(
        f'#!/bin/sh\nexec ssh -o UserKnownHostsFile={sshd.known_hosts} -o StrictHostKeyChecking=yes "$@"\n'
    )
    os.chmod(wrapper, 0o700)
    socket = libvirtd.uri.split("socket=", 1)[1]
    # the private libvirtd listens on its own socket, so the remote side connects with nc -U to it
    uri = (
        f"qemu+ssh://{sshd.destination}:{sshd.port}/system?socket={socket}&keyfile={sshd.identity}"
        f"&command={wrapper}&proxy=netcat&no_tty=1"
    )
    prefix, first, _ = two_domains
    specs, failures = expand_vms(parse_job(job_text(f"{prefix}-*", uri)), list_libvirt_domains)
    assert failures == ()
    assert [(s.name, s.connect) for s in specs] == [(first, uri)]
    unreachable = uri.replace(f":{sshd.port}/", ":1/")
    specs, failures = expand_vms(parse_job(job_text(f"{prefix}-*", unreachable)), list_libvirt_domains)
    assert specs == () and len(failures) == 1 and failures[0].line == 3
    assert "listing the libvirt domains" in failures[0].error
