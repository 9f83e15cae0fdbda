"""A locked repository's policy (S3 Object Lock): its mode, how long what a backup writes stays locked, and
how much longer chunks are locked so that each is extended at most once in that time.

The marker records it (``"lock": {"mode": "compliance", "days": 30, "extend_days": 7}``); every host that
writes reads it from there. How a layout applies it is the layout's business (:mod:`vmsnap.repo.chunks.retain`
for ``chunks``).
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from vmsnap.errors import UsageError
from vmsnap.repo.stores.base import LOCK_MODES, LockMode

DAY = 86400.0
MAX_DAYS = 36500.0
"""The longest lock S3 takes (100 years)."""
DEFAULT_EXTEND_DAYS = 7.0
"""Chunks are locked this much longer than a backup (at most :attr:`LockPolicy.days`), unless told."""


def parse_days(text: str | float, what: str = "--lock-days") -> float:
    """A number of days a lock lasts: more than 0, at most :data:`MAX_DAYS` (fractions allowed: 0.5).

    :raise UsageError: not such a number
    """
    try:
        days = float(text)
    except (TypeError, ValueError):
        days = math.nan
    if not math.isfinite(days) or days <= 0 or days > MAX_DAYS:
        raise UsageError(
            f"{what} {text}: a lock lasts more than 0 and at most {MAX_DAYS:g} days",
            hint=f"e.g. {what} 30 (fractions are allowed: 0.5 is 12 hours)",
        )
    return days


def parse_mode(text: str) -> LockMode:
    """``compliance`` or ``governance`` (any case).

    :raise UsageError: another word
    """
    mode = text.strip().lower()
    for known in LOCK_MODES:
        if mode == known:
            return known
    raise UsageError(
        f"--lock-mode {text!r}: S3 Object Lock has the modes {' and '.join(LOCK_MODES)}",
        hint="compliance: nobody can shorten or lift a lock; governance: an identity allowed to bypass "
        "it can",
    )


@attrs.frozen
class LockPolicy:
    """How a locked repository locks what its backups write.

    :param mode: compliance (nobody can lift a lock) or governance (whoever may bypass it can)
    :param days: every object a backup writes is locked at least this long from its put; a backup's chunks
        are kept locked at least as long as the backup
    :param extend_days: chunks are locked this much longer than ``days``, so a chunk that later backups
        reuse needs its lock extended at most once in that time
    """

    mode: LockMode
    days: float
    extend_days: float

    @classmethod
    def of(
        cls, days: str | float, mode: str = "compliance", extend_days: str | float | None = None
    ) -> LockPolicy:
        """A checked policy; ``extend_days`` defaults to ``min(days, 7)``.

        :raise UsageError: days out of range, or an unknown mode
        """
        length = parse_days(days)
        extend = (
            min(length, DEFAULT_EXTEND_DAYS)
            if extend_days is None
            else parse_days(extend_days, "--lock-extend-days")
        )
        return cls(parse_mode(mode), length, extend)

    @property
    def seconds(self) -> float:
        """How long a backup's own objects are locked."""
        return self.days * DAY

    @property
    def chunk_seconds(self) -> float:
        """How long a chunk is locked when it is stored or its lock is extended."""
        return (self.days + self.extend_days) * DAY

    def describe(self) -> str:
        """``COMPLIANCE, 30 days`` (what messages say)."""
        return f"{self.mode.upper()}, {self.days:g} day{'s' if self.days != 1 else ''}"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "days": self.days, "extend_days": self.extend_days}

    @classmethod
    def from_json(cls, data: Any) -> LockPolicy:
        """:raise ValueError: malformed"""
        if not isinstance(data, dict):
            raise ValueError(f"lock {data!r}")
        try:
            return cls.of(data["days"], str(data["mode"]), data["extend_days"])
        except (KeyError, UsageError) as err:
            raise ValueError(f"lock {data!r}") from err
