"""The contract every transport keeps (fsspec-style): each transport's test module subclasses
:class:`TransportContract` and says how to make the transport and where its targets go.

Every source kind (qcow2, raw, internal snapshot, backing chain, NBD export, block device) is sent and the
target compared byte for byte with what the source's guest sees; then the bad inputs.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest

from tests.conftest import RunningVm
from tests.integration.transports.conftest import SIZE, CaseFactory, SourceCase, image_format, images_equal
from vmsnap.errors import NotFoundError, TransferError, UnsupportedError, UsageError
from vmsnap.files import allocated_bytes
from vmsnap.image.digest import guest_sha256
from vmsnap.lab.qemu import qemu_io
from vmsnap.model import Disk, ExportSource, TransferStats


class ProgressLog:
    """A Progress callback that records its calls and checks they make sense."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self) -> None:
        assert self.calls, "progress was never called"
        done_values = [done for done, _ in self.calls]
        assert done_values == sorted(done_values), self.calls
        assert all(0 <= done <= total for done, total in self.calls), self.calls
        assert self.calls[-1][0] == self.calls[-1][1] > 0, self.calls


class TransportContract:
    """Subclasses set ``transport_name`` and may override :meth:`make` and :meth:`target`."""

    transport_name: ClassVar[str]

    def make(self, **options: Any) -> Any:
        """A transport instance (through the registry, as the orchestrator makes them)."""
        from vmsnap.transports import transport_class

        return transport_class(self.transport_name)(**options)

    def target(self, path: Path) -> Path | str:
        """What to pass as ``target`` for a local ``path`` (remote variants return ``host:path``)."""
        return path

    def test_is_registered_and_accepts_every_kind(self, source_case: SourceCase) -> None:
        transport = self.make()
        assert transport.name == self.transport_name
        assert transport.accepts(source_case.source)

    def test_send_reproduces_the_guest_content(self, source_case: SourceCase, tmp_path: Path) -> None:
        out = tmp_path / "out"
        out.mkdir()
        target = out / "disk0.qcow2"
        progress = ProgressLog()
        stats = self.make().send(source_case.source, self.target(target), progress=progress)
        assert isinstance(stats, TransferStats)
        assert stats.format == "qcow2" and image_format(target) == "qcow2"
        assert images_equal(target, source_case.reference)
        assert guest_sha256(target, "qcow2") == guest_sha256(
            source_case.reference, image_format(source_case.reference)
        )
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert allocated_bytes(target) < SIZE // 4, "holes were filled"
        assert 0 < stats.bytes_written < SIZE // 4
        assert sorted(os.listdir(out)) == ["disk0.qcow2"], "temporary files left behind"
        progress.check()

    @pytest.mark.parametrize("kind", ["qcow2", "raw"])
    def test_raw_output(self, kind: str, case_factory: CaseFactory, tmp_path: Path) -> None:
        case = case_factory(kind)
        target = tmp_path / "disk0.raw"
        stats = self.make(output_format="raw").send(case.source, self.target(target), progress=ProgressLog())
        assert stats.format == "raw" and image_format(target) == "raw"
        assert target.stat().st_size == SIZE
        assert images_equal(target, case.reference)
        assert allocated_bytes(target) < SIZE // 4, "holes were filled"

    @pytest.mark.parametrize("kind", ["qcow2", "nbd"])
    def test_missing_source(self, kind: str, case_factory: CaseFactory, tmp_path: Path) -> None:
        source = case_factory(kind).source
        if kind == "nbd":
            gone = attrs.evolve(source, location=f"nbd+unix:///exp?socket={tmp_path / 'no-such.sock'}")
        else:
            gone = attrs.evolve(source, location=str(tmp_path / "no-such.img"))
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(NotFoundError, match="does not exist") as info:
            self.make().send(gone, self.target(out / "disk0.qcow2"), progress=ProgressLog())
        assert "\n" not in str(info.value)
        assert os.listdir(out) == [], "a partial target was left behind"

    def test_missing_target_directory(self, case_factory: CaseFactory, tmp_path: Path) -> None:
        target = tmp_path / "nowhere" / "out.qcow2"
        with pytest.raises(NotFoundError, match="does not exist"):
            self.make().send(case_factory("qcow2").source, self.target(target), progress=ProgressLog())
        assert not target.parent.exists()

    @pytest.mark.parametrize("kind", ["qcow2", "nbd"])
    def test_full_target_leaves_nothing(self, kind: str, case_factory: CaseFactory, full_dir: Path) -> None:
        source = case_factory(kind).source
        with pytest.raises(TransferError, match="full") as info:
            self.make().send(source, self.target(full_dir / "out.qcow2"), progress=ProgressLog())
        assert "\n" not in str(info.value)
        assert os.listdir(full_dir) == [], "a partial target was left behind"

    def test_incrementals_are_for_nbd_only(self, case_factory: CaseFactory, tmp_path: Path) -> None:
        source = attrs.evolve(case_factory("qcow2").source, dirty_bitmap="qemu:dirty-bitmap:b0")
        transport = self.make()
        if self.transport_name == "nbd":
            assert transport.accepts(source)
            return
        assert not transport.accepts(source)
        with pytest.raises(UnsupportedError, match="nbd transport"):
            transport.send(source, self.target(tmp_path / "x.qcow2"), progress=ProgressLog())
        with pytest.raises(UnsupportedError, match="full copies only"):
            transport.send(source, tmp_path / "x.qcow2", progress=ProgressLog(), backing=tmp_path / "p.qcow2")
        assert not (tmp_path / "x.qcow2").exists()

    def test_image_held_by_a_running_vm(self, two_disk_vm: RunningVm, tmp_path: Path) -> None:
        """Without force_share a clear lock error and nothing written; with it, the flushed guest data."""
        vm = two_disk_vm
        qmp = vm.machine.qmp()
        qemu_io(qmp, "disk1", "write -P 0x5a 1M 2M")
        qemu_io(qmp, "disk1", "flush")  # a reader of the file sees guest writes only after a flush
        image = vm.images["disk1"]
        disk = Disk("disk1", "fmt-disk1", image, "qcow2", SIZE)
        out = tmp_path / "out"
        out.mkdir()
        locked = ExportSource("file", str(image), "qcow2", disk, SIZE)
        with pytest.raises(TransferError, match="lock") as info:
            self.make().send(locked, self.target(out / "locked.qcow2"), progress=ProgressLog())
        assert "\n" not in str(info.value)
        assert os.listdir(out) == []

        shared = attrs.evolve(locked, force_share=True)
        target = out / "disk1.qcow2"
        self.make().send(shared, self.target(target), progress=ProgressLog())
        assert guest_sha256(target, "qcow2") == guest_sha256(image, "qcow2", force_share=True)
        read = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 2M", "-c", "read -P 0 0 1M", str(target)],
            capture_output=True,
            text=True,
        ).stdout
        assert "verification failed" not in read and read.count("read ") == 2, read
        assert vm.process.alive()

    def test_unknown_option(self) -> None:
        with pytest.raises(UsageError, match="no option"):
            self.make(no_such_option=1)
