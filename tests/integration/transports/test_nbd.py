"""The nbd transport: the contract suite, plus dirty-bitmap incrementals read from qemu-nbd and from a running
QEMU's own NBD server (pull mode), and what it does with bad incremental input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import attrs
import pytest

from tests.conftest import RunningVm
from tests.integration.transports.conftest import (
    SIZE,
    CaseFactory,
    images_equal,
    qemu_io,
    served,
)
from tests.integration.transports.contract import ProgressLog, TransportContract
from vmsnap.errors import TransferError, UsageError
from vmsnap.image.digest import guest_sha256
from vmsnap.lab.qemu import qemu_io as vm_qemu_io
from vmsnap.model import Disk, ExportSource
from vmsnap.transports.nbd import NbdTransport

KiB = 1024


class TestNbdContract(TransportContract):
    transport_name = "nbd"


def own_data_bytes(image: Path) -> int:
    """Bytes of data stored in ``image`` itself (not in its backing files), from ``qemu-img map``."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def backing_of(image: Path) -> str:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    return str(json.loads(info).get("backing-filename", ""))


def test_incremental_copies_only_dirty_extents(case_factory: CaseFactory, tmp_path: Path) -> None:
    image = case_factory("qcow2").reference  # the qcow2 case's image is its own reference
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)  # tracks writes from now
    repo = tmp_path / "repo"
    (repo / "b1").mkdir(parents=True)
    (repo / "b2").mkdir()
    source = ExportSource(
        "file", str(image), "qcow2", Disk("disk0", "", image, "qcow2", SIZE), SIZE, dirty_bitmap="b0"
    )
    full = repo / "b1" / "disk0.qcow2"
    NbdTransport().send(source, full, progress=ProgressLog())  # no backing: a full copy
    assert images_equal(full, image)
    before = guest_sha256(full, "qcow2")

    # change 256 KiB, zero 64 KiB of old data (the overlay must hide the parent's data there)
    qemu_io(image, "qcow2", "write -P 0x77 10M 256K", "write -z 0 64K")
    transport = NbdTransport(backing=full)
    progress = ProgressLog()
    inc = repo / "b2" / "disk0.qcow2"
    stats = transport.send(source, inc, progress=progress)

    assert images_equal(inc, image)
    assert guest_sha256(inc, "qcow2") == guest_sha256(image, "qcow2") != before
    assert backing_of(inc) == "../b1/disk0.qcow2"
    assert transport.last_dirty_bytes == 320 * KiB  # 256 KiB written + 64 KiB zeroed, nothing else read
    assert stats.bytes_written == 256 * KiB
    assert own_data_bytes(inc) == 256 * KiB
    assert oct(inc.stat().st_mode & 0o777) == "0o600"
    assert guest_sha256(full, "qcow2") == before, "the parent changed"
    progress.check()
    # the chain survives moving the whole repository (the backing path is relative)
    moved = tmp_path / "moved"
    repo.rename(moved)
    assert images_equal(moved / "b2" / "disk0.qcow2", image)


def test_incremental_from_a_qemu_nbd_export(case_factory: CaseFactory, tmp_path: Path) -> None:
    image = case_factory("qcow2").reference
    full = tmp_path / "full.qcow2"
    NbdTransport().send(
        ExportSource("file", str(image), "qcow2", Disk("d", "", image, "qcow2", SIZE), SIZE),
        full,
        progress=ProgressLog(),
    )
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    qemu_io(image, "qcow2", "write -P 0x66 20M 128K")
    workdir = tmp_path / "srv"
    workdir.mkdir()
    with served(image, "qcow2", workdir, "--bitmap=b0") as uri:
        source = ExportSource("nbd", uri, "raw", Disk("d", "", image, "qcow2", SIZE), SIZE, dirty_bitmap="b0")
        transport = NbdTransport()
        stats = transport.send(source, tmp_path / "inc.qcow2", progress=ProgressLog(), backing=full)
    assert images_equal(tmp_path / "inc.qcow2", image)
    assert transport.last_dirty_bytes == stats.bytes_written == 128 * KiB


