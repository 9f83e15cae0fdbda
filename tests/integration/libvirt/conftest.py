"""A real libvirtd for the libvirt tests, started by hand (no systemd) on a private socket, and test domains.

The session fixture starts ``virtlogd`` and ``libvirtd`` in a private mount namespace (see
:mod:`vmsnap.lab.libvirtd`) and stops exactly those pids at the end; each test gets its own domain (q35,
no guest OS, two qcow2 data disks: vda on virtio-blk, sdb on virtio-scsi), destroyed and undefined
afterwards, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import make_image
from vmsnap.lab.libvirtd import Libvirtd as LabLibvirtd
from vmsnap.lab.qemu import kvm_usable

try:
    import libvirt
except ImportError:  # a skip would hide that the libvirt integration is untested
    pytest.fail(
        "python3-libvirt is missing: make test installs it (scripts/packages.d/libvirt.txt); "
        "or deselect these tests with -m 'not libvirt'",
        pytrace=False,
    )

DOMAIN_PREFIX = "vmsnap-t-"
MiB = 1024 * 1024


@attrs.frozen
class Libvirtd:
    """A libvirtd the tests can use: its URI, where its files are, and who removes finished domains."""

    uri: str
    workdir: Path
    log: Path
    reaper: DomainReaper = attrs.Factory(lambda: DomainReaper())
    names: set[str] = attrs.Factory(set)

    def new_domain_name(self) -> str:
        """A fresh test domain name, remembered so the session removes the domain whatever happens."""
        name = f"{DOMAIN_PREFIX}{secrets.token_hex(4)}"
        self.names.add(name)
        return name


class DomainReaper:
    """Destroys and undefines finished test domains on background threads.

    libvirt takes over a second to destroy a domain (it polls QEMU's exit); the next test need not wait
    for that. The session fixture joins every thread before it stops libvirtd.
    """

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def remove(self, conn: Any, dom: Any) -> None:
        """Destroy and undefine ``dom``, then close ``conn`` (which nothing else may use afterwards)."""

        def work() -> None:
            try:
                remove_domain(dom)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        thread = threading.Thread(target=work, name=f"remove-{dom.name()}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        """Wait for every removal started so far."""
        for thread in self.threads:
            thread.join(60)
        self.threads.clear()


def _destroy_test_domains(uri: str, names: set[str]) -> None:
    """Remove the domains this session defined that are still there (a failed set-up leaves them)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(uri)
        try:
            for dom in conn.listAllDomains(0):
                if dom.name() in names:
                    remove_domain(dom)
        finally:
            conn.close()


def remove_domain(dom: Any) -> None:
    """Destroy (if running) and undefine a domain with its snapshot and checkpoint metadata."""
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    )
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(flags)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """Our own libvirtd (and virtlogd) in a private mount namespace, stopped by pid at the end.

    :class:`vmsnap.lab.libvirtd.Libvirtd` binds a private directory on ``/run/libvirt`` for them, so this
    session neither meets nor disturbs another libvirtd on the host; its socket is in a temp dir.
    """
    binary = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    if not os.path.exists(binary) or shutil.which("virtlogd") is None:
        pytest.fail(
            "libvirt-daemon-system is not installed: make test installs it (scripts/packages.d/libvirt.txt); "
            "or deselect these tests with -m 'not libvirt'"
        )
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    daemon = LabLibvirtd(private=True)
    try:
        daemon.start()
        assert daemon.workdir is not None and daemon.log is not None
        ours = Libvirtd(daemon.uri, daemon.workdir, daemon.log)
        try:
            yield ours
        finally:
            ours.reaper.join()
            _destroy_test_domains(daemon.uri, ours.names)  # QEMU outlives libvirtd: domains go first
    finally:
        daemon.stop()


def domain_xml(name: str, images: dict[str, Path], *, agent_socket: Path | None = None) -> str:
    """A q35 domain with no OS and qcow2 data disks (``vd*`` on virtio-blk, ``sd*`` on virtio-scsi)."""
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{dev}' bus='{'virtio' if dev.startswith('vd') else 'scsi'}'/>"
        "</disk>"
        for dev, path in images.items()
    )
    channel = (
        f"<channel type='unix'><source mode='bind' path='{agent_socket}'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        if agent_socket is not None
        else ""
    )
    return (
        f"<domain type='{'kvm' if kvm_usable() else 'qemu'}'><name>{name}</name>"
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        "<cpu mode='custom' match='exact' check='none'><model fallback='allow'>qemu64</model></cpu>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"{disks}<controller type='scsi' model='virtio-scsi'/>{channel}"
        "<video><model type='none'/></video><memballoon model='none'/></devices></domain>"
    )


@attrs.define
class LibvirtTestDomain:
    """A defined, running test domain and a connection to its libvirtd."""

    name: str
    uri: str
    images: dict[str, Path]
    workdir: Path
    conn: Any
    dom: Any

    def qemu_io(self, target: str, command: str) -> None:
        """Run a qemu-io command on the running disk ``target`` (HMP; its output goes to the domain log)."""
        from vmsnap.vm.libvirt.machine import LibvirtMachine

        with LibvirtMachine(self.name, uri=self.uri) as machine:
            disk = next(d for d in machine.disks() if d.name == target)
            machine.qmp().hmp(f'qemu-io -d {disk.qdev} "{command}"')

    def write(self, target: str, pattern: int, offset_mib: int, length_mib: int = 1) -> None:
        """Write ``pattern`` bytes into disk ``target`` and flush QEMU's caches to the image."""
        self.qemu_io(target, f"write -P {pattern:#x} {offset_mib}M {length_mib}M")
        self.qemu_io(target, "flush")

    def domblklist(self) -> dict[str, str]:
        """target → source, as ``virsh domblklist`` shows."""
        from vmsnap.vm.libvirt.machine import LibvirtMachine

        with LibvirtMachine(self.name, uri=self.uri) as machine:
            return machine.block_targets()


@pytest.fixture
def domain(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[LibvirtTestDomain]:
    """A running domain with two empty 64 MiB qcow2 disks, vda (virtio-blk) and sdb (virtio-scsi)."""
    name = libvirtd.new_domain_name()
    images = {"vda": make_image(tmp_path / "vda.qcow2"), "sdb": make_image(tmp_path / "sdb.qcow2")}
    conn = libvirt.open(libvirtd.uri)
    dom = None
    try:
        dom = conn.defineXML(domain_xml(name, images))
        dom.create()
        yield LibvirtTestDomain(name, libvirtd.uri, images, tmp_path, conn, dom)
    finally:
        if dom is not None:
            libvirtd.reaper.remove(conn, dom)
        else:
            conn.close()


def reference_image(path: Path, writes: list[tuple[int, int, int]], size: str = "64M") -> Path:
    """An offline qcow2 holding exactly ``writes`` (pattern, offset MiB, length MiB): the expected disk."""
    make_image(path, size)
    for pattern, offset, length in writes:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset}M {length}M", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def images_identical(a: Path | str, b: Path | str) -> bool:
    """``qemu-img compare -U`` (guest-visible content; -U reads images a running QEMU holds)."""
    result = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise AssertionError(f"qemu-img compare failed: {result.stderr}")
    return result.returncode == 0


def assert_identical(a: Path | str, b: Path | str) -> None:
    """Assert two images hold the same guest-visible bytes; the failure names the first difference."""
    result = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, f"{a} and {b} differ: {result.stdout.strip()} {result.stderr.strip()}"
