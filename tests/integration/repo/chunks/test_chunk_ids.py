"""Chunk id hashes end to end: a repository of either hash (BLAKE3, format 3, the default; sha256, format 2;
encrypted, either is format 4), plain or encrypted, backs up a real qcow2 and restores it byte for byte (to
qcow2 and raw); its blobs are named by the hash of their content as blob.py says; a copy between
repositories of different hashes renames every chunk and restores the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import blake3
import pytest
import zstandard

from tests.conftest import make_image
from tests.integration.cli_helpers import same_content
from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.repo.copy import copy_backups
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import OfflineMachine


def _write(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    made = make_image(tmp_path / "disk0.qcow2", "24M")
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 4096 * 4)  # 4 MiB, compressible: a zstd blob
    _write(made, f"write -s {data} 0 4M")
    data.write_bytes(os.urandom(4 * 1024 * 1024 + 512 * 1024))  # incompressible: raw blobs
    _write(made, f"write -s {data} 8M 4608k")
    _write(made, "write -P 0x5a 20M 1M")
    return made


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize(("chunk_id", "version"), [("blake3", 3), ("sha256", 2)])
def test_a_repository_of_either_hash_backs_up_and_restores_bytes(
    image: Path, tmp_path: Path, chunk_id: str, version: int, encrypt: bool
) -> None:
    repo, key = tmp_path / "repo", tmp_path / "repo.key"
    Repository.init(repo, chunk_id=chunk_id, encrypt=encrypt, key_file=key if encrypt else None)
    marker = json.loads((repo / "vmsnap-repo.json").read_text())
    # (an encrypted repository seals its metadata too: format 4, whatever its hash)
    assert marker["format"] == (4 if encrypt else version) and marker.get("chunk_id", "sha256") == chunk_id
    Backup(OfflineMachine([image]), BackupConfig(repo=repo, strategy="internal", key_file=key)).run()
    library = Repository.open(repo, key_file=key if encrypt else None)
    for format in ("qcow2", "raw"):
        _, (restored,) = library.restore("disk0", None, tmp_path / f"out-{format}", format=format)
        assert same_content(restored.path, image), format
    blobs = [p for p in (repo / "chunks").rglob("*") if p.is_file()]
    assert len(blobs) == 4  # 0-4M (zstd), 8-12M and 12-16M (raw), 20-24M
    if not encrypt:  # the id is the hash of the plaintext, as the module docstring says to check by hand
        hash_of = {
            "blake3": lambda b: blake3.blake3(b).hexdigest(),
            "sha256": lambda b: hashlib.sha256(b).hexdigest(),
        }
        for blob in blobs:
            raw = blob.read_bytes()
            payload = zstandard.ZstdDecompressor().decompress(raw[8:]) if raw[5] & 1 else raw[8:]
            assert hash_of[chunk_id](payload) == blob.name


def test_a_copy_between_hashes_renames_every_chunk(image: Path, tmp_path: Path) -> None:
    Repository.init(tmp_path / "old", chunk_id="sha256")
    Backup(OfflineMachine([image]), BackupConfig(repo=tmp_path / "old", strategy="internal")).run()
    Repository.init(tmp_path / "new")  # blake3
    report = copy_backups(Repository.open(tmp_path / "old"), Repository.open(tmp_path / "new"))
    assert report.chunks_sent == 4
    old = {p.name for p in (tmp_path / "old" / "chunks").rglob("*") if p.is_file()}
    new = {p.name for p in (tmp_path / "new" / "chunks").rglob("*") if p.is_file()}
    assert len(new) == 4 and not old & new
    _, (restored,) = Repository.open(tmp_path / "new").restore("disk0", None, tmp_path / "out")
    assert same_content(restored.path, image)
