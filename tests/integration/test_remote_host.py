"""Other hosts: RemoteHost (vmsnap.vm.remote) against the real sshd on 127.0.0.1 — a real QEMU whose QMP
socket is reached only through the forward, an NBD export forwarded on demand, commands over the master —
and a VM on the "far host" (an sshd with its own /tmp, tests/integration/far_host.py) backed up end to end
through `vmsnap backup --host`: full, incremental, offline incremental, restored, compared byte for byte; and
the lab guest on the far host, frozen by a backup that is killed with its SSH connection (or whose connection
hangs): the thaw guard that runs there thaws it."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import CliResult, cli_process, cli_started, wait_stopped
from tests.integration.far_host import ALIAS, FarGuest, FarHost, far_lab_guest, far_vm
from vmsnap import processes
from vmsnap.backup.config import CRASH_ENV
from vmsnap.errors import CommandError, NotFoundError, QMPConnectionError
from vmsnap.lab.image import LabImage
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.runner import SshRunner
from vmsnap.vm.guards import LEASE
from vmsnap.vm.machine import QemuMachine
from vmsnap.vm.qmp import QMPMonitor
from vmsnap.vm.remote import RemoteHost
from vmsnap.vm.thawguard import target_key


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


# -- a VM on another host, end to end through the CLI ----------------------------------------------------


def _far(far_host: FarHost) -> dict[str, str]:
    """The environment that makes `--host farhost` reach the far host (its ssh_config: port, key,
    known_hosts)."""
    return {"VMSNAP_SSH_CONFIG": str(far_host.config)}


def _ok(result: CliResult) -> dict[str, object]:
    assert result.code == 0, result.err
    return dict(result.json())


def test_a_vm_on_another_host_backed_up_into_a_local_chunks_repository(
    far_host: FarHost, tmp_path: Path, state_dir: Path
) -> None:
    """The far host's QMP socket, images, QEMU's NBD socket and fleecing files are in its own /tmp: the
    backup reaches them only through the SSH tunnel (forwarded sockets) and the far host's runner."""
    repo = tmp_path / "repo"
    env = _far(far_host)
    with far_vm(far_host, "farvm", ("16M", "8M")) as vm:
        assert not vm.qmp_socket.exists()  # not on this host
        vm.write(0x5A, 1, 2)
        vm.write(0x11, 3, 1, drive=1)
        selector = ["--host", ALIAS, "--qmp", str(vm.qmp_socket)]
        full = _ok(cli_process("backup", "--repo", repo, *selector, "--json", env=env))
        assert full["kind"] == "full" and full["vm"] == "farvm"  # its name from QEMU, through the tunnel
        at_full = tmp_path / "at-full.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "qcow2", str(far_host.here(vm.image(0))), str(at_full)],
            check=True,
        )
        vm.write(0x77, 9, 1)
        incremental = _ok(
            cli_process("backup", "--repo", repo, *selector, "--incremental", "--json", env=env)
        )
        assert incremental["kind"] == "incremental"
        disks = {d["name"]: d for d in incremental["disks"]}  # type: ignore[attr-defined]
        assert disks["disk0"]["chunks"]["bytes_read"] == 1 << 20  # the changed MiB, as the bitmap says
        assert disks["disk1"]["chunks"]["bytes_read"] == 0
        # the work directory was made on the far host (QEMU wrote the fleecing files there), and nothing is
        # left there: no work directory, no NBD server directory
        assert list(far_host.here(state_dir).glob("repos/*/work/farvm")), "no work directory on the far host"
        assert list(far_host.here(state_dir).glob("repos/*/work/farvm/*")) == []
        assert list(far_host.here("/tmp").glob("vmsnap-*")) == []
        vm.stop()  # QEMU writes its persistent dirty bitmaps into the images
        far_host.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 12M 1M", str(vm.image(0))])
        images = ["--image", str(vm.image(0)), "--image", str(vm.image(1)), "--name", "farvm"]
        offline = _ok(
            cli_process(
                "backup", "--repo", repo, "--host", ALIAS, *images, "--incremental", "--json", env=env
            )
        )
        assert offline["kind"] == "incremental"  # qemu-nbd on the far host, its socket forwarded
        for name, backup, expected in (
            ("full", full, {"disk0": at_full}),
            ("offline", offline, {f"disk{i}": far_host.here(vm.image(i)) for i in range(2)}),
        ):
            out = tmp_path / name
            restore = ("restore", "--repo", repo, "--vm", "farvm", "--backup", str(backup["backup_id"]))
            _ok(cli_process(*restore, "--to", out, "--json"))
            for disk, image in expected.items():
                compared = subprocess.run(
                    ["qemu-img", "compare", "-U", str(out / f"{disk}.qcow2"), str(image)], capture_output=True
                )
                assert compared.returncode == 0, f"{name} {disk}: {compared.stdout!r} {compared.stderr!r}"


