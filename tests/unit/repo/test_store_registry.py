"""Stores are found by URL scheme in the ``vmsnap.stores`` entry points: a path opens the ``directory``
store, an ``s3://`` URL the ``s3`` one; an unknown scheme is one clear line, a broken plugin names what it
lacks."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from vmsnap import registry
from vmsnap.errors import PluginError, UsageError
from vmsnap.jobs.jobfile import parse_job
from vmsnap.repo.stores import (
    PATH_SCHEME,
    StoreCapabilities,
    is_url,
    known_url,
    normalize_location,
    open_store,
    scheme_of,
    store_class,
    store_schemes,
)


def test_the_two_stores_are_registered_by_scheme() -> None:
    assert {"directory", "s3"} <= set(store_schemes())
    assert PATH_SCHEME == "directory"
    assert store_class("directory").scheme == "directory"
    assert store_class("s3").scheme == "s3"
    assert store_class("s3").capabilities == StoreCapabilities(
        sharded_listing=True,
        conditional_put="server",
        batch_delete=True,
        versions=True,
        retention_locks=True,
        transfer_threads=12,
    )
    assert store_class("directory").capabilities == StoreCapabilities(reads_into=True)


def test_a_path_opens_the_directory_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "new", create=True)
    assert store.url == str(tmp_path / "new") and (tmp_path / "new").is_dir()
    assert scheme_of(tmp_path) == "directory" and not is_url(tmp_path)
    store.put("a", b"x")
    store.delete_many(["a", "b"])
    assert not store.exists("a")


@pytest.mark.parametrize(
    ("location", "scheme", "url"),
    [("s3://bucket/p", "s3", True), ("/backups", "directory", False), ("rel/dir", "directory", False)],
)
def test_scheme_of(location: str, scheme: str, url: bool) -> None:
    assert scheme_of(location) == scheme
    assert is_url(location) is url


def test_a_url_that_went_through_path_is_a_url_again() -> None:
    assert normalize_location(Path("s3://bucket/prefix")) == "s3://bucket/prefix"
    assert normalize_location("/plain/path") == "/plain/path"
    assert normalize_location("xyz:/not-a-store") == "xyz:/not-a-store"


@pytest.mark.parametrize("url", ["ftp://host/x", "file:///backups", "s4://bucket"])
def test_an_unknown_url_is_one_line_naming_the_urls_there_are(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        open_store(url)
    assert str(caught.value).startswith(f"unknown repository URL {url!r}")
    assert "use a directory path or s3://…" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not known_url(url)


def test_known_urls() -> None:
    assert known_url("s3://bucket/prefix")
    assert not known_url("s3://")
    assert not known_url("/backups")


def test_a_job_file_refuses_a_url_of_no_store() -> None:
    with pytest.raises(UsageError) as caught:
        parse_job('repository = "ftp://host/backups"\n[[vm]]\nqmp = "/run/vm1.qmp"\n')
    assert "unsupported repository URL 'ftp://host/backups'" in str(caught.value)
    assert "s3://…" in str(caught.value)
    job = parse_job('repository = "s3://bucket/vmsnap"\n[[vm]]\nqmp = "/run/vm1.qmp"\n')
    assert job.repository == "s3://bucket/vmsnap"


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, extra: list[EntryPoint]) -> None:
    real = registry.entry_points

    def patched(*, group: str) -> list[EntryPoint]:
        found = list(real(group=group))
        return found + [ep for ep in extra if ep.group == group]

    monkeypatch.setattr(registry, "entry_points", patched)
    registry.refresh()  # read them again, with the fake ones


@pytest.fixture(autouse=True)
def _entry_points_read_again() -> Iterator[None]:
    yield
    registry.refresh()  # the next test reads the real ones


def test_a_store_whose_package_is_missing_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    group = registry.STORE_GROUP
    _fake_entry_points(monkeypatch, [EntryPoint("gs", "vmsnap_no_such_package.gcs:GcsStore", group)])
    with pytest.raises(PluginError) as caught:
        open_store("gs://bucket/x")
    assert "store 'gs' cannot be loaded" in str(caught.value)
    assert "vmsnap_no_such_package" in str(caught.value)


def test_two_stores_claiming_one_scheme_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    group = registry.STORE_GROUP
    _fake_entry_points(monkeypatch, [EntryPoint("s3", "other_package.s3:OtherStore", group)])
    with pytest.raises(PluginError) as caught:
        open_store("s3://bucket/x")
    assert "two plugins claim the name 's3'" in str(caught.value)


def test_a_store_class_lacking_the_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    group = registry.STORE_GROUP
    _fake_entry_points(monkeypatch, [EntryPoint("half", "pathlib:PurePath", group)])
    with pytest.raises(PluginError) as caught:
        store_class("half")
    assert "lacks scheme, open_location, capabilities" in str(caught.value)
