"""QMPMonitor and QemuMachine against a real QEMU (no guest OS) and a real qemu-storage-daemon."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from vmsnap.errors import BlockJobError, QMPCommandError, QMPConnectionError
from vmsnap.lab.qemu import StorageDaemon, qemu_io
from vmsnap.vm.machine import QemuMachine, find_disk
from vmsnap.vm.qmp import QMPMonitor
from vmsnap.vm.qmp_actions import bitmap_add_action


def test_lists_disks_of_a_running_vm(two_disk_vm: RunningVm) -> None:
    disks = two_disk_vm.machine.disks()
    assert [d.name for d in disks] == ["disk0", "disk1"]
    disk0 = find_disk(disks, "disk0")
    assert disk0.node_name == "fmt-disk0"
    assert disk0.file_node == "file-disk0"
    assert disk0.file == two_disk_vm.images["disk0"]
    assert disk0.format == "qcow2"
    assert disk0.virtual_size == 64 * 1024 * 1024
    assert disk0.qdev == "/machine/peripheral/disk0/virtio-backend"
    assert two_disk_vm.machine.name == "testvm"


def test_data_written_through_qemu_io_reads_back_from_the_image(two_disk_vm: RunningVm) -> None:
    qmp = two_disk_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x5a 1M 2M")
    qemu_io(qmp, "disk1", "write -P 0xa5 0 64k")
    out = qemu_io(qmp, "disk0", "read -P 0x5a 1M 2M")
    assert "Pattern verification failed" not in out
    # QEMU caches qcow2 metadata: a reader of the file sees the writes only after a flush
    qemu_io(qmp, "disk0", "flush")
    raw = two_disk_vm.workdir / "disk0.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "raw", str(two_disk_vm.images["disk0"]), str(raw)], check=True
    )
    data = raw.read_bytes()
    assert data[1 << 20 : 3 << 20] == b"\x5a" * (2 << 20)
    assert data[: 1 << 20] == bytes(1 << 20)


def test_transaction_of_two_actions_is_atomic(two_disk_vm: RunningVm) -> None:
    qmp = two_disk_vm.machine.qmp()
    qmp.transaction(
        [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": "fmt-disk0", "name": "b1", "persistent": True},
            },
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": "fmt-disk1", "name": "b1", "persistent": True},
            },
        ]
    )
    assert [b["name"] for b in qmp.dirty_bitmaps("fmt-disk0")] == ["b1"]
    assert [b["name"] for b in qmp.dirty_bitmaps("fmt-disk1")] == ["b1"]
    # second action fails (no such node): the first must not take effect either
    with pytest.raises(QMPCommandError) as info:
        qmp.transaction(
            [
                {"type": "block-dirty-bitmap-add", "data": {"node": "fmt-disk0", "name": "b2"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": "no-such-node", "name": "b2"}},
            ]
        )
    assert info.value.command == "transaction"
    assert info.value.error_class == "GenericError"
    assert [b["name"] for b in qmp.dirty_bitmaps("fmt-disk0")] == ["b1"]


def test_block_job_is_awaited_through_events(two_disk_vm: RunningVm) -> None:
    qmp = two_disk_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x11 0 4M")
    target = make_image(two_disk_vm.workdir / "target.qcow2")
    qmp.blockdev_add({"driver": "file", "filename": str(target), "node-name": "tgt-file"})
    qmp.blockdev_add({"driver": "qcow2", "file": "tgt-file", "node-name": "tgt"})
    progress: list[tuple[int, int]] = []
    qmp.run_job(
        "blockdev-backup",
        {"device": "fmt-disk0", "target": "tgt", "sync": "full"},
        job_id="test-backup",
        timeout=60,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert qmp.job("test-backup") is None  # concluded and dismissed
    statuses = [e["data"]["status"] for e in qmp.events() if e["event"] == "JOB_STATUS_CHANGE"]
    assert "concluded" not in statuses  # consumed by wait_job, not left behind
    qmp.blockdev_del("tgt")
    qmp.blockdev_del("tgt-file")
    qemu_io(qmp, "disk0", "flush")
    result = subprocess.run(
        ["qemu-img", "compare", "-U", str(two_disk_vm.images["disk0"]), str(target)], capture_output=True
    )
    assert result.returncode == 0, result.stdout


def test_failing_block_job_raises_with_qemu_error(two_disk_vm: RunningVm) -> None:
    qmp = two_disk_vm.machine.qmp()
    # a 1 MiB target for a 64 MiB disk: the backup job fails with an error that must reach us
    small = make_image(two_disk_vm.workdir / "small.raw", size="1M", fmt="raw")
    qmp.blockdev_add({"driver": "file", "filename": str(small), "node-name": "small"})
    with pytest.raises((BlockJobError, QMPCommandError)):
        qemu_io(qmp, "disk0", "write -P 0x22 0 8M")
        qmp.run_job("blockdev-backup", {"device": "fmt-disk0", "target": "small", "sync": "full"}, job_id="j")
    assert qmp.job("j") is None


def test_qmp_command_error_names_command_and_class(two_disk_vm: RunningVm) -> None:
    qmp = two_disk_vm.machine.qmp()
    with pytest.raises(QMPCommandError) as info:
        qmp.execute("blockdev-del", {"node-name": "nope"})
    err = info.value
    assert err.command == "blockdev-del"
    assert err.error_class
    assert "nope" in str(err)
    assert "\n" not in str(err)
    with pytest.raises(QMPCommandError) as info2:
        qmp.execute("no-such-command")
    assert info2.value.error_class == "CommandNotFound"


def test_missing_socket_is_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(QMPConnectionError, match="does not exist"):
        QemuMachine(tmp_path / "nothing.qmp")


def test_dead_socket_is_a_connection_error(tmp_path: Path) -> None:
    path = tmp_path / "dead.qmp"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    with pytest.raises(QMPConnectionError, match="cannot connect"):
        QMPMonitor(path, timeout=2).connect()


def test_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "file.qmp"
    path.write_text("x")
    with pytest.raises(QMPConnectionError, match="not a unix socket"):
        QMPMonitor(path).connect()


def _serve_once(path: Path, payload: bytes | None) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        if payload is not None:
            conn.sendall(payload)
        conn.recv(1024)
        conn.close()
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_socket_that_speaks_something_else_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    _serve_once(path, b"HTTP/1.0 400 Bad Request\r\n\r\n")
    with pytest.raises(QMPConnectionError):
        QMPMonitor(path, timeout=3).connect()


def test_silent_socket_times_out_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    _serve_once(path, None)
    with pytest.raises(QMPConnectionError, match="no QMP greeting"):
        QMPMonitor(path, timeout=1).connect()


def test_storage_daemon_runs_jobs_over_qmp(storage_daemon: StorageDaemon, tmp_path: Path) -> None:
    target = make_image(tmp_path / "copy.qcow2")
    with storage_daemon.monitor() as qmp:
        assert "fmt-img0" in qmp.node_names()
        qmp.blockdev_add({"driver": "file", "filename": str(target), "node-name": "t-file"})
        qmp.blockdev_add({"driver": "qcow2", "file": "t-file", "node-name": "t"})
        qmp.run_job(
            "blockdev-backup", {"device": "fmt-img0", "target": "t", "sync": "full"}, job_id="b", timeout=30
        )
        qmp.blockdev_del("t")
        qmp.blockdev_del("t-file")


def test_nbd_server_and_export_methods(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    qmp = two_disk_vm.machine.qmp()
    qemu_io(qmp, "disk0", "write -P 0x44 1M 64k")
    qmp.transaction([bitmap_add_action("fmt-disk0", "b0", persistent=False)])
    qemu_io(qmp, "disk0", "write -P 0x45 2M 64k")
    sock = tmp_path / "nbd.sock"
    qmp.nbd_server_start(sock)
    with pytest.raises(QMPCommandError):
        qmp.nbd_server_start(tmp_path / "second.sock")  # one NBD server per QEMU
    qmp.block_export_add_nbd("e0", "fmt-disk0", name="disk0", bitmaps=[("fmt-disk0", "b0")])
    assert [e["id"] for e in qmp.query_block_exports()] == ["e0"]
    uri = f"nbd+unix:///disk0?socket={sock}"
    out = subprocess.run(
        ["nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", uri], capture_output=True, check=True, text=True
    )
    assert [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] & 1] == [
        (2 << 20, 64 << 10)
    ]
    qmp.block_export_del("e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED", match={"id": "e0"}, timeout=30)
    assert qmp.query_block_exports() == []
    qmp.nbd_server_stop()
    with pytest.raises(QMPCommandError):
        qmp.nbd_server_stop()
    qmp.block_dirty_bitmap_remove("fmt-disk0", "b0")
    assert qmp.dirty_bitmaps("fmt-disk0") == []


def test_filter_child_and_device_nodes(two_disk_vm: RunningVm) -> None:
    qmp = two_disk_vm.machine.qmp()
    assert qmp.filter_child("fmt-disk0") == "file-disk0"  # QEMU 7.2: from x-debug-query-block-graph
    assert qmp.filter_child("fmt-disk0", "backing") == ""
    assert qmp.filter_child("no-such-node") == ""
    qdev = "/machine/peripheral/disk0/virtio-backend"
    assert qmp.device_node(qdev) == "fmt-disk0"
    qmp.set_device_node(qdev, "fmt-disk0")  # the node it has: nothing is sent (qom-set would abort QEMU 7.2)
    assert two_disk_vm.process.alive() and qmp.device_node(qdev) == "fmt-disk0"
    with pytest.raises(QMPCommandError):
        qmp.qom_set(qdev, "drive", "no-such-node")


class _AnsweringMonitor(QMPMonitor):
    """A monitor that answers from a table instead of a QEMU (for answers this QEMU cannot give)."""

    def __init__(self, answers: dict[str, object]) -> None:
        super().__init__("/nonexistent")
        self.answers = answers
        self.sent: list[str] = []

    def execute(self, command: str, arguments: object = None, *, timeout: float | None = None) -> object:
        self.sent.append(command)
        return self.answers[command]


def test_filter_child_reads_the_stable_children_of_qemu_10_1_first() -> None:
    node = {
        "node-name": "cbw",
        "children": [{"child": "target", "node-name": "t"}, {"child": "file", "node-name": "d"}],
    }
    monitor = _AnsweringMonitor({"query-named-block-nodes": [node]})
    assert monitor.filter_child("cbw") == "d"
    assert monitor.filter_child("cbw", "backing") == ""
    assert monitor.sent == ["query-named-block-nodes", "query-named-block-nodes"]  # never the x-debug command
    monitor.close()
