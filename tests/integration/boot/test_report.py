"""``vmsnap report`` without a VM: an encrypted repository needs its key (as for list), every chart it writes
is referenced, and Chromium shows the page (the boot verdicts and screenshots are in
test_verify_boot_qemu.py, where a real guest was booted)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.boot.chromium import blank, check_images, open_page
from tests.integration.cli_helpers import cli_process


def test_report_of_an_encrypted_repository_needs_its_key_and_opens_in_chromium(tmp_path: Path) -> None:
    key = tmp_path / "repo.key"
    repo = tmp_path / "repo"
    assert cli_process("init", "--repo", repo, "--encrypt", "--key-file", key).code == 0
    image = tmp_path / "db.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    for pattern in (1, 2, 3):
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {pattern}M 2M", str(image)],
            check=True,
            capture_output=True,
        )
        done = cli_process("backup", "--repo", repo, "--key-file", key, "--image", image, "--name", "dbvm")
        assert done.code == 0, done.err
    assert cli_process("verify", "--repo", repo, "--key-file", key).code == 0  # a record beside each backup
    chunk = max((p for p in (repo / "chunks").rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    damaged = bytearray(chunk.read_bytes())
    damaged[-1] ^= 0xFF
    chunk.write_bytes(bytes(damaged))  # the newest backup's own chunk: its next verification finds it
    assert (
        cli_process(
            "verify", "--repo", repo, "--key-file", key, "--vm", "dbvm", "--backup", newest(repo, key)
        ).code
        == 1
    )
    refused = cli_process("report", "--repo", repo, "--out", tmp_path / "out")
    assert refused.code == 1 and "encrypted" in refused.error_line and "--key-file" in refused.error_line
    made = cli_process("report", "--repo", repo, "--key-file", key, "--out", tmp_path / "out", "--json")
    assert made.code == 0, made.err
    page = tmp_path / "out" / "index.html"
    assert sorted(check_images(page)) == [
        "charts/dbvm-cost.png",
        "charts/dbvm-timeline.png",
        "charts/growth.png",
    ]
    dom = open_page(page, tmp_path / "shot.png")
    assert "dbvm" in dom and "not verified" in dom and dom.count("<tr>") >= 4  # never booted
    assert dom.count(">OK<") == 2 and "1 PROBLEM(S)" in dom and "damaged" in dom
    assert not blank((tmp_path / "shot.png").read_bytes())
    assert (page.stat().st_mode & 0o777) == 0o644


def newest(repo: Path, key: Path) -> str:
    listed = cli_process("list", "--repo", repo, "--key-file", key, "--json")
    return str(listed.json()["backups"][-1]["backup_id"])
