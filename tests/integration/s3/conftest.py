"""The S3 test server's fixtures, for the tests of the launcher itself."""

from tests.integration.s3.fixtures import own_seaweed, s3_env, s3_prefix, s3_store_factory, seaweed

__all__ = ["own_seaweed", "s3_env", "s3_prefix", "s3_store_factory", "seaweed"]
