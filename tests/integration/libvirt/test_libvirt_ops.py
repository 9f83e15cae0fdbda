"""libvirt-native operations on a real domain, checked on data: external snapshot + blockcommit, internal
snapshots, push and pull backups with checkpoints (full + incremental, restored and compared), recover."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.libvirt.conftest import (
    LibvirtTestDomain,
    assert_identical,
    images_identical,
    reference_image,
)
from vmsnap.errors import NotFoundError, SnapshotError, UnsupportedError, UsageError
from vmsnap.model import no_progress
from vmsnap.transports.nbd import NbdTransport
from vmsnap.vm.libvirt.backups import backup_pull, backup_push, checkpoints, link_incremental, recover
from vmsnap.vm.libvirt.machine import LibvirtMachine
from vmsnap.vm.libvirt.snapshots import (
    commit_external_snapshot,
    create_external_snapshot,
    create_internal_snapshot,
    delete_snapshot,
    external_snapshot_source,
    internal_snapshot_source,
    revert_snapshot,
    rollback_external_snapshot,
    snapshots,
)

pytestmark = pytest.mark.libvirt


def _convert(source: str | Path, target: Path, *opts: str) -> Path:
    """A standalone qcow2 copy of ``source`` (read shared, as a running QEMU holds it)."""
    subprocess.run(["qemu-img", "convert", "-U", *opts, "-O", "qcow2", str(source), str(target)], check=True)
    return target


MiB = 1024 * 1024


def _own_data(image: Path) -> int:
    """Bytes of data stored in ``image`` itself (not in its backing files)."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


def test_external_snapshot_freezes_the_base_and_blockcommit_pivots_back(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    domain.write("vda", 0xA1, 0)
    domain.write("sdb", 0xB1, 1)
    original = domain.domblklist()
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        snaps = create_external_snapshot(machine, "s1")
        assert [s.disk.name for s in snaps] == ["vda", "sdb"]
        assert domain.domblklist() == {s.disk.name: s.location for s in snaps}
        assert snapshots(machine) == ["s1"]
        # the guest keeps writing into the overlays; the bases hold the snapshot instant
        domain.write("vda", 0xA2, 8)
        copies = {
            s.disk.name: _convert(external_snapshot_source(s).location, tmp_path / s.disk.name) for s in snaps
        }
        with pytest.raises(SnapshotError, match="already exists"):
            create_external_snapshot(machine, "s1")
        in_the_way = Path(snaps[0].location).with_suffix(".s2.qcow2")
        in_the_way.write_bytes(b"not ours")
        with pytest.raises(SnapshotError, match=f"overlay {in_the_way} already exists"):
            create_external_snapshot(machine, "s2")
        assert in_the_way.read_bytes() == b"not ours" and snapshots(machine) == ["s1"]
        commit_external_snapshot(machine, "s1")
        assert snapshots(machine) == []
        assert all(name.startswith("libvirt-") for name in machine.qmp().node_names())
        assert all(d.backing_chain == () for d in machine.disks())
    assert domain.domblklist() == original
    assert not any(Path(s.location).exists() for s in snaps)
    assert images_identical(copies["vda"], reference_image(tmp_path / "ref-vda0", [(0xA1, 0, 1)]))
    assert images_identical(copies["sdb"], reference_image(tmp_path / "ref-sdb0", [(0xB1, 1, 1)]))
    domain.qemu_io("vda", "flush")
    after = reference_image(tmp_path / "ref-vda1", [(0xA1, 0, 1), (0xA2, 8, 1)])
    assert images_identical(domain.images["vda"], after)  # the overlay's write was committed


def test_internal_snapshot_export_revert_and_delete(domain: LibvirtTestDomain, tmp_path: Path) -> None:
    domain.write("vda", 0xC1, 2)
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        snaps = create_internal_snapshot(machine, "i1")
        domain.write("vda", 0xC2, 2)
        source = internal_snapshot_source(snaps[0])
        exported = _convert(
            source.location,
            tmp_path / "exported.qcow2",
            "-l",
            f"snapshot.name={source.image_opts['snapshot.name']}",
        )
        before = reference_image(tmp_path / "ref-before", [(0xC1, 2, 1)])
        assert images_identical(exported, before)
        revert_snapshot(machine, "i1")
        assert machine.is_running
        domain.qemu_io("vda", "flush")
        assert images_identical(domain.images["vda"], before)
        delete_snapshot(machine, "i1")
        assert snapshots(machine) == []
        with pytest.raises(NotFoundError, match="i1"):
            delete_snapshot(machine, "i1")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(domain.images["vda"])],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert "snapshots" not in info or info["snapshots"] == []


