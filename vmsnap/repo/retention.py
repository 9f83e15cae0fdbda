"""Retention: which backups a ``keep_last/hourly/daily/weekly/monthly/yearly`` policy keeps, by borg's rules.

Pure functions over ``(backup id, creation time)`` pairs; the repository (or a backup job) deletes what
:func:`plan` says. The rules are those of ``borg prune`` (borg 1.2 and later), reimplemented:

- Backups are taken newest first. Each rule cuts time into periods: ``keep_last`` seconds (borg's
  ``--keep-last`` is ``--keep-secondly``: two backups started in the same second count once), ``keep_hourly``
  hours, ``keep_daily`` days, ``keep_weekly`` ISO 8601 weeks (Monday to Sunday, ``%G-%V``), ``keep_monthly``
  months, ``keep_yearly`` years. A rule keeps the newest backup of each of the latest N periods that have one
  (periods without a backup do not count).
- Rules run in that order. A backup kept by an earlier rule does not count for a later one: when the newest
  backup of a period is already kept, that period is passed over and no older backup of it is taken instead
  (borg's ``prune_split``). Each kept backup names the one rule that kept it and its number under that rule
  ("daily #3").
- When a rule finds fewer than N periods, it also keeps the oldest backup, unless that is kept already
  (borg's ``[oldest]``), so the first backup ages until a newer one can take its place.
- A policy must keep something: all counts missing or 0 is a :class:`~vmsnap.errors.UsageError` (borg
  refuses that too). Counts are never negative (borg's "-1 means unlimited" is not offered).

**Periods are cut in local time** (the time zone of the host that plans, or ``tz``), as borg does: a
``daily`` timer that fires at 00:30 local time then lands every backup in its own day, whatever the offset to
UTC. Backup ids and manifests stay in UTC; only the cutting into periods is local. Two hosts in different
zones may therefore keep different backups of the same series; pass ``tz=datetime.UTC`` to plan in UTC.
Across a DST change an hour can repeat; both instances fall into one ``hourly`` period, as in borg.

Ties (two backups with the same creation time) are ordered by id, so a plan never depends on input order.

:func:`keep_ancestors` adds what a layout with chains needs (a kept incremental keeps its parents).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from vmsnap.errors import UsageError

RULES: tuple[str, ...] = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
"""The rules in the order they are applied; ``keep_<rule>`` is the policy's field."""

POLICY_KEYS: tuple[str, ...] = tuple(f"keep_{rule}" for rule in RULES)

PARENT_RULE = "parent"
"""The rule name :func:`keep_ancestors` gives a backup kept only because a kept incremental needs it."""

Period = tuple[int, ...]


def _period_last(t: dt.datetime) -> Period:
    return (t.year, t.month, t.day, t.hour, t.minute, t.second)


def _period_hourly(t: dt.datetime) -> Period:
    return (t.year, t.month, t.day, t.hour)


def _period_daily(t: dt.datetime) -> Period:
    return (t.year, t.month, t.day)


def _period_weekly(t: dt.datetime) -> Period:
    iso = t.isocalendar()
    return (iso.year, iso.week)


def _period_monthly(t: dt.datetime) -> Period:
    return (t.year, t.month)


def _period_yearly(t: dt.datetime) -> Period:
    return (t.year,)


PERIODS: Mapping[str, Callable[[dt.datetime], Period]] = {
    "last": _period_last,
    "hourly": _period_hourly,
    "daily": _period_daily,
    "weekly": _period_weekly,
    "monthly": _period_monthly,
    "yearly": _period_yearly,
}
"""Rule name → the period a (zone-converted) time falls in."""