def test_pull_mode_from_a_running_vm(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    """QEMU's own NBD server exports the disk with its dirty bitmap; full, then incremental, while it runs."""
    vm = two_disk_vm
    disk = next(d for d in vm.machine.disks() if d.name == "disk0")
    sock = vm.workdir / "pull.sock"
    out = tmp_path / "out"
    out.mkdir()
    qmp = vm.machine.qmp()
    vm_qemu_io(qmp, "disk0", "write -P 0x5a 1M 2M")
    qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    uri = f"nbd+unix:///disk0?socket={sock}"
    export = {"type": "nbd", "node-name": disk.node_name, "name": "disk0"}
    try:
        # full: the bitmap starts tracking at the instant of the copy (no guest writes in between here)
        qmp.execute("block-dirty-bitmap-add", {"node": disk.node_name, "name": "b0"})
        qmp.execute("block-export-add", {**export, "id": "e0"})
        full = out / "full.qcow2"
        NbdTransport().send(
            ExportSource("nbd", uri, "raw", disk, disk.virtual_size), full, progress=ProgressLog()
        )
        qmp.execute("block-export-del", {"id": "e0"})

        vm_qemu_io(qmp, "disk0", "write -P 0xa5 2M 64K")
        vm_qemu_io(qmp, "disk0", "write -P 0x3c 50M 64K")
        vm_qemu_io(qmp, "disk0", "flush")
        # incremental: freeze the bitmap (QEMU exports only disabled bitmaps read-only) and export it
        qmp.execute("block-dirty-bitmap-disable", {"node": disk.node_name, "name": "b0"})
        qmp.execute("block-export-add", {**export, "id": "e1", "bitmaps": ["b0"]})
        source = ExportSource(
            "nbd", uri, "raw", disk, disk.virtual_size, dirty_bitmap="qemu:dirty-bitmap:b0"
        )  # as strategies name it
        transport = NbdTransport(backing=full)
        transport.send(source, out / "inc.qcow2", progress=ProgressLog())
        qmp.execute("block-export-del", {"id": "e1"})
    finally:
        qmp.execute("nbd-server-stop")
    assert transport.last_dirty_bytes == 128 * KiB
    assert own_data_bytes(out / "inc.qcow2") == 128 * KiB
    done = subprocess.run(
        ["qemu-img", "compare", "-U", str(out / "inc.qcow2"), str(vm.images["disk0"])],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not images_equal(full, out / "inc.qcow2")
    assert vm.process.alive()


def test_incremental_needs_the_bitmap(case_factory: CaseFactory, tmp_path: Path) -> None:
    case = case_factory("nbd")  # served without --bitmap
    parent = tmp_path / "parent.qcow2"
    NbdTransport().send(case.source, parent, progress=ProgressLog())
    with pytest.raises(UsageError, match="dirty bitmap"):
        NbdTransport(backing=parent).send(case.source, tmp_path / "inc.qcow2", progress=ProgressLog())
    with_bitmap = attrs.evolve(case.source, dirty_bitmap="b0")
    with pytest.raises(TransferError, match="does not expose qemu:dirty-bitmap:b0"):
        NbdTransport(backing=parent).send(with_bitmap, tmp_path / "inc.qcow2", progress=ProgressLog())
    with pytest.raises(TransferError, match=r"parent image .* does not exist"):
        NbdTransport(backing=tmp_path / "gone.qcow2").send(
            with_bitmap, tmp_path / "inc.qcow2", progress=ProgressLog()
        )
    assert sorted(os.listdir(tmp_path)) == ["case0", "parent.qcow2"]


def test_tcp_on_request(case_factory: CaseFactory, tmp_path: Path) -> None:
    case = case_factory("qcow2")
    NbdTransport(tcp=True).send(case.source, tmp_path / "out.qcow2", progress=ProgressLog())
    assert images_equal(tmp_path / "out.qcow2", case.reference)
