"""Another hypervisor for the remote-host tests: a real sshd on 127.0.0.1 in its own mount namespace, whose
``/tmp`` is a tmpfs of its own, and QEMUs started inside that namespace.

Paths under ``/tmp`` (QMP sockets, images, QEMU's NBD sockets, fleecing files, vmsnap's state directory in
the tests) therefore differ between "this host" and the far host, as they would on two machines: a backup
that reads anything of the far host's directly, instead of through the SSH tunnel and the far host's
runner, fails. The test looks into the far host's files through ``/proc/<sshd pid>/root`` (the kernel
resolves such paths in that process's mount namespace).

Import the fixtures into a test module: ``from tests.integration.far_host import far_host, FarHost``;
:func:`far_vm` starts a QEMU with no guest OS there, :func:`far_lab_guest` the lab guest (qemu-ga included).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from tests.sshd import free_port, wait_for_sshd
from vmsnap import processes
from vmsnap.errors import AgentError
from vmsnap.lab.guest import DATA_MOUNT, DATA_SERIAL
from vmsnap.lab.image import LabImage
from vmsnap.lab.qemu import DriveSpec, QemuProcess, listening, qemu_io
from vmsnap.runner import SshRunner
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.qmp import QMPMonitor

ALIAS = "farhost"
"""The far host's name in its ssh_config (``host = "farhost"``, ``--host farhost``)."""

# the namespace's /tmp is a fresh tmpfs; the sshd's own directory is bound back into it
_ENTER = """cd "$1" && mount -t tmpfs -o mode=1777 tmpfs /tmp && mkdir -p "$1" && mount -c --bind . "$1" \
&& exec "$2" -D -e -f "$1/sshd_config"
"""


@attrs.frozen
class FarHost:
    """The far host: its ssh_config (alias :data:`ALIAS`), an SshRunner, and its sshd's pid.

    :param config: an ssh_config with ``Host farhost`` (port, key, known_hosts): ``ssh -F CONFIG farhost``
    """

    config: Path
    runner: SshRunner
    pid: int

    @property
    def root(self) -> Path:
        """The far host's ``/`` as this host reaches it (through its sshd's mount namespace)."""
        return Path(f"/proc/{self.pid}/root")

    def here(self, path: Path | str) -> Path:
        """Where this host finds the far host's ``path``."""
        return self.root / Path(path).relative_to("/")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the far host's mount namespace (a process of this test, stopped by its pid)."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--", *argv]

    def run(self, argv: Sequence[str]) -> str:
        return subprocess.run(self.command(argv), check=True, capture_output=True, text=True).stdout


def _write_configs(d: Path, port: int) -> None:
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nAllowStreamLocalForwarding yes\n"
    )
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    user = os.environ.get("USER") or "root"
    (d / "ssh_config").write_text(
        f"Host {ALIAS}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking yes\n  ConnectTimeout 5\n"
    )