def test_push_backup_full_then_incremental_restores_byte_identical(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    full_dir, inc_dir = tmp_path / "full", tmp_path / "inc"
    full_dir.mkdir()
    inc_dir.mkdir()
    domain.write("vda", 0x31, 0, 2)
    domain.write("sdb", 0x32, 4)
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        with pytest.raises(NotFoundError, match="take a full backup first"):
            backup_push(machine, inc_dir, checkpoint="c0", incremental="missing")
        (full_dir / "sdb.qcow2").write_bytes(b"somebody else's")
        with pytest.raises(UsageError, match="already exist"):
            backup_push(machine, full_dir, checkpoint="c1")
        assert (full_dir / "sdb.qcow2").read_bytes() == b"somebody else's"
        assert checkpoints(machine) == []
        (full_dir / "sdb.qcow2").unlink()
        full = backup_push(machine, full_dir, checkpoint="c1")
        domain.write("vda", 0x33, 16)
        domain.write("sdb", 0x34, 32, 3)
        inc = backup_push(machine, inc_dir, checkpoint="c2", incremental="c1")
        assert checkpoints(machine) == ["c1", "c2"]
        for name in ("vda", "sdb"):
            link_incremental(machine, inc[name], full[name])
        domain.write("vda", 0x35, 40)  # after the backup: must not be in it
    changed = {"vda": 1 * MiB, "sdb": 3 * MiB}
    for name in ("vda", "sdb"):
        assert _own_data(inc[name]) == changed[name]  # the incremental holds exactly what changed
        restored = _convert(inc[name], tmp_path / f"restored-{name}.qcow2")
        expected = {
            "vda": [(0x31, 0, 2), (0x33, 16, 1)],
            "sdb": [(0x32, 4, 1), (0x34, 32, 3)],
        }[name]
        assert images_identical(restored, reference_image(tmp_path / f"ref-{name}", expected))
        assert not images_identical(full[name], restored)


def test_pull_backup_serves_nbd_with_a_dirty_bitmap_for_incrementals(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    domain.write("vda", 0x41, 0)
    transport = NbdTransport()
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        with backup_pull(machine, tmp_path / "nbd.sock", checkpoint="p1", disks=["vda"]) as sources:
            assert list(sources) == ["vda"] and sources["vda"].dirty_bitmap is None
            transport.send(sources["vda"], tmp_path / "full.qcow2", progress=no_progress)
        assert machine.domain.jobInfo()[0] == 0  # the job ended with the with-block
        domain.write("vda", 0x42, 20)
        with backup_pull(
            machine, tmp_path / "nbd.sock", checkpoint="p2", incremental="p1", disks=["vda"]
        ) as sources:
            assert sources["vda"].dirty_bitmap == "backup-vda"
            transport.send(
                sources["vda"], tmp_path / "inc.qcow2", progress=no_progress, backing=tmp_path / "full.qcow2"
            )
        domain.write("vda", 0x43, 30)
    assert images_identical(tmp_path / "full.qcow2", reference_image(tmp_path / "ref1", [(0x41, 0, 1)]))
    restored = _convert(tmp_path / "inc.qcow2", tmp_path / "restored.qcow2")
    assert images_identical(restored, reference_image(tmp_path / "ref2", [(0x41, 0, 1), (0x42, 20, 1)]))
    assert (tmp_path / "inc.qcow2").stat().st_size < 4 * 1024 * 1024


def test_recover_commits_a_left_over_snapshot_and_aborts_a_stale_backup_job(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    original = domain.domblklist()
    domain.write("vda", 0x51, 0)
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        create_external_snapshot(machine, "dead-run")
        domain.write("vda", 0x52, 1)
        create_external_snapshot(machine, "dead-run-2", disks=["vda"])
        domain.write("vda", 0x53, 2)
        # a run that died while serving a pull backup: the job is still there
        pull = backup_pull(machine, tmp_path / "nbd.sock", checkpoint="k1")
        pull.__enter__()
        assert machine.domain.jobInfo()[0] != 0
        done = recover(machine)
        assert len(done) == 3, done
        assert machine.domain.jobInfo()[0] == 0
        assert snapshots(machine) == []
        assert recover(machine) == []
    assert domain.domblklist() == original
    domain.qemu_io("vda", "flush")
    assert images_identical(
        domain.images["vda"], reference_image(tmp_path / "ref", [(0x51, 0, 1), (0x52, 1, 1), (0x53, 2, 1)])
    )
    assert not images_identical(domain.images["vda"], make_image(tmp_path / "empty.qcow2"))


def test_rollback_of_an_external_snapshot_drops_the_overlay_of_a_shut_off_domain(
    domain: LibvirtTestDomain, tmp_path: Path
) -> None:
    original = domain.domblklist()
    domain.write("vda", 0x61, 0)
    with LibvirtMachine(domain.name, uri=domain.uri) as machine:
        snaps = create_external_snapshot(machine, "r1")
        domain.write("vda", 0x62, 0)  # overwrites the snapshot's data in the overlay
        domain.write("sdb", 0x63, 5)
        with pytest.raises(UnsupportedError, match="shut off"):
            rollback_external_snapshot(machine, "r1")
        newer = create_external_snapshot(machine, "r2")
        domain.write("vda", 0x64, 2)
        domain.dom.destroy()
        assert machine.block_targets() == {s.disk.name: s.location for s in newer}  # the definition too
        with pytest.raises(SnapshotError, match="newer snapshots"):
            rollback_external_snapshot(machine, "r1")
        domain.dom.create()
        with pytest.raises(SnapshotError, match="newer snapshots"):
            commit_external_snapshot(machine, "r1")
        assert all(Path(s.location).exists() for s in snaps)
        domain.dom.destroy()
        rollback_external_snapshot(machine, "r2")
        assert machine.block_targets() == {s.disk.name: s.location for s in snaps}
        vda_at_r2 = _convert(snaps[0].location, tmp_path / "at-r2.qcow2")
        assert_identical(vda_at_r2, reference_image(tmp_path / "ref-r2", [(0x62, 0, 1)]))
        rollback_external_snapshot(machine, "r1")
        assert machine.block_targets() == original
        assert snapshots(machine) == []
        assert not any(Path(s.location).exists() for s in snaps)
        with pytest.raises(NotFoundError):
            rollback_external_snapshot(machine, "r1")
    assert_identical(domain.images["vda"], reference_image(tmp_path / "ref-vda", [(0x61, 0, 1)]))
    assert_identical(domain.images["sdb"], reference_image(tmp_path / "ref-sdb", []))
    domain.dom.create()  # and the domain runs on its own images again
    assert domain.domblklist() == original
