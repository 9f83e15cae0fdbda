"""Buckets for the locked-repository tests, made the way an administrator makes them (vmsnap never creates
buckets): with Object Lock (which turns versioning on), with versioning only, with Object Lock and a default
retention rule, or plain. A SeaweedFS bucket is a collection that takes volumes of its own at its first
write, so the tests on the shared server share one bucket of each kind, each test under a prefix of its own
(:func:`make_bucket` gives ``BUCKET/PREFIX``). Also the attacker's tool: a boto3 client with the hosts' own
credentials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import SeaweedServer

Kind = Literal["locked", "rescue", "versioned", "ruled", "plain"]
BucketMaker = Callable[..., str]
SHARED: dict[Kind, str] = {
    "locked": "vmsnap-locked",
    "rescue": "vmsnap-locked-rescue",
    "versioned": "vmsnap-versioned",
    "ruled": "vmsnap-locked-ruled",
    "plain": BUCKET,
}
"""The bucket of each kind on the shared server (``ruled``: Object Lock with a default GOVERNANCE rule of a
day; ``rescue``: a second bucket with Object Lock; ``plain``: the S3 tests' own)."""
_made: set[tuple[str, str]] = set()


def client(server: SeaweedServer) -> Any:
    """A boto3 S3 client of the server's admin identity: the credentials a backup host uses."""
    session = boto3.session.Session(
        aws_access_key_id=server.admin.access_key,
        aws_secret_access_key=server.admin.secret_key,
        region_name="us-east-1",
    )
    return session.client("s3", endpoint_url=server.endpoint_url)


def create(server: SeaweedServer, name: str, kind: Kind = "locked") -> str:
    """Create bucket ``name`` of ``kind`` on ``server`` (once: a bucket there already is kept)."""
    if (server.endpoint_url, name) in _made:
        return name
    s3 = client(server)
    try:
        try:
            if kind in ("locked", "rescue", "ruled"):
                s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
            else:
                s3.create_bucket(Bucket=name)
        except ClientError as err:
            if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        if kind == "versioned":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        if kind == "ruled":
            s3.put_object_lock_configuration(
                Bucket=name,
                ObjectLockConfiguration={
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
                },
            )
    finally:
        s3.close()
    _made.add((server.endpoint_url, name))
    return name


@pytest.fixture
def make_bucket(s3_env: SeaweedServer, s3_prefix: str) -> BucketMaker:
    """``make_bucket(kind="locked")``: ``BUCKET/PREFIX``, a prefix of this test's own (a new one each call)
    in the shared bucket of that kind."""
    calls = [0]

    def make(kind: Kind = "locked") -> str:
        calls[0] += 1
        return f"{create(s3_env, SHARED[kind], kind)}/{s3_prefix}-{calls[0]}"

    return make


@pytest.fixture
def locked_bucket(make_bucket: BucketMaker) -> str:
    """``BUCKET/PREFIX`` in the shared bucket with Object Lock (and so versioning)."""
    return make_bucket("locked")


def split(place: str) -> tuple[str, str]:
    """(bucket, prefix) of ``BUCKET/PREFIX``."""
    bucket, _, prefix = place.partition("/")
    return bucket, prefix
