"""Objects kept beside a backup (proof, machine state) in both layouts, encrypted too: real backups of an
image taken with qemu-img/qemu-nbd, objects written after the manifest, read back checked; an object moved
to another backup, damaged, or read with another key is refused; the manifest is never rewritten."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.integration.cli_helpers import cli_process
from tests.integration.repo.layouts.helpers import stored_path
from vmsnap.backup import Backup, BackupConfig
from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.repo.chunks.keys import create_key_file
from vmsnap.repo.layout import ATTACHMENT_MAX, RepositoryLayout
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import OfflineMachine

CASES = ("qcow2", "chunks", "chunks-encrypted")


def _repo(tmp_path: Path, case: str) -> tuple[Path, Path | None]:
    repo = tmp_path / "repo"
    key = None
    if case == "chunks-encrypted":
        key = tmp_path / "repo.key"
        Repository.init(repo, encrypt=True, key_file=key)
    else:
        Repository.init(repo, layout=case)
    return repo, key


def _backup(tmp_path: Path, repo: Path, key: Path | None) -> str:
    image = tmp_path / "disk0.qcow2"
    if not image.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(image)], check=True, capture_output=True
    )
    config = BackupConfig(repo=repo, key_file=key)
    return Backup(OfflineMachine([image], name="vm1"), config).run().backup_id


def _manifest_bytes(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in repo.rglob("manifest.json")
    }


@pytest.mark.parametrize("case", CASES)
def test_objects_beside_a_backup_are_kept_checked_and_bound_to_it(tmp_path: Path, case: str) -> None:
    repo_path, key = _repo(tmp_path, case)
    first = _backup(tmp_path, repo_path, key)
    second = _backup(tmp_path, repo_path, key)
    repo: RepositoryLayout = Repository.open(repo_path, key_file=key)
    one, two = repo.get("vm1", first), repo.get("vm1", second)
    manifests = _manifest_bytes(repo_path)
    payload = bytes(range(256)) * 1000
    repo.attach(one, "boot-1.json", b'{"verdict": "passed"}')
    repo.attach(one, "boot-1.png", payload)
    assert repo.attachments(one) == ["boot-1.json", "boot-1.png"]
    assert repo.attachments(two) == []
    assert repo.attachment(one, "boot-1.png") == payload
    repo.attach(one, "boot-1.json", b'{"verdict": "failed"}')  # replaced
    assert repo.attachment(one, "boot-1.json") == b'{"verdict": "failed"}'
    assert _manifest_bytes(repo_path) == manifests  # the manifests were never rewritten
    if case == "chunks-encrypted":  # nothing of the plaintext is stored in the clear
        stored = b"".join(p.read_bytes() for p in repo_path.rglob("*") if p.is_file())
        assert stored_path(repo_path, f"vms/vm1/{first}/attached.boot-1.png", key).exists()
        assert b"verdict" not in stored and payload[:512] not in stored

    with pytest.raises(NotFoundError, match=r"keeps no boot-2\.json"):
        repo.attachment(one, "boot-2.json")
    with pytest.raises(UsageError):
        repo.attach(one, "../escape", b"x")
    with pytest.raises(UsageError, match="too large"):
        repo.attach(one, "big", bytes(ATTACHMENT_MAX + 1))

    # moved to another backup: refused (its envelope names the backup it was kept for; sealed, its key)
    if case == "qcow2":
        source = repo_path / "vm1" / first / "attachments" / "boot-1.json"
        target = repo_path / "vm1" / second / "attachments" / "boot-1.json"
    else:
        source = stored_path(repo_path, f"vms/vm1/{first}/attached.boot-1.json", key)
        target = stored_path(repo_path, f"vms/vm1/{second}/attached.boot-1.json", key)
    assert source.is_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    moved = "moved from another key" if case == "chunks-encrypted" else "another backup"
    with pytest.raises(RepositoryError, match=moved):
        repo.attachment(two, "boot-1.json")

    # damaged: refused
    raw = bytearray(source.read_bytes())
    raw[-3] ^= 0xFF
    source.write_bytes(bytes(raw))
    with pytest.raises(RepositoryError, match="fails its authentication" if key else "damaged"):
        repo.attachment(one, "boot-1.json")

    # pruned with its backup
    png = stored_path(repo_path, f"vms/vm1/{first}/attached.boot-1.png", key) if case != "qcow2" else None
    repo.prune("vm1", 1)
    assert not list(repo_path.rglob(f"*{first}*boot-1.png*")) and not (repo_path / "vm1" / first).exists()
    assert png is None or not png.exists()


def test_an_encrypted_repository_refuses_an_object_read_with_another_key(tmp_path: Path) -> None:
    repo_path, key = _repo(tmp_path, "chunks-encrypted")
    backup_id = _backup(tmp_path, repo_path, key)
    repo = Repository.open(repo_path, key_file=key)
    repo.attach(repo.get("vm1", backup_id), "proof", b"secret proof")
    stored = stored_path(repo_path, f"vms/vm1/{backup_id}/attached.proof", key)
    assert stored.is_file()
    # an object of the same name written by someone without the key (an unencrypted blob) is refused
    plain = Repository.init(tmp_path / "plain")
    plain_backup = _backup(tmp_path, tmp_path / "plain", None)
    plain.attach(plain.get("vm1", plain_backup), "proof", b"forged proof")
    forged = next((tmp_path / "plain").rglob("attached.proof"))
    stored.write_bytes(forged.read_bytes())
    with pytest.raises(RepositoryError, match="damaged"):
        repo.attachment(repo.get("vm1", backup_id), "proof")
    other = tmp_path / "other.key"
    create_key_file(other)
    with pytest.raises(RepositoryError):
        Repository.open(repo_path, key_file=other).attachment(repo.get("vm1", backup_id), "proof")


@pytest.mark.parametrize("case", CASES)
def test_an_object_for_a_backup_removed_meanwhile_is_refused_and_leaves_nothing(
    tmp_path: Path, case: str
) -> None:
    """A verification that ends after prune removed its backup: the record is not kept (qcow2: the backup's
    directory is not made again; chunks: no orphan object is left)."""
    repo_path, key = _repo(tmp_path, case)
    backup_id = _backup(tmp_path, repo_path, key)
    repo: RepositoryLayout = Repository.open(repo_path, key_file=key)
    manifest = repo.get("vm1", backup_id)
    before = _not_leases(repo_path)
    repo.delete_backup(manifest.vm, manifest.backup_id)
    gone = _not_leases(repo_path)
    with pytest.raises(NotFoundError, match="is gone"):
        repo.attach(manifest, "boot-20261207T000000.000000Z.json", b"{}")
    assert _not_leases(repo_path) == gone != before


def _not_leases(repo: Path) -> set[Path]:
    """Every path in ``repo`` but the leases (``locks/``; ``l/`` when sealed)."""
    return {p for p in repo.rglob("*") if p.relative_to(repo).parts[0] not in ("locks", "l")}


def test_list_shows_a_damaged_boot_record_on_its_own_backup(tmp_path: Path) -> None:
    repo_path, key = _repo(tmp_path, "chunks")
    damaged, fine = _backup(tmp_path, repo_path, key), _backup(tmp_path, repo_path, key)
    repo: RepositoryLayout = Repository.open(repo_path, key_file=key)
    repo.attach(repo.get("vm1", damaged), "boot-20261207T000000.000000Z.json", b'{"format": 1, "verdict": 3}')
    listed = cli_process("list", "--repo", repo_path, "--json")
    assert listed.code == 0, listed.err
    boots = {b["backup_id"]: b["boot"] for b in listed.json()["backups"]}
    assert boots[fine] is None and boots[damaged]["verdict"] == "damaged"
    assert "is damaged" in boots[damaged]["reason"]
    human = cli_process("list", "--repo", repo_path)
    assert human.code == 0 and "record DAMAGED" in human.out
