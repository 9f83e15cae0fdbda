"""A fresh repository for each test of vmsnap.repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsnap.repo.repository import Repository


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(tmp_path / "repo", create=True)
