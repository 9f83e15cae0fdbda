"""What the S3 server (SeaweedFS, the one the tests run) does with Object Lock and versions, through
:class:`~vmsnap.repo.stores.s3.S3Store` and through plain boto3 — what vmsnap's locked repositories build on
(docs/immutable.md lists it as what a store must support).

Checked: a bucket's lock configuration and versioning; a put with a retention (COMPLIANCE, GOVERNANCE) and
reading it back; extending it (an earlier date is refused and keeps the later one); deleting a locked
version refused (AccessDenied, also in a batch, also with a bypass in COMPLIANCE); a plain delete adds a
delete marker and the old version stays readable; conditional puts (If-None-Match) in a versioned bucket,
also over a delete marker; the versions listed newest first with the delete markers in their place; a
governance lock lifted with a bypass; a lock mode the server does not know refused in one line; a lock
that has ended lets the version go; a locked put checked by its CRC32C header, without a Content-MD5.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import cast

import pytest
from botocore.exceptions import ClientError

from tests.integration.immutable.buckets import BucketMaker, client, split
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.errors import NotFoundError, StoreError
from vmsnap.repo.stores.base import LockMode, Retention
from vmsnap.repo.stores.retaining import retention_after
from vmsnap.repo.stores.s3 import S3Store

pytestmark = pytest.mark.timeout(300)


def _store(place: str) -> S3Store:
    return S3Store.from_url(f"s3://{place}/probe")


def test_the_bucket_says_whether_it_locks_and_keeps_versions(make_bucket: BucketMaker) -> None:
    locked, versioned, plain = make_bucket("locked"), make_bucket("versioned"), make_bucket("plain")
    ruled = make_bucket("ruled")
    answers = {name: _store(name).locking() for name in (locked, versioned, plain, ruled)}
    assert (answers[locked].object_lock, answers[locked].versioning) == (True, True)
    assert answers[locked].default_retention is None
    assert (answers[versioned].object_lock, answers[versioned].versioning) == (False, True)
    assert (answers[plain].object_lock, answers[plain].versioning) == (False, False)
    assert answers[ruled].default_retention == "GOVERNANCE, 1 days"


def test_a_locked_version_cannot_be_deleted_only_hidden_and_its_lock_only_extended(
    locked_bucket: str, s3_env: SeaweedServer
) -> None:
    store = _store(locked_bucket)
    bucket, prefix = split(locked_bucket)
    lock = retention_after("compliance", 3600)
    assert store.put("a", b"one", retention=lock)
    assert store.retention("a") == lock
    [first] = list(store.list_versions("a"))
    # a plain delete only adds a delete marker: the old version stays, readable by its id
    store.delete("a")
    assert not store.exists("a")
    marker, version = list(store.list_versions("a"))
    assert (marker.deleted, marker.latest, version.version_id) == (True, True, first.version_id)
    assert store.get_version("a", first.version_id) == b"one"
    # deleting the locked version is refused: alone, in a batch, and with a bypass in COMPLIANCE
    s3 = client(s3_env)
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/probe/a", VersionId=first.version_id)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError):
        s3.delete_object(
            Bucket=bucket, Key=f"{prefix}/probe/a", VersionId=first.version_id, BypassGovernanceRetention=True
        )
    with pytest.raises(StoreError, match="refused to delete 1 of 1 object versions"):
        store.delete_versions([("a", first.version_id)])
    assert store.get_version("a", first.version_id) == b"one"
    # overwriting adds a version; the old one stays
    assert store.put("a", b"garbage")
    assert store.get("a") == b"garbage" and store.get_version("a", first.version_id) == b"one"
    # extending: a later date holds; an earlier one is refused by the server and keeps the later one
    later = Retention("compliance", lock.until + dt.timedelta(days=2))
    s3.put_object_retention(
        Bucket=bucket,
        Key=f"{prefix}/probe/a",
        VersionId=first.version_id,
        Retention={"Mode": "COMPLIANCE", "RetainUntilDate": later.until},
    )
    with pytest.raises(ClientError):
        s3.put_object_retention(
            Bucket=bucket,
            Key=f"{prefix}/probe/a",
            VersionId=first.version_id,
            Retention={"Mode": "COMPLIANCE", "RetainUntilDate": lock.until},
        )
    assert store.retention("a", first.version_id) == later
    store.put("b", b"b", retention=later)
    store.extend_retention(["b"], lock)  # earlier than it has: counts as done, the date stays
    assert store.retention("b") == later
    s3.close()


def test_versions_are_listed_newest_first_with_their_delete_markers_in_place(locked_bucket: str) -> None:
    store = _store(locked_bucket)
    store.put("k", b"1")
    store.delete("k")
    store.put("k", b"2")  # all three within a second or two: the listing's order decides, not the times
    store.delete("k")
    listed = [(v.deleted, v.size) for v in store.list_versions("k")]
    assert listed == [(True, 0), (False, 1), (True, 0), (False, 1)]
    assert [v.latest for v in store.list_versions("k")] == [True, False, False, False]


def test_conditional_puts_work_in_a_versioned_bucket_also_over_a_delete_marker(locked_bucket: str) -> None:
    store = _store(locked_bucket)
    assert store.put("lease", b"1", if_absent=True)
    assert not store.put("lease", b"2", if_absent=True)
    store.delete("lease")
    assert store.put("lease", b"3", if_absent=True)  # a delete marker is no object
    assert store.get("lease") == b"3"
    store.check_conditional_writes()


def test_a_governance_lock_can_be_lifted_with_a_bypass_a_compliance_one_cannot(
    locked_bucket: str, s3_env: SeaweedServer
) -> None:
    store = _store(locked_bucket)
    bucket, prefix = split(locked_bucket)
    store.put("g", b"g", retention=retention_after("governance", 3600))
    [version] = list(store.list_versions("g"))
    s3 = client(s3_env)
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/probe/g", VersionId=version.version_id)
    s3.delete_object(
        Bucket=bucket, Key=f"{prefix}/probe/g", VersionId=version.version_id, BypassGovernanceRetention=True
    )
    assert list(store.list_versions("g")) == []
    s3.close()


def test_a_lock_mode_the_server_does_not_know_is_refused_in_one_line(locked_bucket: str) -> None:
    store = _store(locked_bucket)
    unknown = Retention(cast(LockMode, "legal-hold"), retention_after("compliance", 60).until)
    with pytest.raises(StoreError) as refused:
        store.put("m", b"m", retention=unknown)
    message = str(refused.value)
    assert "\n" not in message and "LEGAL-HOLD" in message and "InvalidRequest" in message, message
    assert not store.exists("m")


def test_a_bucket_without_object_lock_refuses_a_locked_put(make_bucket: BucketMaker) -> None:
    store = _store(make_bucket("versioned"))
    with pytest.raises(StoreError, match="Object Lock"):
        store.put("x", b"x", retention=retention_after("compliance", 60))


def test_an_ended_lock_lets_the_version_go_and_a_missing_key_is_named(locked_bucket: str) -> None:
    store = _store(locked_bucket)
    store.put("short", b"s", retention=retention_after("compliance", 2))
    [version] = list(store.list_versions("short"))
    time.sleep(3.5)
    store.delete_versions([("short", version.version_id)])
    assert list(store.list_versions("short")) == []
    with pytest.raises(NotFoundError, match="'nothing-here'"):
        store.extend_retention(["nothing-here"], retention_after("compliance", 60))


def test_a_locked_put_is_checked_by_its_crc32c_header_without_a_content_md5(locked_bucket: str) -> None:
    """S3 wants a locked put's body checked (Content-MD5 or an x-amz-checksum-*): vmsnap's puts carry
    CRC32C (awscrt, the s3 extra's), and the server takes it for a locked put, conditional or not."""
    store = _store(locked_bucket)
    sent: list[dict[str, str]] = []

    def record(request: object, **_: object) -> None:
        headers = getattr(request, "headers")  # noqa: B009 (botocore's AWSPreparedRequest)
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in headers.items()})

    store._client.meta.events.register("before-send.s3.PutObject", record)
    lock = retention_after("governance", 3600)
    assert store.put("crc", b"locked", retention=lock)
    assert store.put("crc-new", b"locked too", if_absent=True, retention=lock)
    assert [s.get("x-amz-object-lock-mode") for s in sent] == ["GOVERNANCE", "GOVERNANCE"]
    assert all("x-amz-checksum-crc32c" in s and "content-md5" not in s for s in sent), sent
    assert store.retention("crc") == store.retention("crc-new") == lock
    assert store.get("crc-new") == b"locked too"
    store.close()
