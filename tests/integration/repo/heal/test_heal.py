"""A rotten chunk heals (issue 21, item 1): verify moves it aside, and the next backup of the unchanged VM —
full or incremental, in a local directory or on S3 (SeaweedFS) — stores it again, so that the old backup
that named it restores again too. The error hints on the way say only what is true."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli, same_content
from tests.integration.repo.layouts.helpers import random_file
from vmsnap.repo.chunks.blob import chunk_key
from vmsnap.repo.chunks.quarantine import QUARANTINE
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores import open_store
from vmsnap.repo.stores.base import Store

VM = "disk0"


@pytest.fixture(params=["local", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty chunks repository: a directory, or a prefix on the test SeaweedFS."""
    if request.param == "local":
        yield str(tmp_path / "repo")
        return
    request.getfixturevalue("s3_env")
    url = f"s3://vmsnap-test/{request.getfixturevalue('s3_prefix')}"
    Repository.init(url)
    yield url


def _image(tmp_path: Path) -> Path:
    """A 24 MiB disk: random data in chunk 0, a pattern in chunk 2, zeros elsewhere."""
    data = random_file(tmp_path / "random", 4 << 20)
    image = make_image(tmp_path / f"{VM}.qcow2", "24M")
    qemu_io = ["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 4M", "-c", "write -P 0x33 8M 4M"]
    subprocess.run([*qemu_io, str(image)], check=True, capture_output=True)
    return image


def _backup(capsys: pytest.CaptureFixture[str], repo: str, image: Path, *extra: str) -> str:
    result = cli(capsys, "backup", "--repo", repo, "--image", image, "--json", *extra)
    assert result.code == 0, result.err
    backup_id: str = result.json()["backup_id"]
    return backup_id


def _rot(store: Store, repo: str, backup_id: str) -> str:
    """Flip one byte in the middle of the blob of chunk 0 of the backup's disk (disk rot); its id (hex)."""
    library = Repository.open(repo)
    chunk_id = library.index(library.get(VM, backup_id), VM).chunk_id(0)  # type: ignore[attr-defined]
    blob = bytearray(store.get(chunk_key(chunk_id)))
    blob[len(blob) // 2] ^= 0x01
    store.put(chunk_key(chunk_id), bytes(blob))
    return str(chunk_id.hex())


@pytest.mark.parametrize("second", ["full", "incremental"])
def test_a_rotten_chunk_is_stored_again_by_the_next_backup_and_the_old_one_restores(
    repo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], second: str
) -> None:
    image = _image(tmp_path)
    first = _backup(capsys, repo, image)
    store = open_store(repo)
    hexid = _rot(store, repo, first)

    before = cli(capsys, "restore", "--repo", repo, "--vm", VM, "--backup", first, "--to", tmp_path / "r0")
    assert before.code == 1 and hexid in before.error_line and "run `vmsnap verify`: it moves" in before.err
    found = cli(capsys, "verify", "--repo", repo, "--json")
    assert found.code == 1 and all(hexid in p["message"] for p in found.json()["problems"])
    moved = cli(capsys, "restore", "--repo", repo, "--vm", VM, "--backup", first, "--to", tmp_path / "r1")
    assert moved.code == 1 and "verify moved it aside" in moved.error_line, moved.err
    assert f"back up {VM} again: the next backup stores the chunk again" in moved.err

    again = _backup(capsys, repo, image, *(["--incremental"] if second == "incremental" else []))
    for backup_id in (again, first):  # the new backup, and the old one that named the rotten chunk
        out = tmp_path / f"out-{backup_id}"
        result = cli(capsys, "restore", "--repo", repo, "--vm", VM, "--backup", backup_id, "--to", out)
        assert result.code == 0, result.err
        assert same_content(out / f"{VM}.qcow2", image)
    if second == "incremental":
        listed = cli(capsys, "list", "--repo", repo, "--json").json()["backups"]
        assert [b["kind"] for b in listed] == ["full", "incremental"]

    report = found.json()
    assert report["still_damaged"] == [f"{VM}/{first}/{VM}"]
    [chunk] = report["chunks"]
    assert chunk["chunk"] == hexid and chunk["action"].startswith("moved aside") and not chunk["healed"]
    assert "the next backup stores it again if the disk still holds that data" in chunk["action"]
    assert f"next backup of {VM} stores them again" in found.err
    assert cli(capsys, "verify", "--repo", repo).code == 0
    assert list(store.list(QUARANTINE)) == []  # the record of a chunk that is back goes
