"""Bad input to a chunks repository, each a one-line error that loses nothing: a chunk deleted, truncated or
flipped (verify and restore name it and the backups using it; restore leaves no file it could not check), a
damaged index, missing and wrong keys, and an encrypted repository that shows no plaintext of the guest."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli, same_content
from tests.integration.repo.layouts.helpers import SECRET, held_leases, random_file, store_keys, write_file
from vmsnap.errors import ChecksumMismatchError, DamagedChunkError, KeyFileError
from vmsnap.repo.chunks.keys import create_key_file
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores.local import LocalStore

VM = "disk0"


def _image(tmp_path: Path, *commands: str) -> Path:
    image = make_image(tmp_path / "disk0.qcow2", "24M")
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)
    return image


def _backup(capsys: pytest.CaptureFixture[str], repo: Path, image: Path) -> str:
    result = cli(capsys, "backup", "--repo", repo, "--image", image, "--strategy", "internal", "--json")
    assert result.code == 0, result.err
    backup_id: str = result.json()["backup_id"]
    return backup_id


@pytest.fixture
def two_backups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[str], Path]:
    """A chunks repository with two backups of one image that share their first chunk (distinct random data
    in chunk 0 and chunk 2; the second backup changed chunk 2)."""
    data = random_file(tmp_path / "random", 8 << 20)
    image = _image(tmp_path, f"write -s {data} 0 4M", "write -P 0x33 8M 4M")
    repo = tmp_path / "repo"
    first = _backup(capsys, repo, image)
    _image_write(image, "write -P 0x44 8M 1M")
    second = _backup(capsys, repo, image)
    return repo, [first, second], image


def _image_write(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


def _first_chunk(repo: Path, backup_id: str) -> Path:
    """The blob of chunk 0 of the disk (shared by both backups)."""
    index = Repository.open(repo)
    manifest = index.get(VM, backup_id)
    chunk_id = index.index(manifest, VM).chunk_id(0)  # type: ignore[attr-defined]
    hexid = chunk_id.hex()
    return repo / "chunks" / hexid[:4] / hexid


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped"])
def test_a_damaged_chunk_is_named_with_the_backups_that_use_it(
    two_backups: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    repo, ids, _ = two_backups
    blob = _first_chunk(repo, ids[0])
    hexid = blob.name
    if damage == "deleted":
        blob.unlink()
    elif damage == "truncated":
        blob.write_bytes(blob.read_bytes()[:100])
    else:
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        blob.write_bytes(bytes(raw))
    report = Repository.open(repo).verify(fast=True)
    assert len(report.problems) == (2 if damage == "deleted" else 0)  # --fast sees only what is missing
    full = cli(capsys, "verify", "--repo", repo, "--json")
    assert full.code == 1
    problems = full.json()["problems"]
    assert {(p["backup_id"], p["disk"]) for p in problems} == {(ids[0], VM), (ids[1], VM)}
    assert all(hexid in p["message"] for p in problems)
    assert len(Repository.open(repo).verify(fast=True).problems) == 2  # moved aside: missing now
    out = tmp_path / "out"
    result = cli(capsys, "restore", "--repo", repo, "--vm", VM, "--backup", ids[1], "--to", out)
    assert result.code == 1
    line = result.error_line
    assert hexid in line and f"{VM}/{ids[0]}/{VM}" in line and f"{VM}/{ids[1]}/{VM}" in line
    assert not out.exists() or list(out.iterdir()) == []  # nothing it could not check


def test_a_damaged_index_is_refused_before_anything_is_written(
    two_backups: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, ids, image = two_backups
    index = repo / "vms" / VM / ids[1] / f"{VM}.index"
    raw = bytearray(index.read_bytes())
    raw[40] ^= 0xFF
    index.write_bytes(bytes(raw))
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError, match="does not match the manifest"):
        Repository.open(repo).restore(VM, ids[1], out)
    assert not out.exists()
    report = Repository.open(repo).verify()
    assert [(p.backup_id, p.disk) for p in report.problems] == [(ids[1], VM)]
    Repository.open(repo).restore(VM, ids[0], out)  # the other backup is whole
    assert not same_content(out / "disk0.qcow2", image)  # (the image changed after the first backup)


def test_keys_missing_wrong_or_readable_by_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "repo.key"
    repo = tmp_path / "repo"
    Repository.init(repo, encrypt=True, key_file=key)
    assert key.stat().st_mode & 0o777 == 0o600
    image = _image(tmp_path, "write -P 0x55 0 1M")
    monkeypatch.delenv("VMSNAP_KEY_FILE", raising=False)
    missing = cli(capsys, "backup", "--repo", repo, "--image", image, "--strategy", "internal")
    assert missing.code == 1 and "is encrypted and no key file was given" in missing.error_line
    # refused before anything was written (but for the lease it took and released)
    assert [k for k in store_keys(repo) if not k.startswith("locks/")] == ["vmsnap-repo.json"]
    assert held_leases(LocalStore(repo)) == []
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(key))
    backup_id = _backup(capsys, repo, image)
    other = tmp_path / "other.key"
    create_key_file(other)
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(other))
    wrong = cli(capsys, "list", "--repo", repo)
    assert wrong.code == 1 and "is not this repository's key" in wrong.error_line
    assert str(other) in wrong.error_line and "key id" in wrong.error_line
    key.chmod(0o644)
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(key))
    loose = cli(capsys, "restore", "--repo", repo, "--vm", VM, "--to", tmp_path / "out")
    assert loose.code == 1 and "readable by others" in loose.error_line
    key.chmod(0o600)
    with pytest.raises(KeyFileError, match="does not exist"):
        Repository.open(repo, key_file=tmp_path / "nowhere.key")
    argv = ["restore", "--repo", repo, "--vm", VM, "--backup", backup_id, "--to", tmp_path / "o"]
    restored = cli(capsys, *argv)
    assert restored.code == 0, restored.err
    assert same_content(tmp_path / "o" / "disk0.qcow2", image)
    with pytest.raises(DamagedChunkError):  # a blob of one repository is refused by another key
        Repository.open(repo, key_file=key).codec.decode(b"VMCB\x01\x03\x00\x00" + bytes(40), bytes(32))


def test_an_encrypted_repository_holds_no_plaintext_of_the_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "repo.key"
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(key))
    repo = tmp_path / "repo"
    assert cli(capsys, "list", "--repo", repo).code == 1  # no repository yet
    Repository.init(repo, encrypt=True)  # the key file is made from VMSNAP_KEY_FILE
    # the marker in every 4 KiB between random bytes, so that compression cannot hide it
    pieces = [SECRET + os.urandom(4096 - len(SECRET)) for _ in range(16)]
    marked = write_file(tmp_path / "marked", b"".join(pieces))
    image = _image(tmp_path, f"write -s {marked} 0 64k", f"write -s {marked} 5M 64k", "write -P 0x5a 9M 1M")
    _backup(capsys, repo, image)
    _image_write(image, f"write -s {marked} 14M 64k")  # 2 MiB into its chunk: a chunk of its own
    _backup(capsys, repo, image)
    probes = [SECRET[:32], SECRET[-32:], b"\x5a" * 64]
    scanned = 0
    for path in repo.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += len(data)
            hits = [p for p in probes if p in data]
            assert not hits, f"{path} holds plaintext {hits}"
    assert scanned > 3 * 60 << 10  # the three marked 64 KiB pieces (random but for the marks) are stored
    assert cli(capsys, "verify", "--repo", repo).code == 0
