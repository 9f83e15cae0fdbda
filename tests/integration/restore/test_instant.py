"""Instant restore against real QEMU: images backed by a backup served over NBD, ``block-stream`` in the
running VM, a vmsnap killed mid-copy and resumed, a server that died and was restarted — and at the end
standalone images identical to the backup, with no server left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.restore.conftest import BackedUpDisk, daemon_pids
from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import LabImage
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.restore.instant import JOB_PREFIX, STATE, prepare, stream
from vmsnap.restore.source import ImageSource, ReaderSource
from vmsnap.vm.qmp import QMPMonitor


@pytest.fixture
def instant_run_dir() -> Iterator[Path]:
    """A short private run directory; any server left in it is stopped afterwards."""
    from vmsnap.restore.state import stop_daemons_under

    path = Path(tempfile.mkdtemp(prefix="vi-", dir="/tmp"))
    try:
        yield path
    finally:
        from vmsnap.runner import LocalRunner

        for entry in path.iterdir():
            if entry.is_dir():
                stop_daemons_under(entry, runner=LocalRunner())
        subprocess.run(["rm", "-rf", str(path)], check=False)


def qemu_img_info(image: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True, check=True
    )
    return dict(json.loads(out.stdout))


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True).returncode == 0


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def kill_mid_copy(child: subprocess.Popen[bytes], to: Path, qmp_socket: Path, disk: str) -> None:
    """SIGKILL ``child`` (a vmsnap copying into ``to``) once its copy runs; QEMU's job for ``disk`` (its
    block-stream) must go on without it, the VM running."""
    try:
        deadline = time.monotonic() + 60
        while json.loads((to / STATE).read_text())["status"] != "streaming":
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)  # vmsnap dies mid-copy
        child.wait()
    with QMPMonitor(qmp_socket).connect() as qmp:
        assert qmp.status() == "running"
        job = qmp.job(JOB_PREFIX + disk)
        assert job is not None and job.status == "running"  # QEMU's copy goes on without vmsnap


def test_prepare_refuses_existing_images_and_resumes_its_own(
    backed_up_disk: BackedUpDisk, instant_run_dir: Path, tmp_path: Path
) -> None:
    to = tmp_path / "to"
    to.mkdir()
    (to / "disk0.qcow2").write_bytes(b"someone else's image")
    with pytest.raises(Exception, match="exists already"):
        prepare({"disk0": ImageSource(backed_up_disk.inc)}, to, run_dir=instant_run_dir)
    assert (to / "disk0.qcow2").read_bytes() == b"someone else's image"
    assert not (to / STATE).exists()

    to2 = tmp_path / "to2"
    first = prepare({"disk0": ImageSource(backed_up_disk.inc)}, to2, run_dir=instant_run_dir)
    assert not first.resumed
    pids = daemon_pids(instant_run_dir)
    info = qemu_img_info(first.images["disk0"])
    assert info["backing-filename-format"] == "raw"
    assert str(info["backing-filename"]).startswith("json:")
    again = prepare({"disk0": ImageSource(backed_up_disk.inc)}, to2, run_dir=instant_run_dir)
    assert again.resumed and again.images == first.images
    assert daemon_pids(instant_run_dir) == pids  # the running server is kept
    with pytest.raises(Exception, match="holds another instant restore"):
        prepare({"disk0": ImageSource(backed_up_disk.base)}, to2, run_dir=instant_run_dir)
    assert oct(os.stat(to2 / STATE).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("kind", ["qcow2-chain", "nbdkit-reader"])
def test_a_dead_server_is_restarted_and_qemu_reconnects(
    backed_up_disk: BackedUpDisk, instant_run_dir: Path, tmp_path: Path, kind: str
) -> None:
    """The server dies under a running VM (as after a host reboot): ``prepare`` again starts a new one on
    the same socket path, QEMU's NBD client reconnects, and the stream completes."""
    source = (
        ImageSource(backed_up_disk.inc)
        if kind == "qcow2-chain"
        else ReaderSource(
            "vmsnap.image.readers:VerifiedRawReader",
            {"path": str(backed_up_disk.raw_v2), "chunks": str(backed_up_disk.chunks_v2)},
        )
    )
    to = tmp_path / "to"
    restore = prepare({"disk0": source}, to, run_dir=instant_run_dir)
    vm = QemuProcess(tmp_path / "vm", [DriveSpec(restore.images["disk0"], "disk0")], name="r").start()
    try:
        # QEMU listens on QMP before it opens its disks, and answers a command only after: kill the server
        # under a VM that runs on it, not under one still starting (which would fail to open its backing)
        with vm.monitor() as qmp:
            assert [b for b in qmp.query_block() if b.get("inserted")]
        [old] = daemon_pids(instant_run_dir)
        os.kill(old, signal.SIGKILL)
        while alive(old):
            time.sleep(0.01)
        resumed = prepare({"disk0": source}, to, run_dir=instant_run_dir)
        assert resumed.resumed
        [new] = daemon_pids(instant_run_dir)
        assert new != old
        result = stream(to, vm.qmp_socket)
        assert result.streamed == ("disk0",)
        assert not alive(new)
        with QMPMonitor(vm.qmp_socket).connect() as qmp:
            [block] = [b for b in qmp.query_block() if b.get("inserted")]
            assert "backing-image" not in block["inserted"]["image"]
    finally:
        vm.stop()
    assert "backing-filename" not in qemu_img_info(restore.images["disk0"])
    assert identical(restore.images["disk0"], backed_up_disk.inc)
    assert not (to / STATE).exists()
    assert [p.name for p in instant_run_dir.iterdir()] in ([], [".lock"])


