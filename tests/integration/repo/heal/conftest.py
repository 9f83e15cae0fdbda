"""The S3 test server's fixtures (tests/integration/s3/fixtures.py) for the heal and gc tests on S3."""

from tests.integration.s3.fixtures import s3_env, s3_prefix, s3_store_factory, seaweed

__all__ = ["s3_env", "s3_prefix", "s3_store_factory", "seaweed"]
