"""Fixtures shared by every test: real QEMU processes, images, a local sshd.

Every fixture stops only the processes it started (by pid) and leaves nothing running when a test fails.
Session fixtures are per xdist worker (each worker process has its own sshd, lab guest …); see
tests/README.md for writing a test that runs beside others.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from tests.sshd import free_port, wait_for_sshd
from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import LabImage, build_lab_image
from vmsnap.lab.qemu import DriveSpec, QemuProcess, StorageDaemon
from vmsnap.runner import SshRunner
from vmsnap.vm.machine import QemuMachine

pytest_plugins = ["tests.cputime"]  # per-test CPU and wall times, only with VMSNAP_TEST_TIMES set


def make_image(path: Path, size: str = "64M", fmt: str = "qcow2", backing: Path | None = None) -> Path:
    """Create a disk image with qemu-img."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*argv, str(path), size] if backing is None else [*argv, str(path)], check=True)
    return path


@attrs.define
class RunningVm:
    """A QEMU with no guest OS, its images and a connected QemuMachine."""

    process: QemuProcess
    machine: QemuMachine
    images: dict[str, Path]
    workdir: Path


@pytest.fixture
def two_disk_vm(tmp_path: Path) -> Iterator[RunningVm]:
    """A running QEMU (no OS) with two 64 MiB qcow2 data disks: disk0 on virtio-blk, disk1 on scsi-hd."""
    images = {
        "disk0": make_image(tmp_path / "disk0.qcow2"),
        "disk1": make_image(tmp_path / "disk1.qcow2"),
    }
    drives = [
        DriveSpec(images["disk0"], "disk0", serial="d0"),
        DriveSpec(images["disk1"], "disk1", bus="scsi", serial="d1"),
    ]
    process = QemuProcess(tmp_path, drives, name="testvm").start()
    try:
        machine = QemuMachine(process.qmp_socket)
    except BaseException:
        process.kill()
        raise
    try:
        yield RunningVm(process, machine, images, tmp_path)
    finally:
        machine.close()
        process.stop()
        process.kill()


@pytest.fixture
def storage_daemon(tmp_path: Path) -> Iterator[StorageDaemon]:
    """A qemu-storage-daemon with one 64 MiB qcow2 image on node fmt-img0."""
    image = make_image(tmp_path / "img0.qcow2")
    daemon = StorageDaemon(tmp_path, [DriveSpec(image, "img0")]).start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshRunner]:
    """A real OpenSSH server on 127.0.0.1 with a generated host key and client key; yields an SshRunner."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin):
        pytest.fail("sshd is not installed: run `make test` (it installs openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    user = os.environ.get("USER") or "root"
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    proc = subprocess.Popen(
        [sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")],
        stdin=subprocess.DEVNULL,
        stdout=open(d / "sshd.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_sshd(proc, port, d / "sshd.log")
        yield SshRunner(
            f"{user}@127.0.0.1",
            port=port,
            identity=d / "client_key",
            known_hosts=d / "known_hosts",
            options={"ConnectTimeout": "5"},
        )
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the lab guest (real Linux + qemu-ga under QEMU; see vmsnap/lab/guest.py) -------------------------


class _LabImageBuild:
    """The lab image, built on a thread of its own from the end of the collection on when a collected test
    needs it: on a machine without the cached build, the kernel download and the build overlap the tests
    that run before the first lab guest boots. The builder's lock makes concurrent workers build it once."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.image: LabImage | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._build, name="lab-image-build", daemon=True)
            self.thread.start()

    def _build(self) -> None:
        try:
            self.image = build_lab_image()
        except BaseException as err:  # handed to the test that needs the image
            self.error = err

    def result(self) -> LabImage:
        if self.thread is None:
            return build_lab_image()
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.image is not None
        return self.image


_lab_image_build = _LabImageBuild()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("lab_image" in getattr(item, "fixturenames", ()) for item in items):
        _lab_image_build.start()


@pytest.fixture(scope="session")
def lab_image() -> LabImage:
    """The lab guest's kernel and initramfs, built once and cached (``$VMSNAP_LAB_CACHE``)."""
    return _lab_image_build.result()


@pytest.fixture(scope="session")
def lab_guest(lab_image: LabImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    """One lab guest for the whole session, with a 64 MiB ext4 data disk mounted at /mnt/data.

    Shared: a test must leave it thawed and remove what it put in /etc/qemu/fsfreeze-hook.d.
    """
    with LabGuest(tmp_path_factory.mktemp("lab-guest"), image=lab_image, name="labvm") as guest:
        yield guest


LabGuestFactory = Callable[..., LabGuest]


@pytest.fixture
def lab_guest_factory(lab_image: LabImage, tmp_path: Path) -> Iterator[LabGuestFactory]:
    """Boot lab guests of your own: ``factory(extra_drives=[DriveSpec(img, "pv0", format="raw",
    serial="pv0")], data_disk_size=None, extra_args=[…])``; every guest booted is stopped when the test
    ends."""
    guests: list[LabGuest] = []

    def boot(
        *,
        extra_drives: Sequence[DriveSpec] = (),
        data_disk_size: str | None = "64M",
        name: str = "labvm",
        extra_args: Sequence[str] = (),
    ) -> LabGuest:
        guest = LabGuest(
            tmp_path / f"guest{len(guests)}",
            extra_drives=extra_drives,
            data_disk_size=data_disk_size,
            name=name,
            image=lab_image,
            extra_args=extra_args,
        )
        guests.append(guest)
        return guest.start()

    try:
        yield boot
    finally:
        for guest in guests:
            guest.stop()


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test keeps vmsnap's local state (chunks repositories' journals, caches) in a directory of its
    own, never in /var/lib/vmsnap; processes the test starts inherit it."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("VMSNAP_STATE_DIR", str(path))
    return path
