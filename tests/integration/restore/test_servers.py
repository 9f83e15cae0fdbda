"""The two servers, alone: qemu-storage-daemon (daemonised, found and stopped by another process through its
record, read-only) and nbdkit's Python plugin (sizes, reads, block status, multi-conn, EIO on a bad chunk)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.integration.restore.conftest import BackedUpDisk
from tests.integration.restore.images import MiB, pattern
from vmsnap import processes
from vmsnap.image.daemon import read_record, stop_recorded
from vmsnap.image.digest import image_chunks, write_chunks_file
from vmsnap.image.nbdkit import NbdkitServer
from vmsnap.image.storage_daemon import FuseExport, NbdExport, QemuStorageDaemon, qcow2_chain_node


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vs-", dir="/tmp") as path:
        yield Path(path)


def connect(uri: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.add_meta_context("base:allocation")
    handle.connect_uri(uri)
    return handle


STOP_FROM_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from vmsnap.image.daemon import read_record, stop_recorded
stop_recorded(read_record(Path(sys.argv[1])))
"""


def test_storage_daemon_outlives_its_object_and_another_process_stops_it(
    backed_up_disk: BackedUpDisk, short_dir: Path
) -> None:
    node = qcow2_chain_node(backed_up_disk.inc, "disk")
    daemon = QemuStorageDaemon(
        [node],
        nbd_exports=[NbdExport("disk", "disk")],
        fuse_exports=[FuseExport("disk", "disk.raw")],
        parent=short_dir,
    )
    daemon.start()
    record_path = daemon.record_path
    record = read_record(record_path)
    assert record.alive() and record.pid == daemon.pid
    assert os.stat(record.directory).st_mode & 0o777 == 0o700
    assert os.stat(record_path).st_mode & 0o777 == 0o600
    assert processes.matches(record.pid, record.identity)
    assert not processes.matches(record.pid, processes.Identity("qemu-storage-daemon", "/some/other/dir"))
    assert not processes.matches(
        record.pid, processes.Identity("qemu-storage-daemon", record.marker, (record.start_time or 0) + 1)
    )
    raw = record.fuse_files[0]
    with open(backed_up_disk.raw_v2, "rb") as want, open(raw, "rb") as got:
        assert got.read(4 * MiB) == want.read(4 * MiB)
    handle = connect(daemon.uri("disk"))
    assert handle.is_read_only()
    with pytest.raises(nbd.Error):
        handle.pwrite(b"x" * 512, 0)
    handle.shutdown()
    subprocess.run(
        [sys.executable, "-c", STOP_FROM_ANOTHER_PROCESS, str(record_path)], check=True, timeout=60
    )
    assert not record.alive()
    assert not record.directory.exists()
    assert str(raw) not in Path("/proc/self/mounts").read_text()
    daemon.stop()  # nothing left to do, and no error


def test_a_daemon_killed_with_sigkill_leaves_a_fuse_mount_that_stop_recorded_removes(
    backed_up_disk: BackedUpDisk, short_dir: Path
) -> None:
    daemon = QemuStorageDaemon(
        [qcow2_chain_node(backed_up_disk.base, "disk")],
        fuse_exports=[FuseExport("disk", "d")],
        parent=short_dir,
    ).start()
    record = daemon.record
    os.kill(record.pid, signal.SIGKILL)
    while record.alive():
        pass
    assert str(record.fuse_files[0]) in Path("/proc/self/mounts").read_text()  # the premise
    stop_recorded(record)
    assert str(record.fuse_files[0]) not in Path("/proc/self/mounts").read_text()
    assert not record.directory.exists()


def test_nbdkit_plugin_serves_a_verified_reader(backed_up_disk: BackedUpDisk, short_dir: Path) -> None:
    raw = short_dir / "disk.raw"
    with open(raw, "wb") as out:
        out.write(pattern("a", 5 * MiB))
        out.truncate(16 * MiB)  # 11 MiB hole: chunks 2 and 3 are zeros
    chunks = short_dir / "disk.chunks"
    write_chunks_file(chunks, image_chunks(raw, "raw"))
    options = {"path": str(raw), "chunks": str(chunks)}
    with NbdkitServer("vmsnap.image.readers:VerifiedRawReader", options, parent=short_dir) as server:
        first, second = connect(server.uri), connect(server.uri)
        assert first.get_size() == 16 * MiB
        assert first.can_multi_conn() and first.is_read_only()
        assert first.pread(2 * MiB, MiB) == pattern("a", 3 * MiB)[MiB:]  # chunk 0 only
        assert second.pread(4096, 15 * MiB) == bytes(4096)
        found: list[tuple[int, int]] = []

        def collect(context: str, offset: int, entries: list[int], error: object) -> int:
            found.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        first.block_status(16 * MiB, 0, collect)
        assert found == [(8 * MiB, 0), (8 * MiB, 3)]  # data, then hole|zero for the two zero chunks
        with open(raw, "r+b") as out:  # damage chunk 1, which nothing has read into the reader's cache
            out.seek(4 * MiB + 17)
            out.write(b"\x00\x01")
        with pytest.raises(nbd.Error) as err:
            second.pread(512, 4 * MiB + 4096)
        assert "Input/output error" in str(err.value)  # EIO
        assert first.pread(512, 0) == pattern("a", 512)  # the rest still reads
        assert "does not match its sha256" in server.log.read_text()
        first.shutdown()
        second.shutdown()
        pid = server.record.pid
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


def test_nbdkit_reports_a_reader_that_cannot_open(short_dir: Path) -> None:
    from vmsnap.errors import TransferError

    with pytest.raises(TransferError, match="does not exist"):
        NbdkitServer("vmsnap.image.readers:RawFileReader", {"path": "/no/such.raw"}, parent=short_dir).start()
    assert list(short_dir.iterdir()) == []
