"""The shared strategy contract run on a libvirt domain: strategies see a LibvirtMachine (QMP through libvirt
passthrough when running, the domain's images when shut off) and must leave libvirt's view unchanged."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_image
from tests.integration.libvirt.conftest import Libvirtd, domain_xml
from tests.integration.strategies.contract import (
    Lab,
    StrategyContract,
    compare_images,
    images_differ,
    read_export,
    run,
)
from vmsnap.strategies import strategy_class
from vmsnap.strategies.base import Strategy
from vmsnap.vm.libvirt.machine import LibvirtMachine
from vmsnap.vm.machine import Machine, find_disk

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.filterwarnings("ignore::vmsnap.strategies.internal.LazyRefcountsWarning"),
]


class LibvirtLab(Lab):
    """Two qcow2 disks (vda virtio-blk, sdb virtio-scsi) of a libvirt domain, running or shut off."""

    def __init__(self, libvirtd: Libvirtd, workdir: Path, *, online: bool) -> None:
        import libvirt

        self.libvirtd = libvirtd
        self.workdir = workdir
        self.online = online
        self.disk_names = ("vda", "sdb")
        self.images = {name: make_image(workdir / f"{name}.qcow2") for name in self.disk_names}
        self.uri = libvirtd.uri
        self.name = libvirtd.new_domain_name()
        self.conn = libvirt.open(self.uri)
        self.dom: Any = None
        self.dom = self.conn.defineXML(domain_xml(self.name, self.images))
        if online:
            self.dom.create()
        self.machine: Machine = LibvirtMachine(self.name, uri=self.uri)

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        command = f"write -P {pattern:#x} {offset} {length}"
        if self.is_running():
            qdev = find_disk(self.machine.disks(), disk).qdev
            self.machine.qmp().hmp(f'qemu-io -d {qdev} "{command}"')
        else:
            out = run(
                ["qemu-io", "-f", "qcow2", "-c", command, str(find_disk(self.machine.disks(), disk).file)]
            )
            assert "error" not in out.stdout.lower(), out.stdout

    def capture(self, disk: str, dest: Path) -> Path:
        d = find_disk(self.machine.disks(), disk)
        if self.is_running():
            # QEMU caches qcow2 metadata: flush so a reader of the files sees every write
            self.machine.qmp().hmp(f'qemu-io -d {d.qdev} "flush"')
        run(["qemu-img", "convert", "-U", "-f", d.format, str(d.file), "-O", "qcow2", str(dest)])
        return dest

    def is_running(self) -> bool:
        return bool(self.dom.isActive())

    def power_off(self) -> Machine:
        if self.dom.isActive():
            self.dom.destroy()  # SIGTERM: QEMU flushes its images as it exits
        return self.machine

    def domblklist(self) -> dict[str, str]:
        """What libvirt believes each disk's active source is."""
        assert isinstance(self.machine, LibvirtMachine)
        return self.machine.block_targets()

    def close(self) -> None:
        self.machine.close()
        if self.dom is not None:
            self.libvirtd.reaper.remove(self.conn, self.dom)
        else:
            self.conn.close()


class LibvirtContract(StrategyContract):
    """The contract on a libvirt domain; afterwards libvirt must still see the domain's own images."""

    def check_libvirt_view(self, lab: LibvirtLab) -> None:
        """After a test: libvirt still sees the domain's own images (passthrough strategies)."""
        assert lab.domblklist() == {n: str(p) for n, p in lab.images.items()}, "libvirt's view changed"

    @pytest.fixture
    def lab(self, request: pytest.FixtureRequest, tmp_path: Path, libvirtd: Libvirtd) -> Iterator[Lab]:
        mode = str(request.param)  # the contract parametrizes it with the strategy's modes
        lab = LibvirtLab(libvirtd, tmp_path, online=mode == "online")
        try:
            yield lab
            self.check_libvirt_view(lab)
        finally:
            lab.close()


# the whole contract on libvirt takes minutes (a domain per test): run with `pytest -m slow`; the quick
# check below covers every strategy online in the default run


@pytest.mark.slow
class TestInternalOnLibvirt(LibvirtContract):
    strategy_name = "internal"


@pytest.mark.slow
class TestExternalOnLibvirt(LibvirtContract):
    strategy_name = "external"


@pytest.mark.slow
class TestBackupOnLibvirt(LibvirtContract):
    """Push mode (QEMU writes the targets) through passthrough. Pull mode needs a running VM and has no
    target to roll back from, so the quick check below covers it (create, export, delete)."""

    strategy_name = "backup"
    several_snapshots = False  # a second backup of a disk is refused while the first target exists

    @pytest.fixture(autouse=True)
    def _targets(self, tmp_path: Path) -> None:
        self.options = {"target_dir": tmp_path / "targets", "mode": "push"}

    def strategy_options(self) -> Mapping[str, Any]:
        return self.options


def test_the_lab_writes_what_it_is_told(libvirtd: Libvirtd, tmp_path: Path) -> None:
    lab = LibvirtLab(libvirtd, tmp_path, online=True)
    try:
        lab.write("sdb", 4096, 8192, 0x3C)
        copy = lab.capture("sdb", tmp_path / "copy.qcow2")
        check = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x3c 4096 8192", str(copy)],
            capture_output=True,
            text=True,
        )
        assert "Pattern verification failed" not in check.stdout and "read 8192/8192" in check.stdout
    finally:
        lab.close()


@pytest.mark.parametrize(
    ("strategy_name", "options"),
    [
        ("internal", {}),
        ("external", {}),
        ("backup", {"mode": "push"}),
        ("backup", {"mode": "pull"}),
    ],
)
def test_each_strategy_snapshots_exports_and_deletes_on_a_running_domain(
    libvirtd: Libvirtd, tmp_path: Path, strategy_name: str, options: dict[str, Any]
) -> None:
    lab = LibvirtLab(libvirtd, tmp_path, online=True)
    try:
        if strategy_name == "backup":
            options = {**options, "target_dir": tmp_path / "targets"}
        strategy: Strategy = strategy_class(strategy_name)(lab.machine, **options)
        contract = StrategyContract()
        contract.first_patterns(lab)
        at_create = {d: lab.capture(d, tmp_path / f"at-create-{d}.qcow2") for d in lab.disk_names}
        refs = strategy.create(lab.disks(), name="snap1")
        contract.second_patterns(lab)
        after = {d: lab.capture(d, tmp_path / f"after-{d}.qcow2") for d in lab.disk_names}
        for ref in refs:
            with strategy.export(ref) as source:
                compare_images(
                    read_export(source, tmp_path / f"export-{ref.disk.name}.qcow2"), at_create[ref.disk.name]
                )
        for ref in refs:
            strategy.delete(ref)
        for disk in lab.disk_names:
            assert images_differ(at_create[disk], after[disk])
            compare_images(lab.capture(disk, tmp_path / f"now-{disk}.qcow2"), after[disk])
        assert lab.domblklist() == {n: str(p) for n, p in lab.images.items()}
        assert lab.is_running()
        qmp = lab.machine.qmp()
        assert all(name.startswith("libvirt-") for name in qmp.node_names()), qmp.node_names()
        assert qmp.query_jobs() == []
    finally:
        lab.close()
