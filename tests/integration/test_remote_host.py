"""RemoteHost (vmsnap.vm.remote) against the real sshd on 127.0.0.1: a real QEMU whose QMP socket is reached
only through the forward, an NBD export forwarded on demand, commands over the master."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from vmsnap.errors import CommandError, NotFoundError, QMPConnectionError
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.runner import SshRunner
from vmsnap.vm.machine import QemuMachine
from vmsnap.vm.qmp import QMPMonitor
from vmsnap.vm.remote import RemoteHost


def remote_for(sshd: SshRunner, **kwargs: object) -> RemoteHost:
    return RemoteHost(
        sshd.destination,
        port=sshd.port,
        identity=sshd.identity,
        known_hosts=sshd.known_hosts,
        options={"ConnectTimeout": "5"},
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuProcess]:
    image = make_image(tmp_path / "disk0.qcow2", "16M")
    process = QemuProcess(tmp_path / "vm", [DriveSpec(image, "disk0", serial="d0")], name="farvm").start()
    try:
        yield process
    finally:
        process.stop()
        process.kill()


def test_qmp_of_a_remote_qemu_through_the_forward(sshd: SshRunner, qemu: QemuProcess) -> None:
    with remote_for(sshd, forwards=[qemu.qmp_socket]) as remote:
        local = remote.local(qemu.qmp_socket)
        assert local != qemu.qmp_socket and local.is_socket()
        private = local.parent
        assert private.stat().st_mode & 0o777 == 0o700
        pid = remote.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
        with QemuMachine(local, name="farvm", runner=remote.runner) as machine:
            disks = machine.disks()
            assert [d.name for d in disks] == ["disk0"]
            assert disks[0].file == qemu.drives[0].path
            # host-side commands run on the other host, over the same master
            result = machine.runner.run(["qemu-img", "info", "--output=json", "-U", str(disks[0].file)])
            assert result.host == f"ssh:{sshd.destination}" and '"virtual-size": 16777216' in result.stdout
    # torn down: the master is gone (by pid), its sockets and private directory removed
    assert not private.exists()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the ssh master outlived close()"
        time.sleep(0.05)
    with pytest.raises(QMPConnectionError):
        QMPMonitor(local, timeout=2).connect()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_an_nbd_export_forwarded_on_demand(sshd: SshRunner, tmp_path: Path) -> None:
    image = tmp_path / "data.raw"
    pattern = os.urandom(64 * 1024) * 16  # 1 MiB
    image.write_bytes(pattern)
    socket = tmp_path / "exports" / "nbd.sock"
    socket.parent.mkdir()
    server = subprocess.Popen(
        ["qemu-nbd", "--persistent", "--read-only", "--format=raw", f"--socket={socket}", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert time.monotonic() < deadline and server.poll() is None, "qemu-nbd did not start"
            time.sleep(0.02)
        with remote_for(sshd) as remote:
            with remote.forwarded(socket) as local:
                assert local.parent != socket.parent
                copy = tmp_path / "copy.raw"
                subprocess.run(
                    [
                        "qemu-img",
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "raw",
                        f"nbd+unix:///?socket={local}",
                        str(copy),
                    ],
                    check=True,
                    timeout=60,
                )
                assert copy.read_bytes() == pattern
            assert not local.exists()  # cancelled: the local socket is gone, the master still runs
            assert remote.pid is not None
            assert remote.runner.run(["printf", "%s", "still here"]).stdout == "still here"
    finally:
        server.terminate()
        server.wait(10)


def test_a_missing_remote_socket_is_named(sshd: SshRunner, tmp_path: Path) -> None:
    missing = tmp_path / "gone.qmp"
    with pytest.raises(NotFoundError) as info:
        remote_for(sshd, forwards=[missing]).open()
    assert str(missing) in str(info.value) and sshd.destination in str(info.value)
    with remote_for(sshd) as remote, pytest.raises(NotFoundError, match=r"gone\.qmp"):
        remote.forward(missing)


def test_an_unreachable_host_fails_at_once_without_prompting(sshd: SshRunner) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # unix socket paths must stay short
        remote = RemoteHost(
            sshd.destination,
            port=1,
            known_hosts=sshd.known_hosts,
            options={"ConnectTimeout": "3"},
            socket_dir=Path(short),
        )
        with pytest.raises(CommandError) as info:
            remote.open()
        assert "BatchMode" in info.value.hint
        assert remote.pid is None
        assert list(Path(short).iterdir()) == []  # the private directory is removed again
