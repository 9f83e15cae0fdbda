"""Buckets for the locked-repository tests, made the way an administrator makes them (vmsnap never creates
buckets): with Object Lock (which turns versioning on), with versioning only, or plain; each test gets
buckets of its own, named after it. Also the attacker's tools: the host's own credentials, through boto3."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any, Literal

import boto3
import pytest

from tests.integration.s3.seaweed import SeaweedServer

Kind = Literal["locked", "versioned", "plain"]
BucketMaker = Callable[..., str]


def client(server: SeaweedServer) -> Any:
    """A boto3 S3 client of the server's admin identity: the credentials a backup host uses."""
    session = boto3.session.Session(
        aws_access_key_id=server.admin.access_key,
        aws_secret_access_key=server.admin.secret_key,
        region_name="us-east-1",
    )
    return session.client("s3", endpoint_url=server.endpoint_url)


def create(server: SeaweedServer, name: str, kind: Kind = "locked", *, default_days: int = 0) -> str:
    """Create bucket ``name`` of ``kind`` (a default retention rule of ``default_days`` if asked)."""
    s3 = client(server)
    try:
        if kind == "locked":
            s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            s3.create_bucket(Bucket=name)
        if kind == "versioned":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        if default_days:
            s3.put_object_lock_configuration(
                Bucket=name,
                ObjectLockConfiguration={
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": default_days}},
                },
            )
    finally:
        s3.close()
    return name


@pytest.fixture
def make_bucket(s3_env: SeaweedServer, request: pytest.FixtureRequest) -> BucketMaker:
    """``make_bucket(kind="locked", default_days=0)``: a new bucket of this test's, on the shared server."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")

    def make(kind: Kind = "locked", *, default_days: int = 0) -> str:
        return create(s3_env, f"{stem}-{secrets.token_hex(3)}", kind, default_days=default_days)

    return make


@pytest.fixture
def locked_bucket(make_bucket: BucketMaker) -> Iterator[str]:
    """A new bucket with Object Lock (and so versioning) on the shared server."""
    yield make_bucket("locked")
