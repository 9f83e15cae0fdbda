"""A fresh repository for each test of vmsnap.repo (layout qcow2: these tests build its files by hand)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsnap.repo.qcow2_repo import Qcow2Repository
from vmsnap.repo.repository import Repository


@pytest.fixture
def repo(tmp_path: Path) -> Qcow2Repository:
    made = Repository.open(tmp_path / "repo", create=True, layout="qcow2")
    assert isinstance(made, Qcow2Repository)
    return made
