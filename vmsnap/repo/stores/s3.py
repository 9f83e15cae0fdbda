"""S3Store: a repository's objects in an S3 bucket under a prefix, through boto3, on AWS or any S3-compatible
server (SeaweedFS, MinIO, Ceph RGW). Store key ``K`` is the object ``PREFIX/K`` of ``s3://BUCKET/PREFIX``.

Where the endpoint, region and credentials come from: the standard AWS chain and nothing else —
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``, or ``endpoint_url`` in the profile), ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``~/.aws/config`` and
``~/.aws/credentials`` (or ``AWS_CONFIG_FILE``/``AWS_SHARED_CREDENTIALS_FILE``), instance roles.
vmsnap never takes a secret as an argument, so none reaches a command line; messages and ``repr`` name the
bucket, the prefix and the endpoint only. (botocore's own DEBUG log prints request headers: the access key
id and, with temporary credentials, the session token; never the secret key.)

How each guarantee of :mod:`vmsnap.repo.stores.base` is kept:

- ``put`` is one PutObject: S3 makes an object visible whole or not at all. ``if_absent`` adds
  ``If-None-Match: *``: the server refuses (412 PreconditionFailed → False) when the key exists, atomically
  against other writers. A 409 ConditionalRequestConflict (a concurrent write or delete of the key was in
  flight) is retried after a short random pause; the next attempt then either writes or gets its 412. When
  botocore had to resend the request (a lost answer) and the resend got 412, the first attempt may have been
  the one that wrote: the object is read back, and the put counts as written when it holds exactly ``data``.
- Every request is retried by botocore (``standard`` or ``adaptive`` mode, ``max_attempts`` in all) on
  throttling, 5xx answers and broken connections, with exponential backoff; ``connect_timeout`` and
  ``read_timeout`` bound each attempt, so an endpoint that is down fails within seconds, not minutes.
- One botocore client per store, made once: clients are thread-safe (sessions are not), and the pool has
  ``max_pool_connections`` slots so the chunk pipeline's worker threads do not wait for a connection.

Failures become one-line errors with a hint: :class:`~vmsnap.errors.NotFoundError` for a missing key on
``get``; :class:`~vmsnap.errors.StoreError` for a missing bucket (NoSuchBucket), refused credentials
(InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied, any 403), an unreachable endpoint (connection
refused, connect or read timeout), missing credentials, and anything else with the server's error code.

vmsnap does not create buckets: :meth:`S3Store.create_bucket` exists for tests and benchmarks, and opening a
store checks that the bucket exists (see :meth:`S3Store.check`).

Requests cost money on AWS and time everywhere, so every store counts the HTTP requests it sends (each
attempt, retries included) by operation and by the first part of the key (``chunks``, ``vms``, ``locks``, …):
:attr:`S3Store.requests`, and :data:`PROCESS_REQUESTS` for all stores of this process (what the tests and
the benchmark read). :meth:`S3Store.delete_many` removes up to 1000 keys per request (DeleteObjects), for gc.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar, Literal, cast
from urllib.parse import urlsplit, urlunsplit

import attrs
import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)

from vmsnap.errors import NotFoundError, StoreError, UsageError
from vmsnap.repo.stores.base import (
    Data,
    Retention,
    StoreBase,
    StoreCapabilities,
    StoredObject,
    check_key,
    check_prefix,
)
from vmsnap.repo.stores.s3_versions import S3Versions, lock_arguments

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

__all__ = ["PROCESS_REQUESTS", "RequestTally", "S3Options", "S3Store", "parse_s3_url"]

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REFUSED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_CONFLICT = frozenset({"ConditionalRequestConflict", "OperationAborted"})
_MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
# a broken body read is retried by the store (botocore retries only until the response headers arrive)
_READ_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)
_USERINFO = re.compile(r"//[^/@\s]*@")


DELETE_BATCH = 1000
"""Keys per DeleteObjects request (S3's maximum)."""


class RequestTally:
    """HTTP requests sent, by (operation, area): ``("PutObject", "chunks")``; thread-safe. The area is the
    first part of the store key (or of a listing's prefix; "" for the whole store)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, operation: str, area: str) -> None:
        with self._lock:
            self._counts[(operation, area)] += 1

    def snapshot(self) -> Counter[tuple[str, str]]:
        """A copy of the counts (subtract two snapshots for what happened in between)."""
        with self._lock:
            return Counter(self._counts)


PROCESS_REQUESTS = RequestTally()
"""The requests of every :class:`S3Store` of this process."""


@attrs.frozen(kw_only=True)
class S3Options:
    """How an :class:`S3Store` talks to its endpoint; credentials are never here (see the module docstring).

    :param profile: AWS profile to use instead of ``AWS_PROFILE`` / the default profile
    :param endpoint_url: endpoint to use instead of the AWS chain's (``AWS_ENDPOINT_URL``, the profile's)
    :param region: region instead of the chain's (``AWS_REGION``, the profile's; us-east-1 when none)
    :param connect_timeout: seconds one attempt may take to connect
    :param read_timeout: seconds one attempt may wait for the server while sending or receiving
    :param max_attempts: attempts per request in all (the first included), with exponential backoff between
    :param retry_mode: botocore's ``standard``, or ``adaptive`` (also slows itself down when throttled)
    :param max_pool_connections: connections kept for parallel requests from several threads
    :param conflict_attempts: attempts of a conditional put that S3 answers with 409 (a write was in flight)
    """

    profile: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout: float = attrs.field(default=3.0, validator=attrs.validators.gt(0))
    read_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    max_attempts: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_pool_connections: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    conflict_attempts: int = attrs.field(default=6, validator=attrs.validators.ge(1))


def _crc32c_available() -> bool:
    """True when botocore can compute CRC32C (with awscrt, the s3 extra's)."""
    import importlib.util

    return importlib.util.find_spec("awscrt") is not None


_CRC32C = _crc32c_available()
_CHECKSUM: Literal["CRC32C", "CRC32"] = "CRC32C" if _CRC32C else "CRC32"
"""Each put carries a checksum of its body that the server checks: CRC32C where awscrt computes it (18 GiB/s
here, against 2 GiB/s for botocore's default CRC32 through zlib); without awscrt, botocore's defaults (CRC32,
and a signed sha256 of the body on plain HTTP)."""


def _put_checksum(params: dict[str, object], **_: object) -> None:
    """botocore hook (when a PutObject's parameters are given): the put carries :data:`_CHECKSUM`."""
    params.setdefault("ChecksumAlgorithm", _CHECKSUM)


def parse_s3_url(url: str) -> tuple[str, str]:
    """The bucket and the prefix (without slashes at its ends; maybe "") of ``s3://BUCKET[/PREFIX]``.

    :raise UsageError: not such a URL, a malformed bucket name, or a prefix that is no valid key
    """
    if not url.startswith("s3://"):
        raise UsageError(f"not an S3 URL: {_scrub(url)!r}", hint="write it as s3://BUCKET/PREFIX")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return _check_bucket(bucket), _check_root(prefix)


class S3Store(S3Versions, StoreBase):
    """The objects under one prefix of one S3 bucket (see the module docstring for how the guarantees hold).

    Registered as the store of ``s3://`` URLs. Its capabilities: listings are sharded (1000 keys a
    request), conditional puts are the server's (probed when a repository is created), deletes are batched,
    and the chunk pipelines keep 12 requests in flight (each waits on the network and the server); a bucket
    with versioning keeps versions, one with Object Lock locks them (:mod:`vmsnap.repo.stores.s3_versions`).

    :param bucket: an existing bucket
    :param prefix: where the store's keys start inside the bucket ("" for the whole bucket)
    :param options: timeouts, retries, pool size, and an endpoint, profile or region overriding the chain's
    :raise UsageError: a malformed bucket name or prefix
    :raise StoreError: the AWS profile does not exist, or the endpoint URL is malformed
    """

    scheme: ClassVar[str] = "s3"
    capabilities: ClassVar[StoreCapabilities] = StoreCapabilities(
        sharded_listing=True,
        conditional_put="server",
        batch_delete=True,
        versions=True,
        retention_locks=True,
        transfer_threads=12,
    )

    def __init__(self, bucket: str, prefix: str = "", *, options: S3Options | None = None) -> None:
        self._bucket = _check_bucket(bucket)
        prefix = _check_root(prefix)
        self._root = f"{prefix}/" if prefix else ""
        self._options = options if options is not None else S3Options()
        self._url = f"s3://{self._bucket}/{prefix}" if prefix else f"s3://{self._bucket}"
        self._client = self._make_client()
        self._endpoint = _scrub(_without_userinfo(self._client.meta.endpoint_url))
        self.requests = RequestTally()
        """The HTTP requests this store sent (see the module docstring)."""
        events = self._client.meta.events
        events.register("before-parameter-build.s3", self._note_area)
        events.register("request-created.s3", self._count_request)
        events.register("provide-client-params.s3.PutObject", _put_checksum)

    @classmethod
    def from_url(cls, url: str, *, options: S3Options | None = None, check: bool = True) -> S3Store:
        """The store at ``s3://BUCKET/PREFIX``.

        :param check: make one request (:meth:`check`) so a missing bucket, refused credentials or an endpoint
            that is down fail here rather than in the middle of a backup
        :raise UsageError: a malformed URL
        :raise StoreError: the check failed (see :meth:`check`)
        """
        bucket, prefix = parse_s3_url(url)
        store = cls(bucket, prefix, options=options)
        if check:
            try:
                store.check()
            except StoreError:
                store.close()
                raise
        return store

    @classmethod
    def open_location(cls, location: str, *, create: bool = False) -> S3Store:
        """The store at ``s3://BUCKET/PREFIX``, checked (see :meth:`from_url`); ``create`` makes nothing
        (the bucket must exist).

        :raise UsageError: a malformed URL
        :raise StoreError: the check failed
        """
        return cls.from_url(location)

    @property
    def url(self) -> str:
        """``s3://bucket/prefix``: no endpoint, no credentials."""
        return self._url

    @property
    def bucket(self) -> str:
        """The bucket's name."""
        return self._bucket

    @property
    def endpoint_url(self) -> str:
        """The endpoint the client talks to (without any user info a URL might carry)."""
        return self._endpoint

    def __repr__(self) -> str:
        return f"S3Store({self._url!r}, endpoint={self._endpoint!r})"

    def check(self) -> None:
        """Make one cheap request (a listing of at most one key) that needs the bucket, working credentials
        with list permission, and a reachable endpoint.

        :raise StoreError: one of them is missing, with what to do
        """
        try:
            self._client.list_objects_v2(Bucket=self._bucket, Prefix=self._root, MaxKeys=1)
        except (ClientError, BotoCoreError) as err:
            raise self._store_error("a listing", err) from err

    def check_conditional_writes(self) -> None:
        """Make sure the server honours ``If-None-Match: *`` (leases and manifests rely on it): a probe object
        is put twice with it, and the second put must be refused. Three requests; run when a repository is
        created.

        :raise StoreError: the server overwrote the probe (it ignores conditional writes), or failed
        """
        probe = f"locks/conditional-write-probe-{secrets.token_hex(8)}"
        try:
            first, second = self.put(probe, b"1", if_absent=True), self.put(probe, b"2", if_absent=True)
        finally:
            self.delete(probe)
        if not first or second:
            raise StoreError(
                f"the S3 server at {self._endpoint} ignores conditional writes (If-None-Match: *)",
                hint="vmsnap needs them for its leases and manifests: use AWS S3, SeaweedFS, or a MinIO or "
                "Ceph RGW release that supports them",
            )

    def get(self, key: str) -> bytes:
        """The object's bytes (a body cut short is fetched again, up to ``max_attempts`` times).

        :raise UsageError: an invalid key
        :raise NotFoundError: no object has that key
        :raise StoreError: the store failed
        """
        name = self._root + check_key(key)
        for attempt in range(1, self._options.max_attempts + 1):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=name)
            except ClientError as err:
                if _code(err) in _MISSING_KEY:
                    raise NotFoundError(
                        f"no object {key!r} in {self._url}", hint="check the key, or whether it was deleted"
                    ) from err
                raise self._store_error(f"get of {key!r}", err) from err
            except BotoCoreError as err:
                raise self._store_error(f"get of {key!r}", err) from err
            try:
                return response["Body"].read()
            except _READ_ERRORS as err:
                if attempt == self._options.max_attempts:
                    raise self._store_error(f"get of {key!r}", err) from err
                log.debug("get of %s from %s: reading the body failed (%s); again", key, self._url, err)
                _pause(attempt)
            finally:
                response["Body"].close()
        raise AssertionError("unreachable")  # pragma: no cover

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        """Store ``data`` under ``key`` in one PutObject; with ``if_absent`` only when the key is free
        (``If-None-Match: *``); with ``retention`` the new version is locked (Object Lock headers). Every put
        is durable when it returns (``durable`` changes nothing).

        :return: True when written, False when ``if_absent`` found an object there (nothing written)
        :raise UsageError: an invalid key
        :raise StoreError: the store failed, refused the retention, or a conditional put kept conflicting
            with other writes
        """
        name = self._root + check_key(key)
        lock = lock_arguments(retention)
        if not isinstance(data, bytes):
            data = bytes(data)  # botocore's checksums and retries want bytes
        if not if_absent:
            try:
                self._client.put_object(Bucket=self._bucket, Key=name, Body=data, **lock)
            except ClientError as err:
                if lock and _status(err) == 400:
                    raise self._lock_refused(f"put of {key!r}", err, retention) from err
                raise self._store_error(f"put of {key!r}", err) from err
            except BotoCoreError as err:
                raise self._store_error(f"put of {key!r}", err) from err
            return True
        for attempt in range(1, self._options.conflict_attempts + 1):
            try:
                self._client.put_object(Bucket=self._bucket, Key=name, Body=data, IfNoneMatch="*", **lock)
            except ClientError as err:
                code, status = _code(err), _status(err)
                if code == "PreconditionFailed" or status == 412:
                    if _retried(err):
                        return self._holds(name, data)
                    return False
                if (code in _CONFLICT or status == 409) and attempt < self._options.conflict_attempts:
                    log.debug("put of %s to %s: conflict (%s); again", key, self._url, code)
                    _pause(attempt)
                    continue
                if lock and status == 400:
                    raise self._lock_refused(f"put of {key!r}", err, retention) from err
                raise self._store_error(f"put of {key!r}", err) from err
            except BotoCoreError as err:
                raise self._store_error(f"put of {key!r}", err) from err
            return True
        raise AssertionError("unreachable")  # pragma: no cover

    def exists(self, key: str) -> bool:
        """True when an object has that key (one HEAD request; in a missing bucket, False).

        :raise UsageError: an invalid key
        :raise StoreError: the store failed
        """
        name = self._root + check_key(key)
        try:
            self._client.head_object(Bucket=self._bucket, Key=name)
        except ClientError as err:
            if _status(err) == 404 or _code(err) in _MISSING_KEY:
                return False
            raise self._store_error(f"exists of {key!r}", err) from err
        except BotoCoreError as err:
            raise self._store_error(f"exists of {key!r}", err) from err
        return True

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix`` (pages of ListObjectsV2), with its size. Objects
        under the store's prefix whose names are no valid store key (another tool's "folder/" markers) are
        skipped.

        :raise UsageError: an invalid prefix
        :raise StoreError: the store failed (also in the middle of the listing)
        """
        full = self._root + check_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=full):
                for entry in page.get("Contents", []):
                    key = entry["Key"][len(self._root) :]
                    try:
                        check_key(key)
                    except UsageError:
                        log.debug("list of %s: skipping %r, not a store key", self._url, entry["Key"])
                        continue
                    yield StoredObject(key, int(entry["Size"]))
        except (ClientError, BotoCoreError) as err:
            raise self._store_error(f"list of {prefix!r}", err) from err

    def sync(self) -> None:
        """Nothing to do: every put was durable when it returned."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is no error.

        :raise UsageError: an invalid key
        :raise StoreError: the store failed
        """
        name = self._root + check_key(key)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=name)
        except ClientError as err:
            if _code(err) in _MISSING_KEY:
                return
            raise self._store_error(f"delete of {key!r}", err) from err
        except BotoCoreError as err:
            raise self._store_error(f"delete of {key!r}", err) from err

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove many objects, :data:`DELETE_BATCH` per DeleteObjects request; missing ones are no error.

        :raise UsageError: an invalid key
        :raise StoreError: the store failed, or refused to delete one of them (the first is named)
        """
        names = [self._root + check_key(key) for key in keys]
        for start in range(0, len(names), DELETE_BATCH):
            batch: list[ObjectIdentifierTypeDef] = [{"Key": n} for n in names[start : start + DELETE_BATCH]]
            try:
                answer = self._client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as err:
                raise self._store_error(f"delete of {len(batch)} objects", err) from err
            failed = [e for e in answer.get("Errors", []) if e.get("Code") not in _MISSING_KEY]
            if failed:
                first = failed[0]
                raise StoreError(
                    f"S3 refused to delete {len(failed)} of {len(batch)} objects in {self._url}; first: "
                    f"{first.get('Key', '')[len(self._root) :]!r}: {first.get('Code', '')} "
                    f"{_one_line(str(first.get('Message', '')))}",
                    hint="check that the credentials may delete under this prefix",
                )

    def create_bucket(self) -> bool:
        """Create the bucket (in the client's region); for tests and benchmarks, vmsnap itself never does.

        :return: True when created, False when it existed and is ours
        :raise StoreError: S3 refused (the name is taken by another account, no permission, …)
        """
        region = self._client.meta.region_name
        try:
            if region and region != "us-east-1":
                location = cast("BucketLocationConstraintType", region)
                self._client.create_bucket(
                    Bucket=self._bucket, CreateBucketConfiguration={"LocationConstraint": location}
                )
            else:
                self._client.create_bucket(Bucket=self._bucket)
        except ClientError as err:
            if _code(err) == "BucketAlreadyOwnedByYou":
                return False
            raise self._store_error("create of the bucket", err) from err
        except BotoCoreError as err:
            raise self._store_error("create of the bucket", err) from err
        return True

    def close(self) -> None:
        """Close the client's connections (the store must not be used afterwards)."""
        self._client.close()

    def _make_client(self) -> S3Client:
        options = self._options
        config = Config(
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            retries={"mode": options.retry_mode, "max_attempts": options.max_attempts},
            max_pool_connections=options.max_pool_connections,
            # the body is checked by its CRC32C header (_put_checksum) instead of a sha256 in the signature,
            # which botocore computes on plain-HTTP endpoints (0.7 CPU s per GiB here)
            s3={"payload_signing_enabled": False} if _CRC32C else None,
        )
        try:
            session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
            return session.client("s3", endpoint_url=options.endpoint_url, config=config)
        except ProfileNotFound as err:
            profile = options.profile or os.environ.get("AWS_PROFILE", "")
            raise StoreError(
                f"AWS profile {profile!r} not found for {self._url}",
                hint="name a profile of ~/.aws/config (or AWS_CONFIG_FILE), or unset AWS_PROFILE",
            ) from err
        except (BotoCoreError, ValueError) as err:
            raise StoreError(
                f"cannot set up the S3 client for {self._url}: {_one_line(str(err))}",
                hint="check AWS_ENDPOINT_URL, AWS_REGION and the profile in ~/.aws/config",
            ) from err

    def _note_area(self, params: dict[str, object], context: dict[str, object], **_: object) -> None:
        """botocore hook (before a call's parameters are built): remember the key's area for the count."""
        name = str(params.get("Key") or params.get("Prefix") or "")
        inside = name[len(self._root) :] if name.startswith(self._root) else ""
        context["vmsnap_area"] = inside.split("/", 1)[0]

    def _count_request(self, request: object, operation_name: str, **_: object) -> None:
        """botocore hook (each attempt of each request, retries included): count it."""
        context = getattr(request, "context", None) or {}
        area = str(context.get("vmsnap_area", ""))
        self.requests.add(operation_name, area)
        PROCESS_REQUESTS.add(operation_name, area)

    def _holds(self, name: str, data: bytes) -> bool:
        """After a resent conditional put got 412: True when the object holds exactly ``data`` (then it was
        most likely our first attempt that wrote it; for a same-content writer, it makes no difference)."""
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=name)
            try:
                return response["Body"].read() == data
            finally:
                response["Body"].close()
        except ClientError as err:
            if _code(err) in _MISSING_KEY:
                return False  # deleted meanwhile: it existed when the put was refused
            raise self._store_error(f"read-back of {name!r}", err) from err
        except BotoCoreError as err:
            raise self._store_error(f"read-back of {name!r}", err) from err

    @property
    def _attempts(self) -> str:
        count = self._options.max_attempts
        return f"{count} attempt{'s' if count > 1 else ''}"

    def _store_error(self, action: str, err: ClientError | BotoCoreError) -> StoreError:
        """One line saying what failed, and what to do."""
        where = f"{self._url} at {self._endpoint}"
        if isinstance(err, ClientError):
            code, status = _code(err), _status(err)
            if code == "NoSuchBucket":
                return StoreError(
                    f"S3 bucket {self._bucket!r} does not exist at {self._endpoint}",
                    hint=f"create it first (aws s3 mb s3://{self._bucket}), or correct the repository URL",
                )
            if code in _REFUSED or status in (401, 403):
                return StoreError(
                    f"S3 refused the credentials for {action} in {where} ({code or f'HTTP {status}'})",
                    hint="check AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (~/.aws/credentials), "
                    "and that they may list, read, write and delete under this prefix",
                )
            message = _one_line(str(err.response.get("Error", {}).get("Message", "")))
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                hint = f"the server kept failing over {self._options.max_attempts} attempts; check its health"
            elif code in _CONFLICT or status == 409:
                hint = "other writes to this key kept conflicting; retry later"
            else:
                hint = "see the server's error code; run with --debug for the request"
            detail = f": {message}" if message else ""
            return StoreError(
                f"S3 {action} in {where} failed: {code or 'HTTP error'} (HTTP {status}){detail}", hint=hint
            )
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"no complete AWS credentials for {self._url}",
                hint="set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add them to "
                "~/.aws/credentials",
            )
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
            return StoreError(
                f"cannot reach the S3 endpoint {self._endpoint} for {action} in {self._url} "
                f"(after {self._attempts})",
                hint="check AWS_ENDPOINT_URL (or endpoint_url in ~/.aws/config), the network, and that the "
                "server runs",
            )
        if isinstance(err, ReadTimeoutError):
            return StoreError(
                f"the S3 endpoint {self._endpoint} did not answer within {self._options.read_timeout:g} s "
                f"for {action} in {self._url} (after {self._attempts})",
                hint="check that the server is healthy, or raise read_timeout",
            )
        return StoreError(
            f"S3 {action} in {where} failed: {type(err).__name__}: {_one_line(str(err))}",
            hint="check the network and the server; run with --debug for the request",
        )


def _check_bucket(bucket: str) -> str:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(
            f"invalid S3 bucket name {bucket!r}",
            hint="3 to 63 characters: lower-case letters, digits, '.' and '-', starting and ending with a "
            "letter or digit",
        )
    return bucket


def _check_root(prefix: str) -> str:
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except UsageError as err:
            raise UsageError(
                f"invalid S3 prefix {prefix!r}",
                hint="'/'-separated names of letters, digits, '.', '_', '+' and '-'",
            ) from err
    return prefix


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _retried(err: ClientError) -> bool:
    return int(err.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def _pause(attempt: int) -> None:
    """Full-jitter backoff: a random pause of up to 0.05 s * 2**attempt, at most 2 s."""
    time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))  # noqa: S311 - jitter, not a secret


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _scrub(text: str) -> str:
    """``text`` without any ``user:password@`` a URL in it might carry."""
    return _USERINFO.sub("//", text)


def _one_line(text: str) -> str:
    return _scrub(" ".join(text.split()))
