"""The journal of a backup run: durable, private, round-trips what recover needs."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from vmsnap.errors import RepositoryError
from vmsnap.model import Disk, SnapshotRef
from vmsnap.repo.journal import Journal, snapshot_to_json
from vmsnap.strategies.base import BackupContext, Checkpoint


def test_journal_round_trips_snapshot_refs_and_survives_a_reload(tmp_path: Path) -> None:
    disk = Disk(
        "disk0", "fmt-disk0", Path("/images/d0.qcow2"), "qcow2", 1 << 26, (Path("/images/base.qcow2"),)
    )
    ref = SnapshotRef(
        "external", "backup-x", disk, "/images/d0.qcow2.vmsnap-x.qcow2", {"overlay_node": "ov-1"}
    )
    context = BackupContext(
        tmp_path / "staging",
        "bm1",
        Checkpoint("20260101T000000.000000Z-abcd", {"disk0": tmp_path / "p"}),
        True,
    )
    path = tmp_path / ".journal.json"
    journal = Journal.start(path, vm="vm1", staging=str(tmp_path / "staging"), context=context.to_json())
    journal.record("creating", name="backup-x")
    journal.record("created", snapshots=[snapshot_to_json(ref)])
    journal.record("deleted", disk="disk9")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Journal.load(path)
    assert loaded is not None
    assert loaded.snapshots() == [ref]
    assert loaded.deleted_disks() == {"disk9"}
    assert loaded.last_step == "deleted"
    assert BackupContext.from_json(loaded.header["context"]) == context
    with pytest.raises(RepositoryError, match="not been recovered"):
        Journal.start(path, vm="vm1")
    loaded.remove()
    assert Journal.load(path) is None
    path.write_text('{"header": {"format": 9}, "steps": []}')
    with pytest.raises(RepositoryError, match="damaged"):
        Journal.load(path)


def test_a_journal_is_lines_a_torn_last_line_is_a_step_that_never_started(tmp_path: Path) -> None:
    path = tmp_path / ".journal.json"
    journal = Journal.start(path, vm="vm1")
    journal.record("creating", name="backup-x")
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and '"header"' in lines[0]  # header, started, creating: appended, not rewritten
    with path.open("a") as out:
        out.write('{"step": "created", "at": "2026-')  # a crash in the middle of the next append
    loaded = Journal.load(path)
    assert loaded is not None and loaded.last_step == "creating"
    path.write_text("\n".join([lines[0], '{"step": "cre', lines[2]]) + "\n")  # damage before the end
    with pytest.raises(RepositoryError, match="damaged"):
        Journal.load(path)


def test_a_format_1_journal_of_an_older_vmsnap_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / ".journal.json"
    steps = [
        {"step": "started", "at": "t0", "data": {}},
        {"step": "creating", "at": "t1", "data": {"name": "b"}},
    ]
    path.write_text(json.dumps({"header": {"format": 1, "vm": "vm1"}, "steps": steps}, indent=2) + "\n")
    loaded = Journal.load(path)
    assert loaded is not None and loaded.last_step == "creating" and loaded.header["vm"] == "vm1"
