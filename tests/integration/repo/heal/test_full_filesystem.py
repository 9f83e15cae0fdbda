"""A repository whose filesystem fills up (issue 21, item 6), made real: a 48 MiB tmpfs. The backup fails
with one line that says what stays behind (the chunks it stored, counted) and that `vmsnap gc` frees them;
gc does, on the full filesystem, and a backup that fits then succeeds and restores."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli, same_content
from tests.integration.repo.layouts.helpers import held_leases, partial_backups, random_file
from vmsnap.repo.stores.local import LocalStore

MiB = 1 << 20


def _image(tmp_path: Path, name: str, size: int) -> Path:
    """A qcow2 of ``size`` bytes of random (incompressible) data."""
    data = random_file(tmp_path / f"{name}.random", size)
    image = make_image(tmp_path / f"{name}.qcow2", f"{size // MiB}M")
    argv = ["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 {size}", str(image)]
    subprocess.run(argv, check=True, capture_output=True)
    return image


def _chunk_files(repo: Path) -> list[Path]:
    chunks = repo / "chunks"
    return (
        [p for p in chunks.rglob("*") if p.is_file() and not p.name.startswith(".")]
        if chunks.exists()
        else []
    )


def test_a_backup_into_a_full_filesystem_says_what_it_left_and_gc_frees_it(
    mount_tmpfs: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_filesystem = mount_tmpfs("48m")
    repo = small_filesystem / "repo"
    big = _image(tmp_path, "big", 64 * MiB)
    failed = cli(capsys, "backup", "--repo", repo, "--image", big)
    assert failed.code == 1
    line = failed.error_line
    kept = _chunk_files(repo)
    size = sum(p.stat().st_size for p in kept)
    assert 8 <= len(kept) < 16 and size > 32 * MiB  # most of what fitted (4 MiB each, raw)
    assert "the filesystem is full" in line and "nothing partial" not in line, line
    assert f"; {len(kept)} chunk(s), {size / MiB:.1f} MiB, that this run stored stay in the store" in line
    assert "`vmsnap gc` deletes the chunks no backup uses" in line
    assert partial_backups(repo, "big") == [] and held_leases(LocalStore(repo)) == []

    freed = cli(capsys, "gc", "--repo", repo, "--json")  # on the full filesystem
    assert freed.code == 0, freed.err
    assert freed.json()["chunks_freed"] == len(kept) and _chunk_files(repo) == []
    stat = os.statvfs(small_filesystem)
    assert stat.f_bavail * stat.f_frsize > 40 * MiB

    small = _image(tmp_path, "small", 16 * MiB)
    made = cli(capsys, "backup", "--repo", repo, "--image", small, "--json")
    assert made.code == 0, made.err
    out = tmp_path / "restored"
    assert cli(capsys, "restore", "--repo", repo, "--vm", "small", "--to", out).code == 0
    assert same_content(out / "small.qcow2", small)
