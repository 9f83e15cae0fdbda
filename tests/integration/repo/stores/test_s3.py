"""S3Store keeps the Store contract against a real SeaweedFS (tests/integration/s3/seaweed.py), and fails
clearly: refused credentials, a missing bucket, an endpoint that is down or silent, the server killed in the
middle of a put — always one line, never a secret (also not in repr or in DEBUG logs)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.integration.repo.stores.contract import StoreContract
from tests.integration.repo.stores.store_worker import seeded_bytes
from tests.integration.s3.fixtures import BUCKET, StoreFactory
from tests.integration.s3.seaweed import (
    NO_CREDENTIALS_PROFILE,
    READER_PROFILE,
    UNKNOWN_KEY_PROFILE,
    WRONG_SECRET_PROFILE,
    SeaweedServer,
)
from tests.parallel import free_port
from vmsnap.errors import NotFoundError, StoreError, UsageError
from vmsnap.repo.stores import open_store
from vmsnap.repo.stores.s3 import S3Options, S3Store

FAST_FAIL = S3Options(connect_timeout=1.0, read_timeout=1.0, max_attempts=2)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens, and that no other test (worker, run) is handed."""
    return free_port()


def one_line_without_secrets(err: BaseException, server: SeaweedServer) -> str:
    text = str(err)
    assert "\n" not in text, text
    for secret in server.secret_keys():
        assert secret not in text and secret not in repr(err), "a secret key leaked into an error"
    return text


class TestS3Store(StoreContract):
    @pytest.fixture
    def store(self, s3_store_factory: StoreFactory) -> S3Store:
        return s3_store_factory()

    @pytest.fixture
    def store_location(self, store: S3Store) -> str:
        return store.url

    @pytest.fixture
    def child_env(self, s3_env: SeaweedServer) -> dict[str, str]:
        return s3_env.env()

    @pytest.fixture
    def unreachable_store(self, s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Store]:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        store = S3Store.from_url(f"s3://{BUCKET}/unreachable", options=FAST_FAIL, check=False)
        yield store
        store.close()


# --------------------------------------------------------------------------------------- naming, prefixes


def test_url_and_repr_name_bucket_prefix_and_endpoint_only(
    s3_store_factory: StoreFactory, s3_prefix: str, seaweed: SeaweedServer
) -> None:
    store = s3_store_factory()
    assert store.url == f"s3://{BUCKET}/{s3_prefix}"
    assert repr(store) == f"S3Store('s3://{BUCKET}/{s3_prefix}', endpoint='{seaweed.endpoint_url}')"
    assert seaweed.admin.access_key not in repr(store)
    assert s3_store_factory(prefix="").url == f"s3://{BUCKET}"


def test_prefixes_keep_stores_apart(s3_store_factory: StoreFactory, s3_prefix: str) -> None:
    left = s3_store_factory(prefix=f"{s3_prefix}/left")
    right = s3_store_factory(prefix=f"{s3_prefix}/right/")
    parent = s3_store_factory(prefix=s3_prefix)
    left.put("vmsnap-repo.json", b"{}")
    assert not right.exists("vmsnap-repo.json")
    assert list(right.list()) == []
    assert {o.key for o in parent.list()} == {"left/vmsnap-repo.json"}
    assert parent.get("left/vmsnap-repo.json") == b"{}"


def test_list_skips_objects_that_are_no_store_keys(s3_store_factory: StoreFactory, s3_prefix: str) -> None:
    """Another tool's folder markers and odd names under the prefix are not the store's objects."""
    store = s3_store_factory()
    client = boto3.session.Session().client("s3")
    try:
        for name in (f"{s3_prefix}/folder/", f"{s3_prefix}/with space", f"{s3_prefix}/.hidden"):
            client.put_object(Bucket=BUCKET, Key=name, Body=b"foreign")
    finally:
        client.close()
    store.put("folder/real", b"mine")
    assert {o.key for o in store.list()} == {"folder/real"}