def _count(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(
                f"{name} must be a whole number of backups (0 or more), not {value!r}",
                hint=f"e.g. {name} = 7",
            )

    return check


@attrs.frozen
class RetentionPolicy:
    """How many backups each rule keeps; None (or 0) leaves a rule out.

    :param keep_last: the last N backups (borg: one per second)
    :param keep_hourly: the newest backup of each of the last N hours that have one
    :param keep_daily: likewise per day
    :param keep_weekly: likewise per ISO week (Monday to Sunday)
    :param keep_monthly: likewise per month
    :param keep_yearly: likewise per year
    :raise UsageError: a count is negative or not a whole number, or the policy keeps nothing
    """

    keep_last: int | None = attrs.field(default=None, validator=_count("keep_last"), kw_only=True)
    keep_hourly: int | None = attrs.field(default=None, validator=_count("keep_hourly"), kw_only=True)
    keep_daily: int | None = attrs.field(default=None, validator=_count("keep_daily"), kw_only=True)
    keep_weekly: int | None = attrs.field(default=None, validator=_count("keep_weekly"), kw_only=True)
    keep_monthly: int | None = attrs.field(default=None, validator=_count("keep_monthly"), kw_only=True)
    keep_yearly: int | None = attrs.field(default=None, validator=_count("keep_yearly"), kw_only=True)

    def __attrs_post_init__(self) -> None:
        if not self.rules():
            raise UsageError(
                "this retention policy keeps no backup at all",
                hint="give at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, "
                "keep_yearly a count of 1 or more",
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RetentionPolicy:
        """A policy from ``{"keep_daily": 7, …}`` (a job file's ``[retention]``, the CLI's options).

        :raise UsageError: an unknown key, a bad count, or a policy that keeps nothing
        """
        for key in values:
            if key not in POLICY_KEYS:
                raise UsageError(
                    f"unknown retention option {key!r}", hint=f"use one of {', '.join(POLICY_KEYS)}"
                )
        return cls(**dict(values))

    def rules(self) -> list[tuple[str, int]]:
        """(rule, count) for every rule with a count of 1 or more, in the order they are applied."""
        out = []
        for rule in RULES:
            count = getattr(self, f"keep_{rule}")
            if count:
                out.append((rule, int(count)))
        return out

    def to_json(self) -> dict[str, int]:
        """The rules that keep something, as ``{"keep_daily": 7, …}``."""
        return {f"keep_{rule}": count for rule, count in self.rules()}

    def __str__(self) -> str:
        return " ".join(f"--keep-{rule} {count}" for rule, count in self.rules())


@attrs.frozen
class KeptBackup:
    """One backup a plan keeps, and why.

    :param backup_id: its id
    :param created: when it was started (aware)
    :param rule: the rule that kept it ("daily", …; "parent" for :func:`keep_ancestors`)
    :param number: it is the rule's ``number``-th kept backup (1 is the newest)
    :param oldest: kept by borg's "oldest" clause (the rule found fewer periods than it may keep)
    :param needed_by: for rule "parent": the kept backup whose chain needs it
    """

    backup_id: str
    created: dt.datetime
    rule: str
    number: int
    oldest: bool = False
    needed_by: str | None = None

    @property
    def reason(self) -> str:
        """``daily #3``, ``yearly[oldest] #1`` or ``parent of <id>``, as ``prune --list`` prints it."""
        if self.rule == PARENT_RULE:
            return f"parent of {self.needed_by}"
        return f"{self.rule}{'[oldest]' if self.oldest else ''} #{self.number}"

    def to_json(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "created": self.created.isoformat(), "reason": self.reason}


@attrs.frozen
class RetentionPlan:
    """What a policy keeps and removes; both newest first.

    :param kept: the kept backups with the rule that keeps each
    :param removed: ids of the backups to remove
    :param order: every planned (id, start time), newest first
    """

    kept: tuple[KeptBackup, ...]
    removed: tuple[str, ...]
    order: tuple[tuple[str, dt.datetime], ...] = ()

    @property
    def kept_ids(self) -> tuple[str, ...]:
        return tuple(k.backup_id for k in self.kept)

    def reason(self, backup_id: str) -> str | None:
        """Why ``backup_id`` is kept, or None when it is removed (or unknown)."""
        for kept in self.kept:
            if kept.backup_id == backup_id:
                return kept.reason
        return None

    def to_json(self) -> dict[str, Any]:
        return {"kept": [k.to_json() for k in self.kept], "removed": list(self.removed)}


def _ordered(
    backups: Iterable[tuple[str, dt.datetime]], tz: dt.tzinfo | None
) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """(id, created, created in the planning zone), newest first; ties by id, newest id first."""
    seen: set[str] = set()
    out = []
    for backup_id, created in backups:
        if created.tzinfo is None or created.utcoffset() is None:
            raise UsageError(
                f"backup {backup_id!r} has a creation time without a time zone ({created.isoformat()})",
                hint="pass aware datetimes (backup ids are UTC: use backup_time())",
            )
        if backup_id in seen:
            raise UsageError(f"backup {backup_id!r} is listed twice")
        seen.add(backup_id)
        out.append((backup_id, created, created.astimezone(tz)))
    out.sort(key=lambda item: (item[1], item[0]), reverse=True)
    return out


def plan(
    backups: Sequence[tuple[str, dt.datetime]], policy: RetentionPolicy, *, tz: dt.tzinfo | None = None
) -> RetentionPlan:
    """Decide which of ``backups`` the policy keeps (borg's prune rules; see the module docstring).

    :param backups: (backup id, start time) pairs, in any order; times must be aware
    :param policy: the counts per rule
    :param tz: the zone periods are cut in; None: this host's local time (as borg)
    :raise UsageError: a naive time, or an id listed twice
    """
    ordered = _ordered(backups, tz)
    kept: dict[str, KeptBackup] = {}
    for rule, count in policy.rules():
        period_of = PERIODS[rule]
        taken = 0
        last_period: Period | None = None
        finished = False
        for backup_id, created, local in ordered:
            period = period_of(local)
            if period == last_period:
                continue
            last_period = period  # this period is used up even when its newest is kept already
            if backup_id in kept:
                continue
            taken += 1
            kept[backup_id] = KeptBackup(backup_id, created, rule, taken)
            if taken == count:
                finished = True
                break
        if not finished and ordered:
            oldest_id, oldest_created, _ = ordered[-1]
            if oldest_id not in kept:
                taken += 1
                kept[oldest_id] = KeptBackup(oldest_id, oldest_created, rule, taken, oldest=True)
    order = {backup_id: index for index, (backup_id, _, _) in enumerate(ordered)}
    return RetentionPlan(
        kept=tuple(sorted(kept.values(), key=lambda k: order[k.backup_id])),
        removed=tuple(backup_id for backup_id, _, _ in ordered if backup_id not in kept),
        order=tuple((backup_id, created) for backup_id, created, _ in ordered),
    )


def keep_ancestors(retention: RetentionPlan, parents: Mapping[str, str | None]) -> RetentionPlan:
    """Also keep every backup a kept one depends on (an incremental's parent, its parent, …).

    For layouts with chains (``qcow2``); the ``chunks`` layout has none and needs no call.

    :param parents: backup id → its parent's id (None for a full backup); parents that are not among the
        planned backups are ignored (they are not this plan's to keep or remove)
    """
    created = dict(retention.order)
    kept = {k.backup_id: k for k in retention.kept}
    for entry in retention.kept:
        child = entry.backup_id
        parent = parents.get(child)
        while parent is not None and parent in created and parent not in kept:
            kept[parent] = KeptBackup(parent, created[parent], PARENT_RULE, 0, needed_by=child)
            child, parent = parent, parents.get(parent)
    rank = {backup_id: i for i, (backup_id, _) in enumerate(retention.order)}
    return RetentionPlan(
        kept=tuple(sorted(kept.values(), key=lambda k: rank[k.backup_id])),
        removed=tuple(b for b in retention.removed if b not in kept),
        order=retention.order,
    )


def backup_time(backup_id: str) -> dt.datetime:
    """The start time (UTC) encoded in a vmsnap backup id ``YYYYMMDDTHHMMSS.ffffffZ-xxxx``.

    :raise UsageError: the id is not of that form
    """
    try:
        stamp = backup_id.split("Z", 1)[0]
        return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S.%f").replace(tzinfo=dt.UTC)
    except ValueError as err:
        raise UsageError(
            f"{backup_id!r} is not a vmsnap backup id", hint="ids look like 20261127T120812.123456Z-3f9a"
        ) from err
