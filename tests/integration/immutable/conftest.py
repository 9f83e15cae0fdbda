"""Fixtures of the locked-repository tests: the S3 test server's (tests/integration/s3/fixtures.py), buckets
made with Object Lock (or without, or with versioning only) on it, and the restore tests' disk with files."""

from tests.integration.immutable.buckets import locked_bucket, make_bucket
from tests.integration.restore.conftest import backed_up_disk, run_root
from tests.integration.s3.fixtures import own_seaweed, s3_env, s3_prefix, seaweed

__all__ = [
    "backed_up_disk",
    "locked_bucket",
    "make_bucket",
    "own_seaweed",
    "run_root",
    "s3_env",
    "s3_prefix",
    "seaweed",
]
