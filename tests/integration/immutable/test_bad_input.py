"""Bad input to locked repositories and to ``--as-of``, each one line with its exit status (2: usage, 1: the
store or repository), nothing written: a bucket without Object Lock or without versioning or with a default
retention rule; ``--lock-days`` 0, negative, not a number or beyond 100 years; a lock mode S3 does not have;
a lock on a directory; ``--as-of`` before the repository existed, in the future, malformed, on a directory,
on a bucket without versioning. (A lock mode the server itself refuses: test_object_lock_server.py.)"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.integration.cli_helpers import cli
from tests.integration.immutable.buckets import BucketMaker
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.repo.stores.s3 import S3Store

pytestmark = pytest.mark.timeout(300)


def _empty(url: str) -> bool:
    store = S3Store.from_url(url)
    try:
        return not list(store.list(""))
    finally:
        store.close()


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("plain", "Object Lock is not enabled and versioning is off on its bucket"),
        ("versioned", "Object Lock is not enabled on its bucket"),
        ("ruled", "the bucket has a default retention (GOVERNANCE, 1 days)"),
    ],
)
def test_a_bucket_that_cannot_hold_a_locked_repository_is_named_with_what_it_lacks(
    make_bucket: BucketMaker, capsys: pytest.CaptureFixture[str], kind: str, says: str
) -> None:
    url = f"s3://{make_bucket(kind)}/site"
    result = cli(capsys, "init", "--repo", url, "--lock-days", "30")
    assert result.code == 1 and says in result.error_line, result.err
    assert _empty(url)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--lock-days", "0"], "--lock-days 0: a lock lasts more than 0 and at most 36500 days"),
        (["--lock-days", "-3"], "--lock-days -3: a lock lasts more than 0"),
        (["--lock-days", "a-month"], "--lock-days a-month: a lock lasts"),
        (["--lock-days", "40000"], "at most 36500 days"),
        (["--lock-days", "nan"], "--lock-days nan"),
        (
            ["--lock-days", "30", "--lock-mode", "legal-hold"],
            "S3 Object Lock has the modes compliance and governance",
        ),
        (["--lock-mode", "governance"], "--lock-mode and --lock-extend-days need --lock-days N"),
        (["--lock-days", "30", "--lock-extend-days", "0"], "--lock-extend-days 0"),
        (["--lock-days", "30", "--layout", "qcow2"], "the qcow2 layout cannot be locked"),
    ],
)
def test_bad_lock_options_are_one_usage_line_and_write_nothing(
    locked_bucket: str, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    url = f"s3://{locked_bucket}/site"
    result = cli(capsys, "init", "--repo", url, *argv)
    assert result.code == 2 and says in result.error_line, result.err
    assert _empty(url)


def test_a_lock_on_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "init", "--repo", tmp_path / "repo", "--lock-days", "30")
    assert result.code == 2 and "a locked repository needs an object store" in result.error_line, result.err
    assert not (tmp_path / "repo").exists()


def test_bad_as_of_times_are_one_line_each(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"s3://{make_bucket('locked')}/site"
    before = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    assert cli(capsys, "init", "--repo", url, "--lock-days", "1").code == 0
    early = cli(capsys, "list", "--repo", url, "--as-of", before.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert early.code == 1 and "did not exist yet at" in early.error_line, early.err
    assert "it was made at" in early.error_line
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    later = cli(capsys, "verify", "--repo", url, "--as-of", future)
    assert later.code == 2 and "is in the future" in later.error_line, later.err
    for malformed in ("yesterday", "2026-12-07 21:30", "2026-12-07T21:30:00+02:00"):
        bad = cli(capsys, "restore", "--repo", url, "--vm", "x", "--to", tmp_path / "o", "--as-of", malformed)
        assert bad.code == 2 and "is not an ISO 8601 UTC time" in bad.error_line, bad.err
    local = cli(capsys, "list", "--repo", tmp_path / "local", "--as-of", "2026-01-01T00:00:00Z")
    assert local.code == 2 and "keeps no earlier versions" in local.error_line, local.err
    plain = f"s3://{make_bucket('plain')}/site"
    assert cli(capsys, "init", "--repo", plain).code == 0
    unversioned = cli(capsys, "list", "--repo", plain, "--as-of", "2026-01-01T00:00:00Z")
    assert unversioned.code == 1 and "versioning is off" in unversioned.error_line, unversioned.err
    copy = cli(capsys, "copy", "--from", url, "--to", url, "--as-of", future)
    assert copy.code == 2 and "in the future" in copy.error_line, copy.err
    for writes in ("--repair", "--boot"):  # a repository read as it was is read-only
        refused = cli(capsys, "verify", "--repo", url, "--as-of", "2026-01-01T00:00:00Z", writes)
        assert refused.code == 2 and f"--as-of does not go with {writes}" in refused.error_line, refused.err
