"""The CLI with ``--domain NAME --connect URI``: backup (full, then incremental) → restore → compare bytes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_helpers import qcow2_repo
from tests.integration.libvirt.conftest import Libvirtd, LibvirtTestDomain, assert_identical, reference_image
from vmsnap.errors import UsageError
from vmsnap.vm.libvirt.definition import define_restored_domain, saved_domain_xml
from vmsnap.vm.libvirt.machine import LibvirtMachine

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).parents[3]


def vmsnap(*args: str) -> dict[str, Any]:
    """Run the CLI with ``--json``; fail with its stderr when it does not exit 0."""
    result = subprocess.run(
        [str(ROOT / ".venv/bin/vmsnap"), *args, "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_backup_incremental_restore_through_the_cli_with_domain(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    repo = qcow2_repo(tmp_path / "repo")
    vm = ["--domain", domain.name, "--connect", domain.uri]
    domain.write("vda", 0x61, 0, 2)
    domain.write("sdb", 0x62, 3)
    full = vmsnap("backup", "--repo", str(repo), *vm)
    assert full["vm"] == domain.name and full["kind"] == "full"
    assert sorted(d["name"] for d in full["disks"]) == ["sdb", "vda"]
    domain.write("vda", 0x63, 10)
    inc = vmsnap("backup", "--repo", str(repo), *vm, "--incremental")
    assert inc["kind"] == "incremental"
    domain.write("vda", 0x64, 20)  # after the last backup: must not come back
    # libvirt still sees the domain as it defined it
    assert domain.domblklist() == {"vda": str(domain.images["vda"]), "sdb": str(domain.images["sdb"])}
    out = tmp_path / "restored"
    vmsnap("restore", "--repo", str(repo), "--vm", domain.name, "--to", str(out))
    expected = {"vda": [(0x61, 0, 2), (0x63, 10, 1)], "sdb": [(0x62, 3, 1)]}
    for name, writes in expected.items():
        assert_identical(out / f"{name}.qcow2", reference_image(tmp_path / f"ref-{name}", writes))
    first = tmp_path / "first"
    vmsnap(
        "restore", "--repo", str(repo), "--vm", domain.name, "--backup", full["backup_id"], "--to", str(first)
    )
    assert_identical(first / "vda.qcow2", reference_image(tmp_path / "ref-first", [(0x61, 0, 2)]))


@pytest.mark.parametrize("strategy", ["internal", "external"])
def test_full_backup_with_snapshot_strategies_through_the_cli(
    domain: LibvirtTestDomain, tmp_path: Path, strategy: str
) -> None:
    repo = qcow2_repo(tmp_path / "repo")
    domain.write("vda", 0x71, 5)
    vmsnap(
        "backup",
        "--repo",
        str(repo),
        "--domain",
        domain.name,
        "--connect",
        domain.uri,
        "--strategy",
        strategy,
    )
    domain.write("vda", 0x72, 6)
    assert domain.domblklist() == {"vda": str(domain.images["vda"]), "sdb": str(domain.images["sdb"])}
    out = tmp_path / "restored"
    vmsnap("restore", "--repo", str(repo), "--vm", domain.name, "--to", str(out))
    assert_identical(out / "vda.qcow2", reference_image(tmp_path / "ref", [(0x71, 5, 1)]))
    assert_identical(out / "sdb.qcow2", reference_image(tmp_path / "empty", []))


@pytest.mark.parametrize(("strategy", "transport"), [("external", "copy"), ("backup", "nbd")])
def test_recover_after_a_killed_backup_leaves_nothing_libvirt_does_not_know(
    domain: LibvirtTestDomain, tmp_path: Path, strategy: str, transport: str
) -> None:
    repo = qcow2_repo(tmp_path / "repo")
    vm = ["--domain", domain.name, "--connect", domain.uri]
    domain.write("vda", 0x81, 0)
    killed = subprocess.run(
        [
            str(ROOT / ".venv/bin/vmsnap"),
            "backup",
            "--repo",
            str(repo),
            *vm,
            "--strategy",
            strategy,
            "--transport",
            transport,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "VMSNAP_TEST_CRASH_AT": "after-create"},
    )
    assert killed.returncode == -9, killed.stderr
    domain.write("vda", 0x82, 1)
    vmsnap("recover", "--repo", str(repo), *vm)
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        qmp = machine.qmp()
        assert all(name.startswith("libvirt-") for name in qmp.node_names()), qmp.node_names()
        assert qmp.query_jobs() == []
        assert all(d.backing_chain == () for d in machine.disks())
    assert domain.domblklist() == {"vda": str(domain.images["vda"]), "sdb": str(domain.images["sdb"])}
    domain.qemu_io("vda", "flush")
    assert_identical(domain.images["vda"], reference_image(tmp_path / "ref", [(0x81, 0, 1), (0x82, 1, 1)]))
    # and the next backup works
    vmsnap("backup", "--repo", str(repo), *vm, "--strategy", strategy, "--transport", transport)


def test_a_restored_backup_can_be_defined_as_a_new_domain_from_the_saved_xml(
    domain: LibvirtTestDomain, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    import libvirt

    repo, out = qcow2_repo(tmp_path / "repo"), tmp_path / "restored"
    domain.write("vda", 0x91, 7)
    domain.write("sdb", 0x92, 9)
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        saved = saved_domain_xml(machine)
    vmsnap("backup", "--repo", str(repo), "--domain", domain.name, "--connect", domain.uri)
    vmsnap("restore", "--repo", str(repo), "--vm", domain.name, "--to", str(out))
    images = {"vda": out / "vda.qcow2", "sdb": out / "sdb.qcow2"}
    with pytest.raises(UsageError, match="sdb"):
        define_restored_domain(domain.uri, saved, name="vmsnap-t-never", images={"vda": images["vda"]})
    with pytest.raises(UsageError, match="exists already"):
        define_restored_domain(domain.uri, saved, name=domain.name, images=images)
    clone = libvirtd.new_domain_name()
    define_restored_domain(domain.uri, saved, name=clone, images=images)
    conn = libvirt.open(domain.uri)
    dom = conn.lookupByName(clone)
    try:
        assert dom.UUIDString() != domain.dom.UUIDString()
        dom.create()  # runs beside the original: nothing shared
        with LibvirtMachine(clone, uri=domain.uri) as restored:
            assert restored.block_targets() == {name: str(path) for name, path in images.items()}
            for disk in restored.disks():
                restored.qmp().hmp(f'qemu-io -d {disk.qdev} "flush"')
        assert domain.dom.isActive()
        assert_identical(images["vda"], reference_image(tmp_path / "ref-vda", [(0x91, 7, 1)]))
        assert_identical(images["sdb"], reference_image(tmp_path / "ref-sdb", [(0x92, 9, 1)]))
    finally:
        libvirtd.reaper.remove(conn, dom)


def test_restore_define_redefines_the_domain_through_the_cli(
    domain: LibvirtTestDomain, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    import libvirt

    repo, out = qcow2_repo(tmp_path / "repo"), tmp_path / "restored"
    domain.write("vda", 0x95, 5)
    full = vmsnap("backup", "--repo", str(repo), "--domain", domain.name, "--connect", domain.uri)
    saved = repo / domain.name / full["backup_id"] / "domain.xml"
    assert saved.stat().st_mode & 0o777 == 0o600
    clone = libvirtd.new_domain_name()
    restored = vmsnap(
        "restore", "--repo", str(repo), "--vm", domain.name, "--to", str(out), "--define", clone,
        "--connect", domain.uri,
    )  # fmt: skip
    assert restored["defined"] == clone
    conn = libvirt.open(domain.uri)
    dom = conn.lookupByName(clone)
    try:
        assert not dom.isActive()  # defined, not started
        with LibvirtMachine(clone, uri=domain.uri) as machine:
            assert {d.name: str(d.file) for d in machine.disks()} == {
                "vda": str(out / "vda.qcow2"),
                "sdb": str(out / "sdb.qcow2"),
            }
        assert_identical(out / "vda.qcow2", reference_image(tmp_path / "ref-vda", [(0x95, 5, 1)]))
    finally:
        libvirtd.reaper.remove(conn, dom)
    # the original's name is taken: one clear line, exit 2, refused before anything is written
    again = tmp_path / "again"
    argv = [str(ROOT / ".venv/bin/vmsnap"), "restore", "--repo", str(repo), "--vm", domain.name]
    argv += ["--to", str(again), "--define", domain.name, "--connect", domain.uri]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "exists already" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not again.exists()
    # a damaged saved definition: one line, exit 1, found before any image is written
    saved.write_text(saved.read_text()[: len(saved.read_text()) // 2])
    fresh = libvirtd.new_domain_name()
    argv = [str(ROOT / ".venv/bin/vmsnap"), "restore", "--repo", str(repo), "--vm", domain.name]
    argv += ["--to", str(again), "--define", fresh, "--connect", domain.uri, "--json"]
    damaged = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert damaged.returncode == 1, damaged.stderr
    (line,) = damaged.stderr.strip().splitlines()
    assert line.startswith(f"vmsnap: error: the libvirt definition saved with backup {full['backup_id']}")
    assert "is not well-formed XML" in line
    assert json.loads(damaged.stdout)["error"]["exit_status"] == 1
    assert not again.exists()
    check = libvirt.open(domain.uri)
    try:
        assert fresh not in {d.name() for d in check.listAllDomains()}
    finally:
        check.close()