STREAM_IN_A_CHILD = """
import sys
from pathlib import Path
from vmsnap.restore.instant import stream
stream(Path(sys.argv[1]), Path(sys.argv[2]), speed=int(sys.argv[3]))
"""


def _ext4_image(path: Path, size: str, files: dict[str, bytes], tmp_path: Path) -> None:
    """A qcow2 image at ``path`` holding an ext4 filesystem with ``files`` (the lab guest mounts it as its
    data disk, at ``/mnt/data``)."""
    tree, raw = Path(tempfile.mkdtemp(dir=tmp_path)), tmp_path / "ext4.raw"
    for name, content in files.items():
        (tree / name).write_bytes(content)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raw), size], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def sha256sums(guest: LabGuest, root: str) -> dict[str, str]:
    out = guest.sh(f"cd {root} && sha256sum big.bin notes.txt added.bin").stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


@pytest.mark.guest
def test_instant_restore_of_the_lab_guest(lab_image: LabImage, instant_run_dir: Path, tmp_path: Path) -> None:
    """Back the lab guest's data disk up (a full + an incremental, guest off), boot a new guest on images
    backed by that backup, read the files while the copy runs, kill vmsnap mid-copy, resume, and end with
    standalone images identical to the backup. The first version of the disk is an ext4 made on the host
    (``mke2fs -d``, as the lab's root disk is): a guest boots for the second one only."""
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    data = source_dir / "data.qcow2"
    _ext4_image(
        data, "32M", {"big.bin": os.urandom(6 << 20), "notes.txt": b"version 1\n", "added.bin": b""}, tmp_path
    )
    repo = tmp_path / "repo"
    repo.mkdir()
    base, inc = repo / "base.qcow2", repo / "inc.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(data), str(base)], check=True)
    with LabGuest(source_dir, image=lab_image, data_disk_size="32M", name="src") as guest:
        guest.write_file("/mnt/data/notes.txt", b"version 2\n")
        guest.sh("dd if=/dev/urandom of=/mnt/data/added.bin bs=64k count=3 2>/dev/null && sync")
        want = sha256sums(guest, "/mnt/data")
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", "-B", str(base), "-F", "qcow2", str(data), str(inc)],
        check=True,
    )
    assert qemu_img_info(inc)["backing-filename"] == str(base)

    to = tmp_path / "to"
    restore = prepare({"data": ImageSource(inc)}, to, run_dir=instant_run_dir)
    [server] = daemon_pids(instant_run_dir)
    drive = DriveSpec(restore.images["data"], "restored", serial="restored")  # not "data*": left unmounted
    with LabGuest(tmp_path / "restored", image=lab_image, data_disk_size=None, extra_drives=[drive]) as guest:
        child = subprocess.Popen(
            [sys.executable, "-c", STREAM_IN_A_CHILD, str(to), str(guest.qmp_socket), str(1024 * 1024)],
            stderr=subprocess.PIPE,
        )
        kill_mid_copy(child, to, guest.qmp_socket, "data")
        assert guest.agent.is_responding()
        guest.sh("mkdir -p /mnt/r && mount -o ro,noload /dev/disk/by-id/virtio-restored /mnt/r")
        assert sha256sums(guest, "/mnt/r") == want  # read from the backup while the copy still runs
        assert guest.read_file("/mnt/r/notes.txt") == b"version 2\n"
        with QMPMonitor(guest.qmp_socket).connect() as qmp:
            job = qmp.job(JOB_PREFIX + "data")
            assert job is not None and job.status == "running"  # the reads above happened mid-copy
        result = stream(to, guest.qmp_socket)  # the resume
        assert result.streamed == ("data",)
        assert not alive(server)
        assert sha256sums(guest, "/mnt/r") == want
        guest.sh("umount /mnt/r")
    assert "backing-filename" not in qemu_img_info(restore.images["data"])
    assert identical(restore.images["data"], inc)
    assert not (to / STATE).exists()
    assert [p.name for p in instant_run_dir.iterdir()] in ([], [".lock"])