def test_a_missing_socket_on_another_host_is_one_line(far_host: FarHost, tmp_path: Path) -> None:
    result = cli_process(
        "backup",
        "--repo",
        tmp_path / "repo",
        "--host",
        ALIAS,
        "--qmp",
        "/tmp/no-such.qmp",
        env=_far(far_host),
    )
    assert result.code == 1
    assert f"no unix socket /tmp/no-such.qmp on {ALIAS}" in result.error_line
    assert not (tmp_path / "repo").exists()  # nothing was begun


# -- the thaw guard on the far host ------------------------------------------------------------------------


def _guard_record(far_host: FarHost, guest: FarGuest) -> Path:
    """Where the guard of the far guest's agent keeps its record there (root: /run/vmsnap/guards)."""
    key = target_key(["socket", str(guest.agent_socket)])
    return far_host.here(f"/run/vmsnap/guards/{key}.json")


def _children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            argv = processes.cmdline(int(entry.name))
            if parent == pid and argv:
                found.append((int(entry.name), argv))
    return found


def _wait_gone(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} is still there after {timeout:g} s"
        time.sleep(0.1)


def test_a_remote_backup_killed_with_its_ssh_connection_is_thawed_by_the_guard_there(
    far_host: FarHost, lab_image: LabImage, tmp_path: Path
) -> None:
    """vmsnap, its SSH master and every ssh it started die at once (its process group, SIGKILL) while the
    guest is frozen: nothing on this host can reach the agent any more; the guard on the far host can."""
    env = _far(far_host)
    with far_lab_guest(far_host, lab_image) as guest:
        selector = ["--host", ALIAS, "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket)]
        repo = tmp_path / "repo"
        crash = {**env, CRASH_ENV: "stop:after-freeze"}
        run = cli_started("backup", "--repo", repo, *selector, "--quiesce", "on", env=crash)
        try:
            wait_stopped(run)
            assert guest.status() == "frozen"
            record = _guard_record(far_host, guest)
            assert record.exists(), "no thaw guard runs on the far host"
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(10)
        seconds = guest.wait_until_thawed(10)  # no recover: the far guard did it
        print(f"\nthawed {seconds:.2f} s after the kill was seen")
        _wait_gone(record, 10)  # the guard ended with its thaw, its lock and record removed
        agent = guest.agent()
        try:
            agent.write_file("/mnt/data/after-kill.txt", b"writes go on\n")
        finally:
            agent.close()

        recovered = _ok(cli_process("recover", *selector, "--repo", repo, "--json", env=env))
        assert "the guest's filesystems are thawed" in recovered["found"]  # type: ignore[operator]
        assert _ok(cli_process("recover", *selector, "--repo", repo, "--json", env=env))["clean"]


def test_a_remote_backup_whose_connection_hangs_is_thawed_when_its_lease_ends(
    far_host: FarHost, lab_image: LabImage, tmp_path: Path
) -> None:
    """The SSH connection stops carrying anything (its master stopped: no end of file reaches the far host,
    and no beat) and vmsnap dies: the far guard thaws when the lease ends."""
    env = _far(far_host)
    with far_lab_guest(far_host, lab_image) as guest:
        selector = ["--host", ALIAS, "--qmp", str(guest.qmp_socket), "--agent", str(guest.agent_socket)]
        run = cli_started(
            "backup",
            "--repo",
            tmp_path / "repo",
            *selector,
            "--quiesce",
            "on",
            env={**env, CRASH_ENV: "stop:after-freeze"},
        )
        master = 0
        try:
            wait_stopped(run)
            masters = [pid for pid, argv in _children(run.pid) if argv[0] == "ssh" and "-M" in argv]
            assert len(masters) == 1, _children(run.pid)
            master = masters[0]
            os.kill(master, signal.SIGSTOP)
            os.kill(run.pid, signal.SIGKILL)
            run.wait(10)
            killed = time.monotonic()
            assert guest.status() == "frozen"
            guest.wait_until_thawed(LEASE + 10)
            print(f"\nthawed {time.monotonic() - killed:.1f} s after the kill (lease {LEASE:g} s)")
            _wait_gone(_guard_record(far_host, guest), 10)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(10)
            if master:
                os.kill(master, signal.SIGKILL)  # the dead run's master (ours: this test started the run)
