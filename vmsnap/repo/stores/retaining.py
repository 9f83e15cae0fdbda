"""A store whose puts lock what they write: the view a locked repository writes through (S3 Object Lock).

Which objects are locked, and for how long, is the repository layout's rule (a function of the key: chunks
longer than a backup's own objects, its leases never); the mode is the repository's. A put that names a
retention of its own keeps it. Dates are whole seconds, rounded up, so a server that keeps seconds never
locks an object for less than asked.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable

from vmsnap.repo.stores.base import Data, LockMode, Retention, Store
from vmsnap.repo.stores.wrapper import StoreWrapper

RetentionRule = Callable[[str], float | None]
"""Seconds a new object under this key stays locked from its put, or None: it is never locked (a lease)."""


def retention_after(mode: LockMode, seconds: float, now: float | None = None) -> Retention:
    """A lock in ``mode`` until ``seconds`` from ``now`` (default: the clock), rounded up to a second."""
    moment = time.time() if now is None else now
    return Retention(mode, dt.datetime.fromtimestamp(math.ceil(moment + seconds), dt.UTC))


class RetainingStore(StoreWrapper):
    """``store``, with every put locked as ``rule`` says (see the module docstring).

    :param store: a store with retention locks, configured for them
    :param mode: the lock mode of every retention it sets
    :param rule: seconds to lock a new object, by key (None: not locked)
    """

    def __init__(self, store: Store, mode: LockMode, rule: RetentionRule) -> None:
        super().__init__(store)
        self.mode: LockMode = mode
        self.rule = rule

    def retention_for(self, key: str, now: float | None = None) -> Retention | None:
        """The lock a put of ``key`` gets at ``now``, or None."""
        seconds = self.rule(key)
        return None if seconds is None else retention_after(self.mode, seconds, now)

    def put(
        self,
        key: str,
        data: Data,
        *,
        if_absent: bool = False,
        durable: bool = True,
        retention: Retention | None = None,
    ) -> bool:
        chosen = retention if retention is not None else self.retention_for(key)
        return super().put(key, data, if_absent=if_absent, durable=durable, retention=chosen)
