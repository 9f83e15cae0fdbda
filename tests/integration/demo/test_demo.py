"""`make demo` end to end: the built-in tiny VM backed up frozen, changed, restored, proven exact."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.cli_helpers import VMSNAP
from vmsnap.cli import main


@pytest.mark.guest
def test_demo_proves_the_restore_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fsck_clean"] is True
    assert report["files_compared"] == report["files_matching"] == 13
    assert report["changed_after_backup"] == 3
    assert report["freeze_quiesced"] is True
    assert report["incremental"]["kind"] == "incremental"
    assert Path(report["restored_image"]).exists()


@pytest.mark.guest
def test_make_demo_ends_with_the_proof_the_readme_shows(tmp_path: Path) -> None:
    """`vmsnap demo` as `make demo` runs it: the README's closing lines, "…" standing for the figures."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    block = readme.split("`make demo` ends with the proof:")[1].split("```")[1].strip()
    shown = [line.strip() for line in block.splitlines()]
    lines = [shown[0], shown[1], shown[2], f"{shown[3]} {shown[4]}"]
    patterns = [re.escape(line).replace("…", ".+?") for line in lines]
    done = subprocess.run(
        [VMSNAP, "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    for pattern in patterns:
        assert any(re.fullmatch(pattern, line) for line in out), (pattern, out)
