"""Object versions and Object Lock of an S3 bucket, for :class:`~vmsnap.repo.stores.s3.S3Store` (a mixin
of it, kept apart from its transfer code).

What vmsnap asks of the server, and the requests it costs (all of them counted in ``S3Store.requests``):

- :meth:`S3Versions.locking`: GetBucketVersioning and GetObjectLockConfiguration (two requests; a bucket
  without Object Lock answers ``ObjectLockConfigurationNotFoundError``).
- a put with a :class:`~vmsnap.repo.stores.base.Retention`: the same PutObject with the headers
  ``x-amz-object-lock-mode`` and ``x-amz-object-lock-retain-until-date`` (no extra request).
- :meth:`S3Versions.extend_retention`: one PutObjectRetention per key (S3 has no batch form; AWS's S3 Batch
  Operations is a separate, AWS-only service), sent on :data:`EXTEND_WORKERS` threads. A server refuses to
  move a date earlier (AccessDenied, in both modes without a bypass): such a refusal is checked with one
  HeadObject, and a version locked as far or further already counts as extended.
- :meth:`S3Versions.list_versions`: ListObjectVersions, 1000 versions a request. The delete markers and the
  versions of a key come newest first in the answer's XML, but boto3 parses them into two lists; their
  order is taken from the XML itself, so a delete marker and a version written in the same second (servers
  list seconds) keep their order.
- :meth:`S3Versions.get_version` (GetObject ``versionId``), :meth:`S3Versions.retention` (HeadObject
  ``versionId``: ``x-amz-object-lock-mode`` and ``…-retain-until-date``), :meth:`S3Versions.delete_versions`
  (DeleteObjects with version ids, 1000 a request; a locked version is refused with AccessDenied).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from botocore.exceptions import BotoCoreError, ClientError

from vmsnap.errors import NotFoundError, StoreError, UsageError
from vmsnap.repo.stores.base import (
    BucketLocking,
    ObjectVersion,
    Retention,
    check_key,
    check_prefix,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.literals import ObjectLockRetentionModeType
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

EXTEND_WORKERS = 16
"""PutObjectRetention requests in flight at once."""
DELETE_BATCH = 1000
"""Versions per DeleteObjects request (S3's maximum)."""
_ORDER = "VmsnapOrder"
_GONE = frozenset({"NoSuchKey", "NoSuchVersion", "404", "NotFound", "MethodNotAllowed", "405"})
_NO_LOCK_CONFIG = frozenset({"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"})


def lock_arguments(retention: Retention | None) -> dict[str, Any]:
    """The PutObject arguments that lock the new version (none without a retention)."""
    if retention is None:
        return {}
    return {
        "ObjectLockMode": cast("ObjectLockRetentionModeType", retention.mode.upper()),
        "ObjectLockRetainUntilDate": retention.until,
    }


def _parse_retention(mode: object, until: object) -> Retention | None:
    if not mode or not isinstance(until, dt.datetime):
        return None
    name = str(mode).lower()
    if name not in ("compliance", "governance"):
        return None
    return Retention("compliance" if name == "compliance" else "governance", until.astimezone(dt.UTC))


def _record_order(http_response: Any, parsed: dict[str, Any], **_: object) -> None:
    """botocore hook after ListObjectVersions: the (kind, key, version id) of every entry in the XML's order
    (botocore's parse splits versions and delete markers into two lists)."""
    try:
        # the body botocore has just parsed with this same parser; expat >= 2.4 refuses entity expansion bombs
        root = ElementTree.fromstring(http_response.content)  # noqa: S314
    except ElementTree.ParseError:
        return
    encoded = any(child.tag.rsplit("}", 1)[-1] == "EncodingType" for child in root)
    order = []
    for child in root:
        kind = child.tag.rsplit("}", 1)[-1]
        if kind not in ("Version", "DeleteMarker"):
            continue
        fields = {grand.tag.rsplit("}", 1)[-1]: grand.text or "" for grand in child}
        key = fields.get("Key", "")
        order.append((kind, unquote(key) if encoded else key, fields.get("VersionId", "null")))
    parsed[_ORDER] = order


class S3Versions:
    """Versions and locks of :class:`~vmsnap.repo.stores.s3.S3Store` (see the module docstring)."""

    _client: S3Client
    _bucket: str
    _root: str
    _url: str
    _endpoint: str
    _hooked: bool = False
    _hook_lock = threading.Lock()

    def _store_error(self, action: str, err: ClientError | BotoCoreError) -> StoreError:
        raise NotImplementedError  # S3Store's

    def locking(self) -> BucketLocking:
        """The bucket's versioning and Object Lock configuration (two requests).

        :raise StoreError: the server failed, or refused to say (the credentials need
            s3:GetBucketVersioning and s3:GetBucketObjectLockConfiguration)
        """
        try:
            versioning = self._client.get_bucket_versioning(Bucket=self._bucket).get("Status") == "Enabled"
        except (ClientError, BotoCoreError) as err:
            raise self._store_error("a read of the bucket's versioning", err) from err
        try:
            answer = self._client.get_object_lock_configuration(Bucket=self._bucket)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code", "")) in _NO_LOCK_CONFIG:
                return BucketLocking(versioning, False, None)
            raise self._store_error("a read of the bucket's Object Lock configuration", err) from err
        except BotoCoreError as err:
            raise self._store_error("a read of the bucket's Object Lock configuration", err) from err
        config = answer.get("ObjectLockConfiguration", {})
        enabled = config.get("ObjectLockEnabled") == "Enabled"
        rule = config.get("Rule", {}).get("DefaultRetention")
        default = None
        if rule:
            span = f"{rule['Days']} days" if rule.get("Days") else f"{rule.get('Years', '?')} years"
            default = f"{rule.get('Mode', '?')}, {span}"
        return BucketLocking(versioning, enabled, default)

    def _hook(self) -> None:
        with self._hook_lock:
            if not self._hooked:
                self._client.meta.events.register("after-call.s3.ListObjectVersions", _record_order)
                self._hooked = True

    def list_versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        """Every version and delete marker under ``prefix`` (keys ascending, each key's newest first);
        objects whose names are no store key are skipped.

        :raise UsageError: an invalid prefix
        :raise StoreError: the server failed (also in the middle of the listing)
        """
        self._hook()
        full = self._root + check_prefix(prefix)
        arguments: dict[str, Any] = {"Bucket": self._bucket, "Prefix": full}
        try:
            while True:
                page = cast(dict[str, Any], self._client.list_object_versions(**arguments))
                yield from self._page_versions(page)
                if not page.get("IsTruncated"):
                    return
                arguments["KeyMarker"] = page.get("NextKeyMarker", "")
                if page.get("NextVersionIdMarker"):
                    arguments["VersionIdMarker"] = page["NextVersionIdMarker"]
                else:
                    arguments.pop("VersionIdMarker", None)
        except (ClientError, BotoCoreError) as err:
            raise self._store_error(f"list of the versions under {prefix!r}", err) from err

    def _page_versions(self, page: dict[str, Any]) -> Iterator[ObjectVersion]:
        found: dict[tuple[str, str], tuple[bool, dict[str, Any]]] = {}
        for entry in page.get("Versions", []):
            found[(entry["Key"], str(entry.get("VersionId", "null")))] = (False, entry)
        for entry in page.get("DeleteMarkers", []):
            found[(entry["Key"], str(entry.get("VersionId", "null")))] = (True, entry)
        order = [(key, version) for _, key, version in page.get(_ORDER, [])]
        if set(order) != set(found):  # no XML order to be had: by key, then newest first
            log.debug("list of versions of %s: ordering by time", self._url)
            order = sorted(found, key=lambda k: (k[0], -found[k][1]["LastModified"].timestamp()))
        for key_version in order:
            deleted, entry = found[key_version]
            name = str(entry["Key"])
            key = name[len(self._root) :] if name.startswith(self._root) else ""
            try:
                check_key(key)
            except UsageError:
                continue
            yield ObjectVersion(
                key=key,
                version_id=key_version[1],
                modified=entry["LastModified"].astimezone(dt.UTC),
                size=0 if deleted else int(entry.get("Size", 0)),
                deleted=deleted,
                latest=bool(entry.get("IsLatest")),
                etag="" if deleted else str(entry.get("ETag", "")),
            )

    def get_version(self, key: str, version_id: str) -> bytes:
        """The bytes of one version (GetObject with its id; a body cut short is read again once).

        :raise NotFoundError: no such version, or it is a delete marker
        :raise StoreError: the server failed
        """
        name = self._root + check_key(key)
        last: Exception | None = None
        for _ in range(2):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=name, VersionId=version_id)
            except ClientError as err:
                if _gone(err):
                    raise NotFoundError(
                        f"no version {version_id} of {key!r} in {self._url}",
                        hint="it was deleted for good (its lock had ended), or it is a delete marker",
                    ) from err
                raise self._store_error(f"get of {key!r} version {version_id}", err) from err
            except BotoCoreError as err:
                raise self._store_error(f"get of {key!r} version {version_id}", err) from err
            try:
                return response["Body"].read()
            except BotoCoreError as err:
                last = err
            finally:
                response["Body"].close()
        assert isinstance(last, BotoCoreError)
        raise self._store_error(f"get of {key!r} version {version_id}", last)

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        """The lock of one version (HeadObject), None when it has none.

        :raise NotFoundError: no such object or version (or a delete marker)
        :raise StoreError: the server failed
        """
        name = self._root + check_key(key)
        try:
            if version_id is None:
                head = self._client.head_object(Bucket=self._bucket, Key=name)
            else:
                head = self._client.head_object(Bucket=self._bucket, Key=name, VersionId=version_id)
        except ClientError as err:
            if _gone(err):
                raise NotFoundError(f"no object {key!r} in {self._url}", hint="it was deleted") from err
            raise self._store_error(f"head of {key!r}", err) from err
        except BotoCoreError as err:
            raise self._store_error(f"head of {key!r}", err) from err
        return _parse_retention(head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate"))

    def extend_retention(self, keys: Sequence[str], retention: Retention) -> None:
        """Lock the current version of each key until ``retention.until`` at least: one PutObjectRetention
        each, on :data:`EXTEND_WORKERS` threads (see the module docstring for a refusal).

        :raise NotFoundError: a key has no current version (deleted, or never there); the first is named
        :raise StoreError: the server failed or refused (the first failure is raised, after the others ran)
        """
        names = [self._root + check_key(key) for key in keys]
        if not names:
            return
        missing: list[str] = []
        lock = threading.Lock()

        def extend(name: str) -> None:
            try:
                self._extend_one(name, retention)
            except NotFoundError:
                with lock:
                    missing.append(name[len(self._root) :])

        with ThreadPoolExecutor(min(EXTEND_WORKERS, len(names)), thread_name_prefix="vmsnap-lock") as pool:
            for _ in pool.map(extend, names):
                pass
        if missing:
            raise NotFoundError(
                f"{len(missing)} object(s) to keep locked are missing from {self._url}; "
                f"first: {missing[0]!r}",
                hint="they were deleted behind vmsnap's back: run `vmsnap verify`; the next backup stores "
                "them again",
            )

    def _extend_one(self, name: str, retention: Retention) -> None:
        key = name[len(self._root) :]
        mode = retention.mode
        for _ in range(2):
            try:
                self._client.put_object_retention(
                    Bucket=self._bucket,
                    Key=name,
                    Retention={
                        "Mode": cast("ObjectLockRetentionModeType", mode.upper()),
                        "RetainUntilDate": retention.until,
                    },
                )
                return
            except ClientError as err:
                if _gone(err):
                    raise NotFoundError(f"no object {key!r} in {self._url}") from err
                current = self.retention(key)  # refused: locked further already, or in the other mode?
                if current is not None and current.until >= retention.until:
                    return
                if current is None or current.mode == mode:
                    raise self._lock_refused(f"extension of the lock of {key!r}", err, retention) from err
                mode = current.mode  # keep the version's own mode: only a bypass may change it
            except BotoCoreError as err:
                raise self._store_error(f"extension of the lock of {key!r}", err) from err
        raise StoreError(
            f"S3 refused to extend the lock of {key!r} in {self._url}",
            hint="check that the credentials may s3:PutObjectRetention",
        )

    def delete_versions(self, versions: Iterable[tuple[str, str]]) -> None:
        """Delete versions for good, :data:`DELETE_BATCH` per DeleteObjects request; a missing one is no
        error.

        :raise StoreError: the server failed, or refused one (a locked version: AccessDenied); the first is
            named
        """
        items: list[ObjectIdentifierTypeDef] = [
            {"Key": self._root + check_key(key), "VersionId": version} for key, version in versions
        ]
        for start in range(0, len(items), DELETE_BATCH):
            batch = items[start : start + DELETE_BATCH]
            try:
                answer = self._client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as err:
                raise self._store_error(f"delete of {len(batch)} object versions", err) from err
            failed = [e for e in answer.get("Errors", []) if e.get("Code") not in _GONE]
            if failed:
                first = failed[0]
                raise StoreError(
                    f"S3 refused to delete {len(failed)} of {len(batch)} object versions in {self._url}; "
                    f"first: {first.get('Key', '')[len(self._root) :]!r} version {first.get('VersionId')}: "
                    f"{first.get('Code', '')}",
                    hint="a locked version cannot be deleted before its date; check the credentials may "
                    "s3:DeleteObjectVersion",
                )

    def _lock_refused(self, action: str, err: ClientError, retention: Retention | None) -> StoreError:
        """One line for a put or an extension that S3 refused while a retention was asked for."""
        code = str(err.response.get("Error", {}).get("Code", "")) or "HTTP error"
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        lock = (
            f" (Object Lock {retention.mode.upper()} until {retention.until:%Y-%m-%dT%H:%M:%SZ})"
            if (retention is not None)
            else ""
        )
        return StoreError(
            f"S3 refused the {action}{lock} in {self._url} at {self._endpoint}: {code} (HTTP {status})",
            hint="the bucket needs Object Lock (created with it), the server that mode, and the credentials "
            "s3:PutObjectRetention",
        )


def _gone(err: ClientError) -> bool:
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code in _GONE or status in (404, 405)
