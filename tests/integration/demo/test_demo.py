"""`make demo` end to end: the built-in tiny VM backed up frozen, changed, restored, proven exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
