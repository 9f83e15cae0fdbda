"""Fixtures of the integration tests beyond tests/conftest.py: the far host (another hypervisor, an sshd
with its own /tmp; see tests/integration/far_host.py) and the S3 server (tests/integration/s3/fixtures.py)."""

from tests.integration.far_host import far_host
from tests.integration.s3.fixtures import s3_env, s3_prefix, seaweed

__all__ = ["far_host", "s3_env", "s3_prefix", "seaweed"]
