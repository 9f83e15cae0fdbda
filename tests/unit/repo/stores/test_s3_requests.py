"""The requests S3Store builds and how it reads answers that a real server cannot be made to give on demand
(409 ConditionalRequestConflict, a 412 after a resent request), through botocore's own Stubber: no network."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from vmsnap.errors import StoreError
from vmsnap.repo.stores.s3 import S3Options, S3Store


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Store, Stubber]]:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNITTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = S3Options(endpoint_url="http://127.0.0.1:9", region="us-east-1", conflict_attempts=3)
    store = S3Store("bucket", "repo/one", options=options)
    with Stubber(store._client) as stubber:  # the store's one client: the seam for request-level tests
        yield store, stubber
        stubber.assert_no_pending_responses()


def _put_params(key: str, data: bytes, *, conditional: bool) -> dict[str, object]:
    params: dict[str, object] = {
        "Bucket": "bucket",
        "Key": f"repo/one/{key}",
        "Body": data,
        "ChecksumAlgorithm": "CRC32C",  # the s3 extra brings awscrt: every put carries a CRC32C
    }
    if conditional:
        params["IfNoneMatch"] = "*"
    return params


def test_a_plain_put_is_one_unconditional_put_object(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    stubber.add_response("put_object", {}, _put_params("a/b", b"x", conditional=False))
    assert store.put("a/b", b"x") is True


def test_if_absent_sends_if_none_match_and_412_means_it_existed(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    stubber.add_response("put_object", {}, _put_params("k", b"x", conditional=True))
    stubber.add_client_error(
        "put_object",
        "PreconditionFailed",
        http_status_code=412,
        expected_params=_put_params("k", b"x", conditional=True),
    )
    assert store.put("k", b"x", if_absent=True) is True
    assert store.put("k", b"x", if_absent=True) is False


def test_a_409_conflict_is_tried_again(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    params = _put_params("k", b"x", conditional=True)
    stubber.add_client_error(
        "put_object", "ConditionalRequestConflict", http_status_code=409, expected_params=params
    )
    stubber.add_client_error(
        "put_object", "ConditionalRequestConflict", http_status_code=409, expected_params=params
    )
    stubber.add_client_error("put_object", "PreconditionFailed", http_status_code=412, expected_params=params)
    assert store.put("k", b"x", if_absent=True) is False


def test_conflicts_that_go_on_end_in_one_line(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    for _ in range(3):  # conflict_attempts
        stubber.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
    with pytest.raises(StoreError, match="ConditionalRequestConflict") as caught:
        store.put("k", b"x", if_absent=True)
    assert "\n" not in str(caught.value) and "retry later" in str(caught.value)


@pytest.mark.parametrize(("stored", "written"), [(b"mine", True), (b"theirs", False)])
def test_a_412_after_a_resend_reads_the_object_back(
    stubbed: tuple[S3Store, Stubber], stored: bytes, written: bool
) -> None:
    """botocore resent the put (the first answer was lost) and got 412: the first attempt may have written."""
    store, stubber = stubbed
    stubber.add_client_error(
        "put_object", "PreconditionFailed", http_status_code=412, response_meta={"RetryAttempts": 1}
    )
    body = StreamingBody(io.BytesIO(stored), len(stored))
    stubber.add_response("get_object", {"Body": body}, {"Bucket": "bucket", "Key": "repo/one/k"})
    assert store.put("k", b"mine", if_absent=True) is written


def test_server_errors_keep_their_code_and_hint(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    stubber.add_client_error(
        "get_object", "SlowDown", "Please reduce your request rate.", http_status_code=503
    )
    with pytest.raises(StoreError) as caught:
        store.get("k")
    text = str(caught.value)
    assert "SlowDown (HTTP 503): Please reduce your request rate." in text and "check its health" in text
    assert "unit-test-secret" not in text


def test_delete_many_sends_batches_of_1000_keys(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    keys = [f"chunks/{n:04x}/{n:064x}" for n in range(1500)]
    for start, stop in ((0, 1000), (1000, 1500)):
        objects = [{"Key": f"repo/one/{k}"} for k in keys[start:stop]]
        expected = {"Bucket": "bucket", "Delete": {"Objects": objects, "Quiet": True}}
        stubber.add_response("delete_objects", {}, expected)
    store.delete_many(keys)


def test_delete_many_names_the_first_key_it_could_not_delete(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    errors = [
        {"Key": "repo/one/a", "Code": "NoSuchKey", "Message": "gone already: fine"},
        {"Key": "repo/one/b", "Code": "AccessDenied", "Message": "Access\nDenied"},
    ]
    stubber.add_response("delete_objects", {"Errors": errors})
    with pytest.raises(StoreError) as caught:
        store.delete_many(["a", "b", "c"])
    text = str(caught.value)
    assert "1 of 3 objects" in text and "'b': AccessDenied Access Denied" in text and "\n" not in text


def test_requests_are_counted_by_operation_and_area(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count hooks into botocore's request creation: every attempt that would go on the wire."""
    from botocore.awsrequest import AWSRequest

    from vmsnap.repo.stores.s3 import PROCESS_REQUESTS

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNITTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test-secret")
    store = S3Store(
        "bucket", "repo/one", options=S3Options(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    )
    before = PROCESS_REQUESTS.snapshot()
    for params, name in (
        ({"Key": "repo/one/chunks/ab/cd"}, "PutObject"),
        ({"Prefix": "repo/one/locks/"}, "ListObjectsV2"),
    ):
        context: dict[str, object] = {}
        store._note_area(params=params, context=context)
        request = AWSRequest()
        request.context = context
        store._count_request(request=request, operation_name=name)
    expected = {("PutObject", "chunks"): 1, ("ListObjectsV2", "locks"): 1}
    assert dict(store.requests.snapshot()) == expected
    assert dict(PROCESS_REQUESTS.snapshot() - before) == expected
    store.close()


def test_a_server_that_ignores_conditional_writes_is_refused(stubbed: tuple[S3Store, Stubber]) -> None:
    """Both conditional puts of the probe succeed (the second overwrote the first): no repository there."""
    store, stubber = stubbed
    stubber.add_response("put_object", {})
    stubber.add_response("put_object", {})
    stubber.add_response("delete_object", {})
    with pytest.raises(StoreError, match="ignores conditional writes"):
        store.check_conditional_writes()


def test_a_server_that_honours_conditional_writes_passes(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    stubber.add_response("put_object", {})
    stubber.add_client_error("put_object", "PreconditionFailed", http_status_code=412)
    stubber.add_response("delete_object", {})
    store.check_conditional_writes()
