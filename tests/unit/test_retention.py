"""Retention rules (vmsnap.repo.retention): borg's documented examples as tables, and hypothesis against a
model written differently (sets of periods instead of one walk)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsnap.errors import UsageError
from vmsnap.repo.retention import (
    PERIODS,
    RULES,
    RetentionPolicy,
    backup_time,
    keep_ancestors,
    plan,
)

UTC = dt.UTC


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


# -- borg's docs/misc/prune-example.txt ---------------------------------------------------------------------


def year_2015() -> list[tuple[str, dt.datetime]]:
    """One backup a day in 2015 (at 10:00), except on 2015-12-19; id = the date."""
    out = []
    day = dt.date(2015, 1, 1)
    while day.year == 2015:
        if day != dt.date(2015, 12, 19):
            out.append((day.isoformat(), at(day.year, day.month, day.day, 10)))
        day += dt.timedelta(days=1)
    return out


def test_borg_prune_example_daily14_monthly6_yearly1() -> None:
    result = plan(year_2015(), RetentionPolicy(keep_daily=14, keep_monthly=6, keep_yearly=1), tz=UTC)
    daily = [f"2015-12-{d:02d}" for d in (31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 18, 17)]
    monthly = ["2015-11-30", "2015-10-31", "2015-09-30", "2015-08-31", "2015-07-31", "2015-06-30"]
    assert result.kept_ids == (*daily, *monthly, "2015-01-01")
    assert [result.reason(d) for d in daily] == [f"daily #{n}" for n in range(1, 15)]
    assert [result.reason(m) for m in monthly] == [f"monthly #{n}" for n in range(1, 7)]
    # no earlier year: the yearly target is not met, so the oldest backup stays
    assert result.reason("2015-01-01") == "yearly[oldest] #1"
    assert len(result.removed) == 364 - 21
    assert "2015-12-19" not in result.kept_ids and "2015-12-16" in result.removed


def test_borg_prune_example_with_a_backup_on_the_19th_drops_the_17th() -> None:
    backups = [*year_2015(), ("2015-12-19", at(2015, 12, 19, 10))]
    result = plan(backups, RetentionPolicy(keep_daily=14), tz=UTC)
    assert "2015-12-19" in result.kept_ids
    assert "2015-12-17" not in result.kept_ids
    assert "2015-12-18" in result.kept_ids


# -- borg's prune_split examples (src/borg/testsuite/helpers_test.py) ----------------------------------------

SPLIT = [
    ("1", at(2015, 1, 1, 10)),
    ("2", at(2016, 1, 1, 10)),
    ("3", at(2017, 1, 1, 10)),
    ("4", at(2017, 2, 1, 10)),
    ("5", at(2017, 3, 1, 10)),
    ("6", at(2017, 3, 2, 10)),
    ("7", at(2017, 3, 3, 10)),
    ("8", at(2017, 3, 4, 10)),
    ("9", at(2017, 10, 1, 9, 45)),
    ("10", at(2017, 10, 1, 9, 55)),
    ("11", at(2017, 10, 1, 10, 0, 1)),
    ("12", at(2017, 10, 1, 10, 0, 3)),
    ("13", at(2017, 10, 1, 10, 0, 5)),
]


@pytest.mark.parametrize(
    ("field", "count", "expected"),
    [
        ("keep_yearly", 3, {"13", "2", "1"}),
        ("keep_monthly", 3, {"13", "8", "4"}),
        ("keep_weekly", 2, {"13", "8"}),
        ("keep_daily", 3, {"13", "8", "7"}),
        ("keep_hourly", 3, {"13", "10", "8"}),
        ("keep_last", 4, {"13", "12", "11", "10"}),
    ],
)
def test_borg_prune_split_examples(field: str, count: int, expected: set[str]) -> None:
    result = plan(SPLIT, RetentionPolicy(**{field: count}), tz=UTC)
    assert set(result.kept_ids) == expected
    rule = field.removeprefix("keep_")
    assert all(k.rule == rule for k in result.kept)


def test_borg_keep_oldest_only_when_the_target_is_not_met() -> None:
    backups = [
        ("1", at(2018, 1, 1, 10)),  # oldest, not the last of its year
        ("2", at(2018, 12, 30, 10)),
        ("3", at(2018, 12, 31, 10)),
        ("4", at(2019, 12, 31, 10)),
    ]
    three = plan(backups, RetentionPolicy(keep_yearly=3), tz=UTC)
    assert set(three.kept_ids) == {"1", "3", "4"}
    assert three.reason("1") == "yearly[oldest] #3"
    assert three.reason("3") == "yearly #2"
    two = plan(backups, RetentionPolicy(keep_yearly=2), tz=UTC)
    assert set(two.kept_ids) == {"3", "4"}
    assert plan([], RetentionPolicy(keep_yearly=3)).kept == ()


def test_keep_last_is_per_second_as_in_borg() -> None:
    backups = [
        ("a", at(2020, 1, 1, 0, 0, 0, 100)),
        ("b", at(2020, 1, 1, 0, 0, 0, 900)),
        ("c", at(2019, 1, 1)),
    ]
    assert plan(backups, RetentionPolicy(keep_last=2), tz=UTC).kept_ids == ("b", "c")


def test_a_period_whose_newest_is_kept_already_is_passed_over() -> None:
    # keep_last keeps the newest of the day; daily must not take an older backup of that same day
    backups = [("d2-late", at(2020, 1, 2, 20)), ("d2-early", at(2020, 1, 2, 8)), ("d1", at(2020, 1, 1, 8))]
    result = plan(backups, RetentionPolicy(keep_last=1, keep_daily=1), tz=UTC)
    assert result.kept_ids == ("d2-late", "d1")
    assert result.reason("d1") == "daily #1"


def test_periods_are_cut_in_the_given_zone() -> None:
    # 23:30 UTC and 00:30 UTC next day: two UTC days, but one day at UTC+2 (01:30 and 02:30)
    backups = [("late", at(2020, 1, 1, 23, 30)), ("early", at(2020, 1, 2, 0, 30)), ("prev", at(2019, 12, 30))]
    assert plan(backups, RetentionPolicy(keep_daily=2), tz=UTC).kept_ids == ("early", "late")
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert plan(backups, RetentionPolicy(keep_daily=2), tz=plus2).kept_ids == ("early", "prev")


def test_weeks_are_iso_weeks() -> None:
    # 2021-01-03 is a Sunday in ISO week 2020-W53; 2021-01-04 starts 2021-W01
    backups = [("mon", at(2021, 1, 4, 1)), ("sun", at(2021, 1, 3, 1)), ("fri", at(2021, 1, 1, 1))]
    assert plan(backups, RetentionPolicy(keep_weekly=2), tz=UTC).kept_ids == ("mon", "sun")


def test_policy_that_keeps_nothing_and_bad_counts_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="keeps no backup"):
        RetentionPolicy()
    with pytest.raises(UsageError, match="keeps no backup"):
        RetentionPolicy(keep_daily=0, keep_last=0)
    with pytest.raises(UsageError, match="keep_daily"):
        RetentionPolicy(keep_daily=-1)
    with pytest.raises(UsageError, match="keep_weekly"):
        RetentionPolicy(keep_weekly=True)
    with pytest.raises(UsageError, match="keep_dayly"):
        RetentionPolicy.from_mapping({"keep_dayly": 3})
    assert RetentionPolicy.from_mapping({"keep_daily": 7}).to_json() == {"keep_daily": 7}


def test_naive_times_and_duplicate_ids_are_refused() -> None:
    with pytest.raises(UsageError, match="time zone"):
        plan([("a", dt.datetime(2020, 1, 1))], RetentionPolicy(keep_last=1))
    with pytest.raises(UsageError, match="twice"):
        plan([("a", at(2020, 1, 1)), ("a", at(2020, 1, 2))], RetentionPolicy(keep_last=1))


def test_keep_ancestors_keeps_the_chain_of_a_kept_incremental() -> None:
    backups = [("i2", at(2020, 1, 3)), ("i1", at(2020, 1, 2)), ("f0", at(2020, 1, 1)), ("x", at(2019, 1, 3))]
    parents = {"i2": "i1", "i1": "f0", "f0": None, "x": None}
    bare = plan(backups, RetentionPolicy(keep_last=1), tz=UTC)
    assert bare.removed == ("i1", "f0", "x")
    chained = keep_ancestors(bare, parents)
    assert chained.kept_ids == ("i2", "i1", "f0")
    assert chained.removed == ("x",)
    assert chained.reason("f0") == "parent of i1"


def test_backup_time_reads_vmsnap_ids() -> None:
    assert backup_time("20261127T120812.123456Z-3f9a") == dt.datetime(2026, 11, 27, 12, 8, 12, 123456, UTC)
    with pytest.raises(UsageError):
        backup_time("latest")


# -- hypothesis: the implementation against a model --------------------------------------------------------


def model(backups: list[tuple[str, dt.datetime]], policy: RetentionPolicy) -> dict[str, str]:
    """borg's rules said differently: per rule, the newest backup of every period, newest period first;
    drop those kept already; take the first N; if fewer than N, add the oldest backup unless kept."""
    kept: dict[str, str] = {}
    if not backups:
        return kept
    for rule, count in policy.rules():
        newest_of: dict[tuple[int, ...], tuple[dt.datetime, str]] = {}
        for backup_id, created in backups:
            period = PERIODS[rule](created)
            newest_of[period] = max(newest_of.get(period, (created, backup_id)), (created, backup_id))
        candidates = [b for _, b in sorted(newest_of.values(), reverse=True) if b not in kept]
        chosen = candidates[:count]
        for backup_id in chosen:
            kept[backup_id] = rule
        oldest = min((created, backup_id) for backup_id, created in backups)[1]
        if len(chosen) < count and oldest not in kept:
            kept[oldest] = rule
    return kept


moments = st.datetimes(
    min_value=dt.datetime(2019, 12, 1), max_value=dt.datetime(2021, 2, 1), timezones=st.just(UTC)
)
# clustered times, so that several backups share hours, days and weeks
clustered = st.builds(
    lambda base, hours, seconds: base + dt.timedelta(hours=hours, seconds=seconds),
    st.sampled_from([at(2020, 12, 27), at(2020, 12, 31, 23), at(2021, 1, 3, 22)]),
    st.integers(0, 72),
    st.integers(0, 3),
)
backup_lists = st.lists(st.one_of(moments, clustered), max_size=40).map(
    lambda times: [(f"b{i:02d}", t) for i, t in enumerate(times)]
)
counts = st.one_of(st.none(), st.integers(0, 6))
policies = st.builds(
    lambda *c: dict(zip([f"keep_{r}" for r in RULES], c, strict=True)), *[counts] * len(RULES)
).filter(lambda d: any(d.values()))


@settings(max_examples=300, deadline=None)
@given(backup_lists, policies, st.randoms())
def test_plan_matches_the_model(
    backups: list[tuple[str, dt.datetime]], counts: dict[str, int | None], random: object
) -> None:
    policy = RetentionPolicy(**counts)
    result = plan(backups, policy, tz=UTC)
    expected = model(backups, policy)
    assert {k.backup_id: k.rule for k in result.kept} == expected
    assert set(result.removed) == {b for b, _ in backups} - set(expected)
    assert len(result.kept) + len(result.removed) == len(backups)
    # input order does not matter
    shuffled = list(backups)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assert plan(shuffled, policy, tz=UTC) == result
    # the newest backup is always kept, and no rule keeps more than its count
    if backups:
        assert result.kept[0].created == max(t for _, t in backups)
    for rule, count in policy.rules():
        assert sum(1 for k in result.kept if k.rule == rule) <= count