def test_open_store_opens_an_s3_url(s3_env: SeaweedServer, s3_prefix: str) -> None:
    store = open_store(f"s3://{BUCKET}/{s3_prefix}")
    assert isinstance(store, S3Store)
    assert store.put("k", b"v") is True and store.get("k") == b"v"


@pytest.mark.parametrize(
    "url",
    ["s3://", "s3:///prefix", "s3://Upper_Case/x", "s3://ab/x", "s3://ok-bucket/../x", "s3://ok-bucket/a//b"],
)
def test_malformed_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        S3Store.from_url(url, check=False)


# ---------------------------------------------------------------------------------------- refused, missing


@pytest.mark.parametrize(
    ("profile", "code"),
    [(WRONG_SECRET_PROFILE, "SignatureDoesNotMatch"), (UNKNOWN_KEY_PROFILE, "InvalidAccessKeyId")],
)
def test_refused_credentials_fail_the_open_in_one_line(
    s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch, s3_prefix: str, profile: str, code: str
) -> None:
    monkeypatch.setenv("AWS_PROFILE", profile)
    with pytest.raises(StoreError) as caught:
        S3Store.from_url(f"s3://{BUCKET}/{s3_prefix}")
    text = one_line_without_secrets(caught.value, s3_env)
    assert "refused the credentials" in text and code in text, text
    assert "AWS_PROFILE" in caught.value.hint


def test_an_identity_without_write_permission_is_refused_on_put(
    s3_store_factory: StoreFactory, s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch, s3_prefix: str
) -> None:
    s3_store_factory().put("written-by-admin", b"data")
    monkeypatch.setenv("AWS_PROFILE", READER_PROFILE)
    reader = s3_store_factory()  # list is allowed: the open's check passes
    assert reader.get("written-by-admin") == b"data"
    for if_absent in (False, True):
        with pytest.raises(StoreError) as caught:
            reader.put("mine", b"x", if_absent=if_absent)
        assert "AccessDenied" in one_line_without_secrets(caught.value, s3_env)


def test_missing_credentials_say_where_to_put_them(
    s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch, s3_prefix: str
) -> None:
    monkeypatch.setenv("AWS_PROFILE", NO_CREDENTIALS_PROFILE)
    with pytest.raises(StoreError) as caught:
        S3Store.from_url(f"s3://{BUCKET}/{s3_prefix}")
    assert "no complete AWS credentials" in one_line_without_secrets(caught.value, s3_env)


def test_an_unknown_profile_is_a_store_error(s3_env: SeaweedServer) -> None:
    with pytest.raises(StoreError, match="profile"):
        S3Store(BUCKET, options=S3Options(profile="vmsnap-no-such-profile"))


def test_a_missing_bucket_fails_the_open_and_every_call(
    s3_store_factory: StoreFactory, s3_env: SeaweedServer
) -> None:
    with pytest.raises(StoreError) as caught:
        s3_store_factory(bucket="vmsnap-no-such-bucket")
    text = one_line_without_secrets(caught.value, s3_env)
    assert "'vmsnap-no-such-bucket' does not exist" in text and "aws s3 mb" in text, text
    unchecked = s3_store_factory(bucket="vmsnap-no-such-bucket", check=False)
    for call in (
        lambda: unchecked.get("k"),
        lambda: unchecked.put("k", b"x"),
        lambda: unchecked.put("k", b"x", if_absent=True),
        lambda: list(unchecked.list()),
    ):
        with pytest.raises(StoreError, match="does not exist") as caught:
            call()
        assert not isinstance(caught.value, NotFoundError)
    assert unchecked.exists("k") is False  # HEAD answers a bare 404: documented


# ------------------------------------------------------------------------------------- endpoint down, silent


