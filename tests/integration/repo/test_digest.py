"""The repository's digests against an independent computation (:mod:`tests.integration.digests`): for
full and incremental backups (push and pull) of a running VM whose disk ends in a short chunk, with writes
that straddle chunk boundaries, and for chains built by hand; damage to a ``.chunks`` file or an image caught
by verify (both readers) and restore."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import qcow2_repo
from tests.integration.digests import ODD_SIZE, PIECE, MiB, independent_chunks, independent_root
from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.errors import ChecksumMismatchError, RepositoryError
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.repo.manifest import DiskRecord, Manifest, utc_now_iso
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import QemuMachine


def check_backup_digests(repo: Repository, vm: str, backup_id: str, captured: Path, workdir: Path) -> None:
    """The manifest's sha256 and the stored .chunks equal the independent digest of what the guest held,
    and of the backup's own chain read raw."""
    manifest = repo.get(vm, backup_id)
    record = manifest.disks[0]
    directory = repo.backup_dir(vm, backup_id)
    expected = independent_chunks(captured, workdir)
    assert len(expected) == 3 and record.virtual_size == ODD_SIZE
    stored = (directory / record.chunks_file).read_bytes()
    assert [stored[i : i + 32] for i in range(0, len(stored), 32)] == expected
    assert record.sha256 == independent_root(expected)
    assert independent_chunks(directory / record.file, workdir) == expected
    assert manifest.digest == "sha256-4MiB-chunks"


@attrs.define
class OddVm:
    machine: QemuMachine
    process: QemuProcess
    image: Path
    workdir: Path

    def write(self, *commands: str) -> None:
        qmp = self.machine.qmp()
        for command in commands:
            qemu_io(qmp, "disk0", command)
        qemu_io(qmp, "disk0", "flush")

    def capture(self, name: str) -> Path:
        self.write()  # flush
        dest = self.workdir / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", str(self.image), str(dest)],
            check=True,
        )
        return dest


@pytest.fixture
def odd_vm(tmp_path: Path) -> Iterator[OddVm]:
    """A running QEMU (no OS) with one qcow2 disk whose size is not a multiple of 4 MiB."""
    image = make_image(tmp_path / "disk0.qcow2", size=str(ODD_SIZE))
    process = QemuProcess(tmp_path, [DriveSpec(image, "disk0")], name="oddvm").start()
    try:
        machine = QemuMachine(process.qmp_socket)
    except BaseException:
        process.kill()
        raise
    try:
        yield OddVm(machine, process, image, tmp_path)
    finally:
        machine.close()
        process.stop()
        process.kill()


@pytest.mark.parametrize("transport", ["none", "nbd"])  # push: QEMU writes the backup; pull: NBD
def test_full_and_incremental_digests_equal_an_independent_computation(
    odd_vm: OddVm, tmp_path: Path, transport: str
) -> None:
    repo_path = qcow2_repo(tmp_path / "repo")
    config = BackupConfig(repo=repo_path, strategy="backup", transport=transport, quiesce="off")
    odd_vm.write("write -P 0x11 1M 4M", f"write -P 0x12 {ODD_SIZE - 128 * 1024} 128k")
    moments = [odd_vm.capture("m0")]
    results = [Backup(odd_vm.machine, config).run()]
    assert results[0].kind == "full"
    # straddle the boundary of chunks 0 and 1, zero data inside chunk 1, change the short last chunk
    odd_vm.write(
        f"write -P 0x21 {PIECE - 4096} 8192",
        "write -z 4608k 64k",
        f"write -P 0x22 {ODD_SIZE - 4096} 4096",
    )
    moments.append(odd_vm.capture("m1"))
    results.append(Backup(odd_vm.machine, attrs.evolve(config, incremental=True)).run())
    # only the short last chunk: chunks 0 and 1 must come from the parent unchanged
    odd_vm.write(f"write -P 0x31 {8 * MiB + 512 * 1024} 1M", f"discard {ODD_SIZE - 64 * 1024} 64k")
    moments.append(odd_vm.capture("m2"))
    results.append(Backup(odd_vm.machine, attrs.evolve(config, incremental=True)).run())
    # the whole short last chunk reads as zeros again: its digest is the constant, not the parent's
    odd_vm.write(f"write -z {8 * MiB} {ODD_SIZE - 8 * MiB}")
    moments.append(odd_vm.capture("m3"))
    results.append(Backup(odd_vm.machine, attrs.evolve(config, incremental=True)).run())
    assert [r.kind for r in results] == ["full", *["incremental"] * 3], results[-1].notes
    repo = Repository.open(repo_path)
    for result, moment in zip(results, moments, strict=True):
        check_backup_digests(repo, "oddvm", result.backup_id, moment, tmp_path)
    zero_tail = hashlib.sha256(bytes(ODD_SIZE - 8 * MiB)).digest()
    assert independent_chunks(moments[-1], tmp_path)[2] == zero_tail
    assert repo.verify("oddvm", reader="qemu").ok
    assert repo.verify("oddvm", reader="libqcow").ok
    _, restored = repo.restore("oddvm", results[-1].backup_id, tmp_path / "out")
    assert independent_chunks(restored[0].path, tmp_path) == independent_chunks(moments[-1], tmp_path)


