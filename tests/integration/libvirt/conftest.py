"""A real libvirtd for the libvirt tests, started by hand (no systemd) on a private socket, and test domains.

The session fixture starts ``virtlogd`` and ``libvirtd`` with pid files in a temp dir and stops exactly those
pids at the end; each test gets its own domain (q35, no guest OS, two qcow2 data disks: vda on virtio-blk,
sdb on virtio-scsi), destroyed and undefined afterwards, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import make_image
from vmsnap.lab.qemu import kvm_usable

libvirt = pytest.importorskip("libvirt", reason="python3-libvirt is not installed: make test installs it")

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# QEMU runs as root on test images in pytest's 0700 temp dirs; there is no SELinux/AppArmor to label for
QEMU_SETTINGS = {
    "user": '"root"',
    "group": '"root"',
    "dynamic_ownership": "0",
    "remember_owner": "0",
    "security_driver": '"none"',
}
DOMAIN_PREFIX = "vmsnap-t-"
SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
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


def _ensure_qemu_conf() -> None:
    text = QEMU_CONF.read_text()
    missing = []
    for key, value in QEMU_SETTINGS.items():
        match = re.search(rf"^\s*{key}\s*=\s*(\S+)", text, re.MULTILINE)
        if match is None:
            missing.append(f"{key} = {value}")
        elif match.group(1) != value:
            pytest.fail(f"{QEMU_CONF} sets {key} = {match.group(1)}; the libvirt tests need {key} = {value}")
    if missing:
        with QEMU_CONF.open("a") as conf:
            conf.write(
                "\n# vmsnap tests (tests/integration/libvirt/conftest.py)\n" + "\n".join(missing) + "\n"
            )


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, left by a daemon whose parent cannot reap it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_pid(path: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear")
        time.sleep(0.05)


def _stop(pid: int) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _open_when_ready(uri: str, log: Path, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                pytest.fail(f"libvirtd did not answer on {uri}: {tail}")
            time.sleep(0.05)


def _socket_of(pid: int) -> Path | None:
    """A running libvirtd's read-write socket: from its ``-f`` config's unix_sock_dir, else the default."""
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        for flag in ("-f", "--config"):
            if flag in argv[:-1]:
                text = Path(argv[argv.index(flag) + 1]).read_text()
                found = re.search(r'^\s*unix_sock_dir\s*=\s*"([^"]+)"', text, re.MULTILINE)
                if found:
                    socket = Path(found.group(1)) / "libvirt-sock"
                    return socket if socket.exists() else None
    return SYSTEM_SOCKET if SYSTEM_SOCKET.exists() else None


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
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd]:
    """A running libvirtd: ours on a private socket (stopped by pid at the end), or the host's if it runs."""
    binary = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    if not os.path.exists(binary):
        pytest.skip("libvirt-daemon-system is not installed: make test installs it (scripts/packages.d)")
    if os.geteuid() != 0:
        pytest.skip("the libvirt tests run libvirtd as root (system mode)")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    running = None
    with contextlib.suppress(OSError, ValueError):
        running = int(Path("/run/libvirt/qemu/driver.pid").read_text().strip())
    if running is not None and _alive(running):
        # another libvirtd owns /run/libvirt/qemu and only one may: use it, start and stop nothing
        socket = _socket_of(running)
        if socket is None:
            pytest.fail(f"a libvirtd (pid {running}) runs and its socket cannot be found; stop it first")
        uri = "qemu:///system" if socket == SYSTEM_SOCKET else f"qemu:///system?socket={socket}"
        shared = Libvirtd(uri, tmp_path_factory.mktemp("libvirtd"), Path("/var/log/libvirt"))
        yield shared
        shared.reaper.join()
        _destroy_test_domains(uri, shared.names)
        return
    _ensure_qemu_conf()
    # a short path: unix socket paths are limited to 108 bytes
    workdir = Path(tempfile.mkdtemp(prefix="vmsnap-lv.", dir="/tmp"))
    log = workdir / "libvirtd.log"
    (workdir / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{workdir}"\nunix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
        'auth_unix_ro = "none"\nauth_unix_rw = "none"\n'
        f'log_outputs = "3:file:{log}"\n'
    )
    Path("/run/libvirt").mkdir(mode=0o755, exist_ok=True)
    pids: list[int] = []
    try:
        if not Path("/run/libvirt/virtlogd-sock").exists():
            subprocess.run(["virtlogd", "-d", "-p", str(workdir / "virtlogd.pid")], check=True)
            pids.append(_read_pid(workdir / "virtlogd.pid"))
        subprocess.run(
            [binary, "-d", "-f", str(workdir / "libvirtd.conf"), "-p", str(workdir / "libvirtd.pid")],
            check=True,
        )
        pids.append(_read_pid(workdir / "libvirtd.pid"))
        uri = f"qemu:///system?socket={workdir}/libvirt-sock"
        _open_when_ready(uri, log).close()
        ours = Libvirtd(uri, workdir, log)
        yield ours
        ours.reaper.join()
        _destroy_test_domains(uri, ours.names)
    finally:
        for pid in reversed(pids):
            _stop(pid)
        shutil.rmtree(workdir, ignore_errors=True)


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
        from vmsnap.libvirt_machine import LibvirtMachine

        with LibvirtMachine(self.name, uri=self.uri) as machine:
            disk = next(d for d in machine.disks() if d.name == target)
            machine.qmp().hmp(f'qemu-io -d {disk.qdev} "{command}"')

    def write(self, target: str, pattern: int, offset_mib: int, length_mib: int = 1) -> None:
        """Write ``pattern`` bytes into disk ``target`` and flush QEMU's caches to the image."""
        self.qemu_io(target, f"write -P {pattern:#x} {offset_mib}M {length_mib}M")
        self.qemu_io(target, "flush")

    def domblklist(self) -> dict[str, str]:
        """target → source, as ``virsh domblklist`` shows."""
        from vmsnap.libvirt_machine import LibvirtMachine

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
