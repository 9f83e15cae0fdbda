"""The whole machine captured with a backup of a bare QEMU (a real one, no guest OS): its command line (read
through the QMP socket's peer process), its disks as the command line names them, and its writable
firmware flash, read while the vCPUs are paused at the snapshot instant, and written beside the restored
images; a command line that carries a secret is not kept, and the backup says which option."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import make_image
from vmsnap.backup import Backup, BackupConfig
from vmsnap.errors import RepositoryError, UsageError
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.copy import copy_backups
from vmsnap.repo.qcow2_repo import Qcow2Repository, write_attachment
from vmsnap.repo.repository import Repository
from vmsnap.restore.backups import read_machine_state
from vmsnap.restore.images import restore_images
from vmsnap.vm.machine import QemuMachine
from vmsnap.vm.machine_state import NVRAM, RECORD, MachineState


def _flash(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    code = tmp_path / "code.fd"
    code.write_bytes(b"\xff" * (2 * 1024 * 1024))
    variables = tmp_path / "vars.fd"
    variables.write_bytes(os.urandom(128 * 1024) + b"\x00" * (400 * 1024))
    args = [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
    ]  # fmt: skip
    return code, variables, args


def test_a_bare_qemus_command_line_and_firmware_variables_are_kept(tmp_path: Path) -> None:
    _, variables, flash = _flash(tmp_path)
    image = make_image(tmp_path / "disk0.qcow2", "16M")
    process = QemuProcess(tmp_path, [DriveSpec(image, "disk0")], name="fwvm", extra_args=flash).start()
    try:
        with QemuMachine(process.qmp_socket) as machine:
            assert [d.name for d in machine.disks()] == ["disk0"]  # firmware flash is no disk
            expected = variables.read_bytes()
            result = Backup(machine, BackupConfig(repo=tmp_path / "repo")).run()
            repo = Repository.open(tmp_path / "repo")
            manifest = repo.get("fwvm", result.backup_id)
            assert repo.attachments(manifest) == [RECORD, NVRAM]
            state = MachineState.from_json(json.loads(repo.attachment(manifest, RECORD)))
            assert list(state.argv or ()) == process.argv()
            assert state.kind == "qemu" and state.refused is None and state.nvram == str(variables)
            assert [(d.name, d.node_name, d.file, d.qdev) for d in state.disks] == [
                ("disk0", "fmt-disk0", str(image), "disk0")
            ]
            assert repo.attachment(manifest, NVRAM) == expected
            assert machine.qmp().status() == "running"  # resumed after the pause
            assert not any("command line" in n for n in result.notes)
        variables.write_bytes(os.urandom(len(expected)))  # changed after the backup
        restored = restore_images(tmp_path / "repo", "fwvm", None, tmp_path / "restored")
        assert restored.firmware_variables == tmp_path / "restored" / "fwvm_VARS.fd"
        assert restored.firmware_variables.read_bytes() == expected
    finally:
        process.stop()


def test_a_command_line_with_a_secret_is_not_kept_and_the_option_is_named(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk0.qcow2", "16M")
    secret = ["-object", "secret,id=sec0,data=hunter2"]
    process = QemuProcess(tmp_path, [DriveSpec(image, "disk0")], name="secretvm", extra_args=secret).start()
    try:
        with QemuMachine(process.qmp_socket) as machine:
            result = Backup(machine, BackupConfig(repo=tmp_path / "repo")).run()
        assert (
            "the QEMU command line was not kept with the backup: it carries a secret in -object (data=)"
            in result.notes
        )
        repo = Repository.open(tmp_path / "repo")
        manifest = repo.get("secretvm", result.backup_id)
        raw = repo.attachment(manifest, RECORD)
        assert b"hunter2" not in raw and b"hunter2" not in b"".join(
            p.read_bytes() for p in (tmp_path / "repo").rglob("*") if p.is_file()
        )
        state = MachineState.from_json(json.loads(raw))
        assert state.argv is None and state.refused == "it carries a secret in -object (data=)"
    finally:
        process.stop()


@pytest.mark.parametrize("layout", ["qcow2", "chunks-encrypted"])
def test_machine_state_is_sealed_by_the_manifest(tmp_path: Path, layout: str) -> None:
    """The manifest names each machine-state object's sha256: it cannot be attached again, and one replaced
    beneath the API (a file rewritten, an object put with the key) is refused when read."""
    _, variables, flash = _flash(tmp_path)
    image = make_image(tmp_path / "disk0.qcow2", "16M")
    repo_path, key = tmp_path / "repo", None
    if layout == "qcow2":
        Repository.init(repo_path, layout="qcow2")
    else:
        key = tmp_path / "repo.key"
        Repository.init(repo_path, encrypt=True, key_file=key)
    process = QemuProcess(tmp_path, [DriveSpec(image, "disk0")], name="sealvm", extra_args=flash).start()
    try:
        with QemuMachine(process.qmp_socket) as machine:
            result = Backup(machine, BackupConfig(repo=repo_path, key_file=key)).run()
    finally:
        process.stop()
    repo = Repository.open(repo_path, key_file=key)
    manifest = repo.get("sealvm", result.backup_id)
    assert sorted(manifest.objects) == sorted([NVRAM, RECORD])
    assert manifest.objects[NVRAM] == hashlib.sha256(variables.read_bytes()).hexdigest()
    with pytest.raises(UsageError, match=f"object {NVRAM} was sealed with backup"):
        repo.attach(manifest, NVRAM, b"\0" * 16)
    assert read_machine_state(repo, manifest) is not None
    if isinstance(repo, Qcow2Repository):
        write_attachment(
            repo.backup_dir("sealvm", manifest.backup_id), "sealvm", manifest.backup_id, NVRAM, b"x"
        )
    else:
        assert isinstance(repo, ChunksRepository)
        repo.put_attachment("sealvm", manifest.backup_id, NVRAM, b"x")
    with pytest.raises(RepositoryError, match=f"\\({NVRAM}\\) is not the object sealed with backup"):
        read_machine_state(repo, manifest)
    # a restore reads and checks the machine state before it writes a byte
    with pytest.raises(RepositoryError, match="is not the object sealed"):
        restore_images(repo_path, "sealvm", None, tmp_path / "restored", key_file=key)
    assert not (tmp_path / "restored").exists() or not any((tmp_path / "restored").iterdir())


@pytest.mark.parametrize("target", ["qcow2", "chunks-encrypted"])
def test_copy_takes_the_machine_state_and_the_records_along(tmp_path: Path, target: str) -> None:
    """An off-site copy can be restored whole and boot-verified: the sealed machine state and the records
    kept after the backup travel with it, checked when read, and the copy's restore writes the variables."""
    _, variables, flash = _flash(tmp_path)
    image = make_image(tmp_path / "disk0.qcow2", "16M")
    process = QemuProcess(tmp_path, [DriveSpec(image, "disk0")], name="fwvm", extra_args=flash).start()
    try:
        with QemuMachine(process.qmp_socket) as machine:
            backup_id = Backup(machine, BackupConfig(repo=tmp_path / "repo")).run().backup_id
    finally:
        process.stop()
        process.kill()
    source = Repository.open(tmp_path / "repo")
    record = b'{"verdict": "passed"}'
    source.attach(source.get("fwvm", backup_id), "boot-20261207T000000.000000Z.json", record)
    key = tmp_path / "offsite.key" if target == "chunks-encrypted" else None
    if key is not None:
        offsite = Repository.init(tmp_path / "offsite", encrypt=True, key_file=key)
    else:
        offsite = Repository.init(tmp_path / "offsite", layout="qcow2")
    copy_backups(source, offsite)

    copied = offsite.get("fwvm", backup_id)
    assert copied.objects == source.get("fwvm", backup_id).objects != {}
    assert offsite.attachments(copied) == sorted([RECORD, "boot-20261207T000000.000000Z.json", NVRAM])
    assert offsite.attachment(copied, NVRAM) == variables.read_bytes()
    assert offsite.attachment(copied, "boot-20261207T000000.000000Z.json") == record
    restored = tmp_path / "restored"
    restore_images(tmp_path / "offsite", "fwvm", backup_id, restored, key_file=key)
    assert (restored / "fwvm_VARS.fd").read_bytes() == variables.read_bytes()
