"""Fixtures of the heal and gc tests: a tmpfs of the test's own, and the S3 test server's fixtures
(tests/integration/s3/fixtures.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.s3.fixtures import s3_env, s3_prefix, s3_store_factory, seaweed

__all__ = ["mount_tmpfs", "s3_env", "s3_prefix", "s3_store_factory", "seaweed"]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount_tmpfs("48m")``: a tmpfs of that size mounted for this test (unmounted afterwards, by path)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        argv = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            why = done.stderr.strip()
            pytest.fail(
                f"cannot mount a {size} tmpfs ({why}): it needs root and mount (Debian package: mount)"
            )
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)
