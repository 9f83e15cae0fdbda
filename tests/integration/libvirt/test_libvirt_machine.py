"""LibvirtMachine against a real libvirtd: disks from the domain XML, QMP and block jobs through passthrough,
offline domains through their images, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.libvirt.conftest import (
    Libvirtd,
    LibvirtTestDomain,
    domain_xml,
    images_identical,
    reference_image,
)
from vmsnap.errors import (
    AgentNotRespondingError,
    LibvirtError,
    NotFoundError,
    QMPCommandError,
    UnsupportedError,
    VmsnapError,
)
from vmsnap.vm.libvirt.machine import LibvirtMachine
from vmsnap.vm.machine import Machine

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024


def test_disks_come_from_the_domain_xml_joined_with_qmp(domain: LibvirtTestDomain) -> None:
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        assert isinstance(machine, Machine)
        assert machine.name == domain.name
        assert machine.is_running
        disks = machine.disks()
        assert [d.name for d in disks] == ["vda", "sdb"]
        assert [d.file for d in disks] == [domain.images["vda"], domain.images["sdb"]]
        assert all(d.format == "qcow2" and d.virtual_size == 64 * MiB for d in disks)
        node_names = machine.qmp().node_names()
        assert all(d.node_name in node_names and d.file_node in node_names for d in disks)
        assert disks[0].qdev is not None and "virtio-disk0" in disks[0].qdev
        assert machine.agent() is None  # no agent channel in this domain


def test_qmp_passthrough_runs_commands_and_reports_qemu_errors(domain: LibvirtTestDomain) -> None:
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        qmp = machine.qmp()
        assert qmp.status() == "running"
        qmp.stop()
        assert qmp.status() == "paused"
        qmp.cont()
        assert qmp.status() == "running"
        with pytest.raises(QMPCommandError) as caught:
            qmp.blockdev_del("no-such-node")
        assert caught.value.error_class == "GenericError"
        assert "\n" not in str(caught.value)


def test_a_block_job_started_through_passthrough_is_waited_for_and_copies_the_data(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    domain.write("vda", 0x5A, 4, 2)
    target = make_image(tmp_path / "copy.qcow2")
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        qmp = machine.qmp()
        vda = machine.disks()[0]
        qmp.blockdev_add(
            {
                "driver": "qcow2",
                "node-name": "vmsnap-copy",
                "file": {"driver": "file", "filename": str(target)},
            }
        )
        try:
            qmp.run_job(
                "blockdev-backup",
                {"device": vda.node_name, "target": "vmsnap-copy", "sync": "full"},
                job_id="vmsnap-job",
                timeout=120,
            )
        finally:
            qmp.blockdev_del("vmsnap-copy")
        assert qmp.query_jobs() == []
        assert all(name.startswith("libvirt-") for name in qmp.node_names())  # nothing of ours is left
    assert domain.domblklist() == {"vda": str(domain.images["vda"]), "sdb": str(domain.images["sdb"])}
    expected = reference_image(tmp_path / "expected.qcow2", [(0x5A, 4, 2)])
    assert images_identical(target, expected)
    assert not images_identical(target, make_image(tmp_path / "empty.qcow2"))


def test_a_shut_off_domain_is_read_through_its_images(domain: LibvirtTestDomain) -> None:
    domain.write("sdb", 0x11, 0)
    domain.dom.destroy()
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        assert not machine.is_running
        disks = machine.disks()
        assert [(d.name, d.file, d.node_name, d.virtual_size) for d in disks] == [
            ("vda", domain.images["vda"], "", 64 * MiB),
            ("sdb", domain.images["sdb"], "", 64 * MiB),
        ]
        assert machine.agent() is None
        with pytest.raises(UnsupportedError, match="not running"):
            machine.qmp()


def test_an_unknown_domain_is_a_one_line_not_found_error(libvirtd: Libvirtd) -> None:
    with pytest.raises(NotFoundError) as caught:
        LibvirtMachine("vmsnap-no-such-domain", uri=libvirtd.uri)
    message = str(caught.value)
    assert "vmsnap-no-such-domain" in message and "virsh" in message and "\n" not in message


def test_libvirtd_down_and_a_refused_uri_are_one_line_libvirt_errors(tmp_path: Path) -> None:
    with pytest.raises(LibvirtError) as down:
        LibvirtMachine("any", uri=f"qemu:///system?socket={tmp_path}/no-libvirtd-here")
    assert "cannot connect to libvirt" in str(down.value) and "\n" not in str(down.value)
    with pytest.raises(LibvirtError) as refused:
        LibvirtMachine("any", uri="qemu+tcp://127.0.0.1:1/system")
    assert "127.0.0.1:1" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(VmsnapError):
        LibvirtMachine("any", uri="no-such-driver:///x")


@pytest.mark.parametrize(
    ("connect", "expected"),
    [
        (None, "no libvirt domain 'vmsnap-missing'"),
        ("qemu+tcp://127.0.0.1:1/system", "cannot connect to libvirt at qemu+tcp://127.0.0.1:1/system"),
        ("qemu:///system?socket=/nonexistent/libvirt-sock", "cannot connect to libvirt"),
    ],
)
def test_cli_reports_bad_domains_and_connections_in_one_line(
    libvirtd: Libvirtd, connect: str | None, expected: str
) -> None:
    uri = connect or libvirtd.uri
    for argv in (
        ["agent", "--domain", "vmsnap-missing", "--connect", uri, "guest-ping"],
        ["backup", "--repo", "/nonexistent/repo", "--domain", "vmsnap-missing", "--connect", uri],
    ):
        result = subprocess.run(
            [".venv/bin/vmsnap", *argv], capture_output=True, text=True, cwd=Path(__file__).parents[3]
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr


def test_an_agent_channel_without_an_agent_is_a_clear_not_responding_error(
    libvirtd: Libvirtd, tmp_path: Path
) -> None:
    import libvirt

    name = libvirtd.new_domain_name()
    images = {"vda": make_image(tmp_path / "vda.qcow2")}
    conn = libvirt.open(libvirtd.uri)
    dom = conn.defineXML(domain_xml(name, images, agent_socket=tmp_path / "qga.sock"))
    try:
        dom.create()
        with LibvirtMachine(name, uri=libvirtd.uri) as machine:
            assert machine.has_agent_channel()
            agent = machine.agent()
            assert agent is not None
            with pytest.raises(AgentNotRespondingError) as caught:
                agent.ping(timeout=2)
            assert "not connected" in str(caught.value) and "\n" not in str(caught.value)
            assert not agent.is_responding(timeout=2)
        result = subprocess.run(
            [".venv/bin/vmsnap", "agent", "--domain", name, "--connect", libvirtd.uri, "guest-ping"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[3],
        )
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        libvirtd.reaper.remove(conn, dom)
