"""pytest fixtures around :mod:`tests.integration.s3.seaweed`; a conftest imports the ones its tests use.

- ``seaweed`` (session): one SeaweedFS for the whole run (~4 s to start), with the bucket ``BUCKET``;
- ``s3_env``: this test's AWS chain pointed at it (profile ``vmsnap-test``, through monkeypatch);
- ``s3_store_factory``: ``S3Store``\\ s on a prefix of their own per test, closed afterwards;
- ``own_seaweed``: a SeaweedFS of the test's own, for tests that kill or restart the server.

A missing ``weed`` binary fails the tests instead of skipping them: a skip would hide that S3 is untested.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.repo.stores.s3 import S3Options, S3Store

BUCKET = "vmsnap-test"
"""The bucket every test on the shared server uses (each under a prefix of its own)."""

SESSION_STOP_GRACE = 3.0
"""The shared server's data is thrown away: a clean stop (~17 s) buys nothing, so SIGKILL follows soon."""

StoreFactory = Callable[..., S3Store]


_shared: dict[str, SeaweedServer] = {}
_users: list[int] = [0]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """The run's SeaweedFS (stopped by pid at the end of the session), with the bucket :data:`BUCKET`.

    Each conftest that imports this fixture makes pytest see a fixture of its own; the server is shared
    among them all the same (started by the first, stopped after the last).
    """
    server = _shared.get("server")
    if server is None:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
        try:
            server.start()
            with pytest.MonkeyPatch.context() as patch:
                server.apply_env(patch.setenv, patch.delenv)
                _create_bucket()
        except BaseException:
            server.stop(SESSION_STOP_GRACE)
            raise
        _shared["server"] = server
    _users[0] += 1
    try:
        yield server
    finally:
        _users[0] -= 1
        if _users[0] == 0:
            _shared.clear()
            server.stop(SESSION_STOP_GRACE)


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    """The shared server, with this test's AWS chain (env) pointed at it as the admin identity."""
    seaweed.apply_env(monkeypatch.setenv, monkeypatch.delenv)
    return seaweed


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix no other test (of this run or another on the same server) uses."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60].strip("-") or "test"
    return f"t/{name}-{secrets.token_hex(4)}"


@pytest.fixture
def s3_store_factory(s3_env: SeaweedServer, s3_prefix: str) -> Iterator[StoreFactory]:
    """``factory(prefix=None, options=None, bucket=BUCKET, check=True)``: an S3Store on the shared server,
    under this test's prefix unless told otherwise; every store made is closed after the test."""
    made: list[S3Store] = []

    def factory(
        prefix: str | None = None, options: S3Options | None = None, bucket: str = BUCKET, check: bool = True
    ) -> S3Store:
        url = f"s3://{bucket}/{s3_prefix if prefix is None else prefix}"
        store = S3Store.from_url(url, options=options, check=check)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture
def own_seaweed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedServer]:
    """A SeaweedFS for this test alone (it may kill and restart it), with the bucket :data:`BUCKET`, and
    this test's AWS chain pointed at it."""
    server = SeaweedServer(tmp_path / "seaweed")
    try:
        server.start()
        server.apply_env(monkeypatch.setenv, monkeypatch.delenv)
        _create_bucket()
        yield server
    finally:
        server.stop(SESSION_STOP_GRACE)


def _create_bucket() -> None:
    store = S3Store(BUCKET)
    try:
        store.create_bucket()
    finally:
        store.close()