CHAIN_WRITES = (["write -P 0x41 0 6M"], [f"write -P 0x42 {PIECE - 512} 1k", "write -P 0x43 10M 64k"])


def _chain(
    tmp_path: Path, writes_per_backup: tuple[list[str], ...] = CHAIN_WRITES
) -> tuple[Repository, list[str]]:
    """A repository with a full backup and incrementals of one odd-sized disk (no VM: qemu-io writes)."""
    repo = Repository.open(tmp_path / "repo", create=True, layout="qcow2")
    ids: list[str] = []
    for writes in writes_per_backup:
        backup_id = repo.new_backup_id("vm1")
        staging = repo.stage("vm1", backup_id)
        image = staging / "disk0.qcow2"
        if ids:
            make_image(image, backing=Path(f"../{ids[-1]}/disk0.qcow2"))
        else:
            make_image(image, size=str(ODD_SIZE))
        argv = ["qemu-io", "-f", "qcow2"]
        for command in writes:
            argv += ["-c", command]
        subprocess.run([*argv, str(image)], check=True, capture_output=True, cwd=staging)
        parent = repo.get("vm1", ids[-1]) if ids else None
        digest = repo.digest_staged(staging, "disk0", ODD_SIZE, parent=parent)
        manifest = Manifest(
            vm="vm1",
            backup_id=backup_id,
            kind="incremental" if ids else "full",
            parent=ids[-1] if ids else None,
            strategy="backup",
            transport="none",
            created=utc_now_iso(),
            quiesced=False,
            bitmap="vmsnap",
            disks=(DiskRecord("disk0", "disk0.qcow2", ODD_SIZE, image.stat().st_size, digest),),
        )
        repo.commit(staging, manifest)
        ids.append(backup_id)
    return repo, ids


def test_chain_built_by_hand_matches_the_independent_digest(tmp_path: Path) -> None:
    repo, ids = _chain(tmp_path)
    for backup_id in ids:
        image = repo.backup_dir("vm1", backup_id) / "disk0.qcow2"
        assert repo.get("vm1", backup_id).disks[0].sha256 == independent_root(
            independent_chunks(image, tmp_path)
        )


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_a_damaged_chunks_file_is_caught_by_verify_and_restore(tmp_path: Path, damage: str) -> None:
    repo, ids = _chain(tmp_path)
    chunks = repo.backup_dir("vm1", ids[0]) / "disk0.chunks"
    if damage == "flipped":
        data = bytearray(chunks.read_bytes())
        data[40] ^= 0x01  # chunk 1's digest
        chunks.write_bytes(bytes(data))
    elif damage == "truncated":
        chunks.write_bytes(chunks.read_bytes()[:-1])
    else:
        chunks.unlink()
    for reader in ("qemu", "libqcow"):
        report = repo.verify("vm1", reader=reader)  # type: ignore[arg-type]
        assert [(p.backup_id, p.disk) for p in report.problems] == [(ids[0], "disk0")], report.problems
        assert "sha256" in report.problems[0].message and "chunk" in report.problems[0].message
    with pytest.raises(
        ChecksumMismatchError if damage == "flipped" else RepositoryError, match="chunk digests"
    ):
        repo.restore("vm1", ids[0], tmp_path / "out")
    assert not (tmp_path / "out" / "disk0.qcow2").exists()
    # the incremental on top stays restorable: its own digests are intact and its content is right
    _, restored = repo.restore("vm1", ids[1], tmp_path / "out-inc")
    assert restored[0].sha256 == repo.get("vm1", ids[1]).disks[0].sha256