def test_an_endpoint_that_refuses_connections_fails_in_one_line(
    s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # the chain: env beats the profile
    with pytest.raises(StoreError) as caught:
        S3Store.from_url(f"s3://{BUCKET}/x", options=FAST_FAIL)
    text = one_line_without_secrets(caught.value, s3_env)
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in text and "2 attempts" in text, text
    assert "AWS_ENDPOINT_URL" in caught.value.hint


@pytest.mark.timeout(60)
def test_an_endpoint_that_never_answers_fails_after_the_read_timeout(
    s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts connections and then says nothing: each attempt ends at read_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepted: the kernel completes the handshakes, nobody answers
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        options = S3Options(connect_timeout=1.0, read_timeout=0.5, max_attempts=2)
        with pytest.raises(StoreError) as caught:
            S3Store.from_url(f"s3://{BUCKET}/x", options=options)
    text = one_line_without_secrets(caught.value, s3_env)
    assert "did not answer within 0.5 s" in text and "2 attempts" in text, text


# -------------------------------------------------------------------------------------------- secrets


def test_no_secret_in_repr_errors_or_debug_logs(
    s3_store_factory: StoreFactory,
    s3_env: SeaweedServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = s3_store_factory()
    store.put("a", b"x")
    store.put("a", b"y", if_absent=True)
    store.get("a")
    list(store.list())
    with pytest.raises(NotFoundError):
        store.get("missing")
    texts = [repr(store), store.url]
    for profile in (WRONG_SECRET_PROFILE, UNKNOWN_KEY_PROFILE):
        monkeypatch.setenv("AWS_PROFILE", profile)
        with pytest.raises(StoreError) as caught:
            s3_store_factory()
        texts += [str(caught.value), repr(caught.value), caught.value.hint]
    assert caplog.records, "nothing was logged at DEBUG: the check below would prove nothing"
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    for secret in s3_env.secret_keys():
        assert all(secret not in text for text in texts)
        assert secret not in logged


# ---------------------------------------------------------------------------------- server killed mid-put


@pytest.mark.timeout(180)
def test_a_server_killed_mid_put_and_restarted(own_seaweed: SeaweedServer, tmp_path: Path) -> None:
    """SIGKILL the whole server while a 64 MiB put is in flight: the put fails in one line (or had
    finished), nothing half-written is visible after the restart, and the next puts succeed."""
    options = S3Options(connect_timeout=1.0, read_timeout=5.0, max_attempts=2)
    store = S3Store.from_url(f"s3://{BUCKET}/crash", options=options)
    big = seeded_bytes(64 * 1024 * 1024, 64)
    outcome: list[object] = []
    started = threading.Event()

    def put() -> None:
        started.set()
        try:
            outcome.append(store.put("chunks/big", big))
        except StoreError as err:
            outcome.append(err)

    writer = threading.Thread(target=put)
    writer.start()
    started.wait()
    threading.Event().wait(0.1)  # let the request get under way
    own_seaweed.kill()
    writer.join(120)
    assert not writer.is_alive()
    if isinstance(outcome[0], StoreError):
        one_line_without_secrets(outcome[0], own_seaweed)
    else:
        assert outcome == [True]

    own_seaweed.restart()
    after = S3Store.from_url(f"s3://{BUCKET}/crash", options=options)
    listed = {o.key: o.size for o in after.list()}
    if after.exists("chunks/big"):
        assert after.get("chunks/big") == big, "a partial object is visible after the restart"
        assert listed == {"chunks/big": len(big)}
    else:
        assert listed == {}
    assert after.put("chunks/next", big[:1000]) is True
    assert after.put("chunks/big", big, if_absent=True) is ("chunks/big" not in listed)
    assert after.get("chunks/big") == big and after.get("chunks/next") == big[:1000]
    store.close()
    after.close()
    print(f"the killed put: {type(outcome[0]).__name__}; after restart: {sorted(listed)}")


def test_aws_chain_variables_of_the_developer_do_not_leak_into_tests(s3_env: SeaweedServer) -> None:
    """The fixtures remove AWS_* variables that would beat the test profile (a real AWS key of a developer
    must never be sent to the test server, nor a request to AWS be made)."""
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_ENDPOINT_URL" not in os.environ
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
