"""``vmsnap verify --repair`` (issue 21, heal): chunks found damaged are stored again at once — from the
running VM (a backup of it reads them again) and from another repository holding a copy — and the report
says per chunk what was done and which backups are still damaged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.cli_helpers import backup, capture, cli, same_content, vm_args, write
from tests.integration.repo.layouts.helpers import random_file
from vmsnap.repo.chunks.blob import chunk_key
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores.local import LocalStore


def _rot(repo: Path, vm: str, backup_id: str, disk: str, number: int) -> str:
    """Flip one byte in the blob of chunk ``number`` of a backup's disk; its id (hex)."""
    library = Repository.open(repo)
    chunk_id = library.index(library.get(vm, backup_id), disk).chunk_id(number)  # type: ignore[attr-defined]
    store = LocalStore(repo)
    blob = bytearray(store.get(chunk_key(chunk_id)))
    blob[len(blob) // 2] ^= 0x01
    store.put(chunk_key(chunk_id), bytes(blob))
    return str(chunk_id.hex())


def test_repair_reads_again_from_the_running_vm_what_it_still_holds(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    one, two = (random_file(tmp_path / f"random{n}", 4 << 20) for n in (1, 2))
    write(vm, "disk0", f"write -s {one} 0 4M", f"write -s {two} 8M 4M")  # chunks 0 and 2 of disk0
    write(vm, "disk1", "write -P 0x21 0 1M")
    first = backup(capsys, vm, repo)["backup_id"]
    kept = _rot(repo, "testvm", first, "disk0", 0)  # the VM still holds this chunk's data
    gone = _rot(repo, "testvm", first, "disk0", 2)  # and this one it overwrites now
    write(vm, "disk0", "write -P 0x77 8M 4M")
    now = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in ("disk0", "disk1")}

    result = cli(capsys, "verify", "--repo", repo, "--repair", *vm_args(vm), "--json")
    assert result.code == 1  # one chunk could not be had again
    report = result.json()
    chunks = {c["chunk"]: c for c in report["chunks"]}
    assert chunks[kept]["healed"] and chunks[kept]["action"].startswith("moved aside, then stored again by")
    assert report["repair_backup"] in chunks[kept]["action"]
    assert not chunks[gone]["healed"] and chunks[gone]["still_damaged"] == [f"testvm/{first}/disk0"]
    assert report["still_damaged"] == [f"testvm/{first}/disk0"]
    assert gone in result.error_line and "still damaged" in result.error_line

    out = tmp_path / "repaired"
    made = report["repair_backup"]
    restored = cli(capsys, "restore", "--repo", repo, "--vm", "testvm", "--backup", made, "--to", out)
    assert restored.code == 0, restored.err
    assert all(same_content(out / f"{d}.qcow2", now[d]) for d in now)
    old = cli(
        capsys, "restore", "--repo", repo, "--vm", "testvm", "--backup", first, "--to", tmp_path / "old"
    )
    assert old.code == 1 and gone in old.error_line and kept not in old.error_line
    assert "verify moved it aside" in old.error_line


def test_repair_from_an_offsite_copy_heals_every_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = random_file(tmp_path / "random", 4 << 20)
    image = make_image(tmp_path / "disk0.qcow2", "16M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 4M", str(image)], check=True)
    repo, offsite = tmp_path / "repo", tmp_path / "offsite"
    made = cli(capsys, "backup", "--repo", repo, "--image", image, "--json")
    assert made.code == 0, made.err
    first = made.json()["backup_id"]
    assert cli(capsys, "copy", "--from", repo, "--to", offsite).code == 0
    hexid = _rot(repo, "disk0", first, "disk0", 0)

    result = cli(capsys, "verify", "--repo", repo, "--repair", "--from", offsite, "--json")
    assert result.code == 0, result.err
    [chunk] = result.json()["chunks"]
    assert chunk["chunk"] == hexid and chunk["healed"] and chunk["still_damaged"] == []
    assert chunk["action"] == f"moved aside, then stored again from {offsite}"
    assert result.json()["still_damaged"] == [] and result.json()["problems"] != []
    out = tmp_path / "out"
    assert cli(capsys, "restore", "--repo", repo, "--vm", "disk0", "--backup", first, "--to", out).code == 0
    assert same_content(out / "disk0.qcow2", image)
    assert cli(capsys, "verify", "--repo", repo).code == 0