def test_damaged_data_is_named_by_chunk_in_verify_and_restore(tmp_path: Path) -> None:
    repo, ids = _chain(tmp_path)
    image = repo.backup_dir("vm1", ids[1]) / "disk0.qcow2"
    # the incremental's cluster at 10M (chunk 2) holds 0x43: flip a byte of it in the file
    extents = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    offset = next(e["offset"] for e in json.loads(extents) if e["start"] == 10 * MiB and e["data"])
    with open(image, "r+b") as f:
        f.seek(offset + 7)
        byte = f.read(1)
        f.seek(offset + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    for reader in ("qemu", "libqcow"):
        report = repo.verify("vm1", reader=reader)  # type: ignore[arg-type]
        assert [(p.backup_id, p.disk) for p in report.problems] == [(ids[1], "disk0")]
        assert "chunk 2 (offset 8 MiB)" in report.problems[0].message
    with pytest.raises(ChecksumMismatchError, match=r"chunk 2 \(offset 8 MiB\)"):
        repo.restore("vm1", ids[1], tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir()]


def test_an_incremental_on_a_parent_with_damaged_digests_reads_everything(tmp_path: Path) -> None:
    repo, ids = _chain(tmp_path)
    chunks = repo.backup_dir("vm1", ids[1]) / "disk0.chunks"
    chunks.write_bytes(b"\x00" * len(chunks.read_bytes()))  # the parent of the next backup lies
    backup_id = repo.new_backup_id("vm1")
    staging = repo.stage("vm1", backup_id)
    image = staging / "disk0.qcow2"
    make_image(image, backing=Path(f"../{ids[1]}/disk0.qcow2"))
    subprocess.run(["qemu-io", "-c", "write -P 0x44 0 64k", str(image)], check=True, capture_output=True)
    digest = repo.digest_staged(staging, "disk0", ODD_SIZE, parent=repo.get("vm1", ids[1]))
    assert digest == independent_root(independent_chunks(image, tmp_path))


@pytest.mark.parametrize("reader", ["qemu", "libqcow"])
def test_verify_trusts_a_parent_only_once_it_verified(
    tmp_path: Path, reader: str, caplog: pytest.LogCaptureFixture
) -> None:
    """verify reads an incremental only where its own layer has clusters when its parent verified in the
    same run; damage in a chunk only the parent holds must still fail the incremental too."""

    def on_parent() -> dict[str, bool]:  # backup id → its image was read on top of its parent's digests
        seen = {}
        for record in caplog.records:
            words = record.getMessage().split()
            if record.name == "vmsnap.repo.verify" and words[0] == "verify":
                seen[words[1].split("/")[1]] = "parent" in words
        caplog.clear()
        return seen

    caplog.set_level(logging.DEBUG, logger="vmsnap.repo.verify")
    writes = (["write -P 0x51 0 10M"], ["write -P 0x52 9M 64k"], ["write -P 0x53 9M 4k"])
    repo, ids = _chain(tmp_path, writes)
    caplog.clear()
    report = repo.verify("vm1", reader=reader)  # type: ignore[arg-type]
    assert report.ok, report.problems
    assert on_parent() == {ids[0]: False, ids[1]: True, ids[2]: True}
    image = repo.backup_dir("vm1", ids[0]) / "disk0.qcow2"
    extents = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    entry = next(
        e for e in json.loads(extents) if e["data"] and e["start"] <= 5 * MiB < e["start"] + e["length"]
    )
    offset = entry["offset"] + 5 * MiB - entry["start"]  # chunk 1: no incremental touches it
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    caplog.clear()
    report = repo.verify("vm1", reader=reader)  # type: ignore[arg-type]
    assert on_parent() == dict.fromkeys(ids, False)  # no parent verified: each is read in full
    assert [p.backup_id for p in report.problems] == ids, report.problems
    assert all("chunk 1 (offset 4 MiB)" in p.message for p in report.problems)
    assert repo.verify("vm1", ids[2], reader=reader).problems  # type: ignore[arg-type]


def test_verify_and_restore_report_hashing_progress(tmp_path: Path) -> None:
    repo, ids = _chain(tmp_path)
    seen: list[tuple[str, int, int]] = []
    assert repo.verify("vm1", ids[0], reader="qemu", progress=lambda *a: seen.append(a)).ok
    repo.restore("vm1", ids[0], tmp_path / "out", progress=lambda *a: seen.append(a))
    runs: list[list[int]] = []
    current: list[int] = []
    for disk, done, total in seen:
        assert (disk, total) == ("disk0", ODD_SIZE)
        current.append(done)
        if done == total:
            runs.append(current)
            current = []
    assert len(runs) == 2 and not current  # one for verify, one for restore
    for run in runs:
        assert run[0] == 0 and run == sorted(run)
        assert any(0 < done < ODD_SIZE for done in run), run  # the hashing moved it on
