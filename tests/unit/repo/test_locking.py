"""The lock policy of a locked repository, its place in the marker, and which objects the chunks layout
locks for how long; the ``--as-of`` time forms."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from vmsnap.errors import RepositoryError, UsageError
from vmsnap.repo.chunks.retain import is_mutable, is_write_once, retention_rule
from vmsnap.repo.layout import layout_class
from vmsnap.repo.locking import DAY, LockPolicy, parse_days, parse_mode
from vmsnap.repo.marker import RepoMarker
from vmsnap.repo.stores.history import before, check_past, format_time, parse_time, split_as_of, with_as_of


def test_a_policy_is_checked_and_its_chunks_are_locked_longer() -> None:
    policy = LockPolicy.of(30)
    assert (policy.mode, policy.days, policy.extend_days) == ("compliance", 30.0, 7.0)
    assert policy.seconds == 30 * DAY and policy.chunk_seconds == 37 * DAY
    assert LockPolicy.of("0.5", "GOVERNANCE").extend_days == 0.5  # at most as long as the lock itself
    assert LockPolicy.of(1, "governance", 3).describe() == "GOVERNANCE, 1 day"
    assert LockPolicy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    for bad in ("0", "-1", "nan", "inf", "x", "36501"):
        with pytest.raises(UsageError, match="a lock lasts more than 0"):
            parse_days(bad)
    with pytest.raises(UsageError, match="compliance and governance"):
        parse_mode("legal-hold")
    with pytest.raises(ValueError, match="lock"):
        LockPolicy.from_json({"mode": "compliance", "days": 0, "extend_days": 1})


def test_the_marker_records_the_policy_and_only_a_layout_that_locks_accepts_it() -> None:
    policy = LockPolicy.of(7, "governance")
    chunks = layout_class("chunks")
    marker = chunks.new_marker(lock=policy)
    raw = json.dumps(marker.to_json()).encode()
    assert RepoMarker.from_bytes(raw, where="m").lock == policy
    assert chunks.accept_marker(RepoMarker.from_bytes(raw, where="m")).lock == policy
    assert "lock" not in chunks.new_marker().to_json()  # an unlocked repository's marker is as before
    with pytest.raises(UsageError, match="the qcow2 layout cannot be locked"):
        layout_class("qcow2").new_marker(lock=policy)
    qcow2 = json.loads(raw) | {"layout": "qcow2", "chunk_size": None, "compression": None}
    with pytest.raises(ValueError, match="cannot keep"):
        layout_class("qcow2").accept_marker(RepoMarker.from_bytes(json.dumps(qcow2).encode(), where="m"))
    broken = json.loads(raw) | {"lock": {"mode": "forever", "days": 1, "extend_days": 1}}
    with pytest.raises(RepositoryError, match="is damaged"):
        RepoMarker.from_bytes(json.dumps(broken).encode(), where="m")


def test_which_objects_are_locked_and_for_how_long() -> None:
    policy = LockPolicy.of(10, extend_days=2)
    rule = retention_rule(policy)
    chunk = "chunks/abcd/" + "abcd" + "0" * 60
    assert rule(chunk) == rule("vmsnap-repo.json") == 12 * DAY
    for own in ("vms/vm1/20261207T000000.000000Z-abcd/disk0.index", "vms/vm1/20261207T000000.000000Z-abcd/x"):
        assert rule(own) == 10 * DAY and is_write_once(own)
    for mutable in ("locks/gc", "locks/vms/vm1", "locks/readers/abc", "gc-generation", "known-chunks-epoch",
                    "vms/vm1/needs-full"):  # fmt: skip
        assert rule(mutable) is None and is_mutable(mutable) and not is_write_once(mutable)
    assert is_write_once(chunk) and is_write_once("vmsnap-repo.json")


def test_as_of_times_and_locations() -> None:
    moment = parse_time("2026-12-07T21:30:00Z")
    assert moment == dt.datetime(2026, 12, 7, 21, 30, tzinfo=dt.UTC)
    assert parse_time("2026-12-07T21:30:00.250+00:00").microsecond == 250000
    assert format_time(moment) == "2026-12-07T21:30:00Z" and before(moment) == "2026-12-07T21:29:59Z"
    assert with_as_of("s3://b/p", moment) == "s3://b/p?as-of=2026-12-07T21:30:00Z"
    assert split_as_of("s3://b/p?as-of=2026-12-07T21:30:00Z") == ("s3://b/p", moment)
    assert split_as_of("s3://b/p") == ("s3://b/p", None) and with_as_of("s3://b/p", None) == "s3://b/p"
    for bad in ("2026-12-07", "2026-12-07T21:30:00", "2026-12-07T21:30:00+01:00", "now"):
        with pytest.raises(UsageError, match="ISO 8601 UTC"):
            parse_time(bad)
    with pytest.raises(UsageError, match="in the future"):
        check_past(moment, now=moment - dt.timedelta(seconds=1))
    assert check_past(moment, now=moment) == moment
