"""The lab libvirtd: qemu.conf settings, the domain XML, and one real start (or reuse) and stop."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import make_image
from vmsnap.errors import LibvirtError
from vmsnap.lab.libvirtd import (
    Libvirtd,
    define_domain,
    domain_xml,
    ensure_qemu_conf,
    remove_domain,
    stop_domain_qemu,
)
from vmsnap.processes import alive


def test_qemu_conf_gets_only_the_missing_settings(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "qemu"\nuser = "root"\n')
    added = ensure_qemu_conf(conf, {"user": '"root"', "security_driver": '"none"'})
    assert added == ['security_driver = "none"']
    assert ensure_qemu_conf(conf, {"user": '"root"', "security_driver": '"none"'}) == []


def test_qemu_conf_with_another_value_is_left_alone_and_refused(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('security_driver = "apparmor"\n')
    with pytest.raises(LibvirtError, match="security_driver"):
        ensure_qemu_conf(conf, {"security_driver": '"none"'})
    assert conf.read_text() == 'security_driver = "apparmor"\n'


def test_domain_xml_puts_vd_on_virtio_and_sd_on_scsi(tmp_path: Path) -> None:
    root = ET.fromstring(
        domain_xml(
            "d1", {"vda": tmp_path / "a b.qcow2", "sdb": tmp_path / "b.qcow2"}, agent_socket=tmp_path / "s"
        )
    )
    targets = {t.get("dev"): t.get("bus") for t in root.iter("target") if t.get("dev")}
    assert targets == {"vda": "virtio", "sdb": "scsi"}
    assert [s.get("file") for s in root.iter("source") if s.get("file")] == [
        str(tmp_path / "a b.qcow2"),
        str(tmp_path / "b.qcow2"),
    ]
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]


def test_stop_domain_qemu_signals_nothing_it_cannot_prove_is_that_domain(tmp_path: Path) -> None:
    (tmp_path / "d1.pid").write_text(str(os.getpid()))  # this pytest process: not a QEMU for d1
    assert not stop_domain_qemu("d1", run_dir=tmp_path)
    assert not stop_domain_qemu("absent", run_dir=tmp_path)


@pytest.mark.libvirt
def test_libvirtd_starts_runs_a_domain_and_stops_exactly_its_pids(tmp_path: Path) -> None:
    # a skip would hide that the lab libvirtd is untested: missing parts fail, naming what to install
    if importlib.util.find_spec("libvirt") is None:
        pytest.fail("python3-libvirt is not installed (scripts/packages.d/libvirt.txt); or -m 'not libvirt'")
    if not (shutil.which("libvirtd") or os.path.exists("/usr/sbin/libvirtd")):
        pytest.fail("libvirtd is not installed (scripts/packages.d/libvirt.txt); or -m 'not libvirt'")
    if os.geteuid() != 0:
        pytest.fail("a lab libvirtd runs in system mode: run the tests as root, or -m 'not libvirt'")
    image = make_image(tmp_path / "vda.qcow2")
    name = f"vmsnap-t-lv-{secrets.token_hex(3)}"
    with Libvirtd() as daemon:
        assert daemon.ours
        pids = daemon.pids
        workdir = daemon.workdir
        conn = daemon.open()
        try:
            dom = define_domain(conn, name, {"vda": image})
            try:
                dom.create()
                assert dom.isActive()
                # its state and definition live in private directories, not the host's
                assert (daemon.qemu_run_dir / f"{name}.pid").exists()
                assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()
                assert not Path(f"/etc/libvirt/qemu/{name}.xml").exists()
            finally:
                remove_domain(dom)
            assert name not in [d.name() for d in conn.listAllDomains(0)]
        finally:
            conn.close()
    # exactly the daemons it started (virtlogd, libvirtd, the namespace holder) are gone, and its temp dir
    assert len(pids) == 3 and daemon.pids == []
    assert not any(alive(pid) for pid in pids)
    assert workdir is not None and not workdir.exists()