@pytest.fixture(scope="session")
def far_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarHost]:
    """The far host's sshd (started here, in a new mount namespace; stopped by its pid)."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin) or shutil.which("unshare") is None:
        pytest.fail("sshd and unshare are needed: run `make test` (it installs openssh-server)")
    d = tmp_path_factory.mktemp("farhost")
    os.chmod(d, 0o700)
    port = free_port()
    _write_configs(d, port)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        _ENTER,
        "sh",
        str(d),
        sshd_bin,
    ]
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_sshd(proc, port, d / "sshd.log", "the far sshd")
        user = os.environ.get("USER") or "root"
        runner = SshRunner(
            f"{user}@127.0.0.1", port=port, identity=d / "client_key", known_hosts=d / "known_hosts"
        )
        yield FarHost(d / "ssh_config", runner, proc.pid)
    finally:
        processes.stop_child(proc, timeout=5)


@attrs.define
class FarVm:
    """A QEMU (no guest OS) running on the far host: its paths there, and the process (ours, by pid)."""

    host: FarHost
    qemu: QemuProcess
    process: subprocess.Popen[bytes] | None = None

    @property
    def qmp_socket(self) -> Path:
        """The QMP socket's path on the far host (this host has no such file)."""
        return self.qemu.qmp_socket

    def image(self, drive: int = 0) -> Path:
        """A disk image's path on the far host."""
        return self.qemu.drives[drive].path

    def monitor(self) -> QMPMonitor:
        """A QMP connection from this test (through the namespace), to write data and look."""
        return QMPMonitor(self.host.here(self.qmp_socket)).connect()

    def write(self, pattern: int, offset_mib: int, length_mib: int = 1, drive: int = 0) -> None:
        """Write ``pattern`` into the guest-visible disk and flush (qemu-io on the device's backend)."""
        with self.monitor() as qmp:
            for command in (f"write -P {pattern:#x} {offset_mib}M {length_mib}M", "flush"):
                qemu_io(qmp, self.qemu.drives[drive].id, command)

    def stop(self) -> None:
        """Quit QEMU (QMP quit), SIGKILL it after 10 s; by its pid."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception), self.monitor() as qmp:
            qmp.quit()
        processes.stop_child(self.process, timeout=10)


@contextlib.contextmanager
def far_vm(host: FarHost, name: str, sizes: Sequence[str] = ("16M",)) -> Iterator[FarVm]:
    """A QEMU with qcow2 disks of ``sizes`` on the far host, in ``/tmp/<name>-<random>`` there."""
    workdir = Path(f"/tmp/{name}-{secrets.token_hex(3)}")
    host.run(["mkdir", "-m", "0700", str(workdir)])
    drives = []
    for index, size in enumerate(sizes):
        image = workdir / f"disk{index}.qcow2"
        host.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size])
        drives.append(DriveSpec(image, f"disk{index}", serial=f"d{index}"))
    vm = FarVm(host, QemuProcess(workdir, drives, name=name))
    log = open(host.here(workdir) / f"{name}.log", "wb")  # noqa: SIM115
    try:
        vm.process = subprocess.Popen(
            host.command(vm.qemu.argv()), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while not listening(host.here(vm.qmp_socket)):
            assert vm.process.poll() is None, (host.here(workdir) / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "QEMU on the far host did not open its QMP socket"
            time.sleep(0.05)
        yield vm
    finally:
        vm.stop()
        log.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            host.run(["rm", "-rf", "--", str(workdir)])


@attrs.define
class FarGuest:
    """The lab guest (real Linux + qemu-ga) running on the far host: its QEMU (ours, by pid), its paths there.

    Its agent socket is reached from this test through the far host's namespace (:meth:`FarHost.here`);
    QEMU serves it to one client at a time, so every look connects afresh and lets go at once.
    """

    host: FarHost
    qemu: QemuProcess
    process: subprocess.Popen[bytes] | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.qemu.qmp_socket

    @property
    def agent_socket(self) -> Path:
        return self.qemu.agent_socket

    def agent(self) -> GuestAgent:
        """A new agent connection from this test (close it when done)."""
        return GuestAgent.from_socket(self.host.here(self.agent_socket), timeout=5.0)

    def status(self) -> str:
        """``guest-fsfreeze-status``, or the reason the agent did not answer."""
        agent = self.agent()
        try:
            return agent.fsfreeze_status()
        except AgentError as err:
            return err.message
        finally:
            agent.close()

    def wait_until_thawed(self, timeout: float) -> float:
        """Seconds until the agent says "thawed" (fails after ``timeout``)."""
        started = time.monotonic()
        last = ""
        while time.monotonic() - started < timeout:
            last = self.status()
            if last == "thawed":
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"the far guest was not thawed within {timeout:g} s (last: {last})")

    def stop(self) -> None:
        """Quit QEMU (QMP quit), SIGKILL it after 10 s; by its pid."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception), QMPMonitor(self.host.here(self.qmp_socket)).connect() as qmp:
            qmp.quit()
        processes.stop_child(self.process, timeout=10)


@contextlib.contextmanager
def far_lab_guest(host: FarHost, image: LabImage, name: str = "farlab") -> Iterator[FarGuest]:
    """The lab guest booted on the far host, in ``/tmp/<name>-<random>`` there, with a 64 MiB ext4 data disk
    mounted at ``/mnt/data``; stopped (by pid) afterwards."""
    workdir = Path(f"/tmp/{name}-{secrets.token_hex(3)}")
    host.run(["mkdir", "-m", "0700", str(workdir)])
    data = workdir / f"{DATA_SERIAL}.qcow2"
    host.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M"])
    # the image's cache may be under this host's /tmp: the far host gets copies of its own
    for part in (image.kernel, image.initrd):
        shutil.copyfile(part, host.here(workdir / part.name))
    qemu = QemuProcess(
        workdir,
        [DriveSpec(data, DATA_SERIAL, serial=DATA_SERIAL)],
        name=name,
        memory_mb=512,
        kernel=workdir / image.kernel.name,
        initrd=workdir / image.initrd.name,
        append=image.append,
        agent=True,
        extra_args=["-no-reboot"],
    )
    guest = FarGuest(host, qemu)
    log = open(host.here(workdir) / f"{name}.log", "wb")  # noqa: SIM115
    try:
        guest.process = subprocess.Popen(
            host.command(qemu.argv()),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while True:  # the agent answers, then the guest mounts its data disk
            assert guest.process.poll() is None, (host.here(workdir) / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "the lab guest on the far host did not come up"
            if host.here(qemu.agent_socket).exists():
                agent = guest.agent()
                try:
                    if f" {DATA_MOUNT} ".encode() in agent.read_file("/proc/mounts"):
                        break
                except AgentError:
                    pass
                finally:
                    agent.close()
            time.sleep(0.3)
        yield guest
    finally:
        guest.stop()
        log.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            host.run(["rm", "-rf", "--", str(workdir)])
