"""The S3 test server's fixtures (tests/integration/s3/fixtures.py) for the layout tests on S3."""

from tests.integration.s3.fixtures import s3_env, s3_prefix, seaweed

__all__ = ["s3_env", "s3_prefix", "seaweed"]
