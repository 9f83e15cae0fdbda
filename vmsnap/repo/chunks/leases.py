"""Leases in a ``chunks`` repository's store: who is writing, reading or collecting garbage right now.

Store keys (a store cannot hold both ``a`` and ``a/b``, hence the separate folders)::

    locks/writers/<vm>/<seq>   the writer lease of a VM: a backup, prune or recover of it (one at a time)
    locks/collector/<seq>      the gc lock
    locks/readers/<token>      a reader lease: a restore, verify or copy reading the repository

A lease is a small JSON object: kind, what, host, boot id, pid and the pid's start time, a random token,
created, expires (Unix seconds) and state (``held`` or ``released``). A held lease taken on **this host** is
live exactly as long as its process exists (a dead pid, a reused pid or another boot end it; a stopped or
hung process keeps it: that is a fact vmsnap can see, not a guess by the clock), so a killed run's lease is
taken over at once by the next run on the same host. A lease taken on **another host** is live until it
expires; its holder renews it (rewrites it with a later ``expires``) from a heartbeat thread every quarter of
its lifetime.

**Writer leases and the gc lock are series**: ``<seq>`` is a 12-digit number, and the object with the
highest one (the head) says who holds the lease. Taking it is one conditional operation: read the head
(one listing, one read); when it is absent, released or not live, create the next number with
``put(if_absent=True)``. Of two processes that take over the same dead head, exactly one creates the next
number; the other finds that live head and refuses. Nothing is deleted to take a lease over (the old
entries below the new head are removed afterwards, as clean-up), so no taker can remove another's fresh
lease. A holder's :meth:`Lease.check` passes only while its entry is the head and still its own; releasing
rewrites the entry as ``released`` (one small object per series stays, so that a holder that was stopped
past its lease can never find the series empty and believe it still holds it). Reader leases are never
taken over: each reader has a key of its own, deleted when it finishes.

How gc and writers never miss each other: a writer (or reader) first writes its lease, then reads the gc
lock; gc first writes its lock, then lists the writer and reader leases. Whichever writes second sees the
other's lease and backs off (a writer refuses; gc refuses or, with ``--wait``, releases its lock and tries
again later). Both writes land before either read, so at least one of them always sees the other. What
makes gc safe even when a lease expired while its holder was stopped (the fences) is in
:mod:`vmsnap.repo.chunks.gc`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping

import attrs

from vmsnap.errors import ChecksumMismatchError, LeaseError, NotFoundError, StoreError, UsageError
from vmsnap.model import validate_name
from vmsnap.processes import crash_point
from vmsnap.repo.stores.base import Store

LEASE_SECONDS = 120.0
"""How long a lease lives without renewal; the heartbeat renews it every quarter of that."""
LEASE_ENV = "VMSNAP_LEASE_SECONDS"
"""Overrides :data:`LEASE_SECONDS` for the leases this process takes (how soon another host may take over
the lease of a host that died; every holder writes its own expiry, so hosts may differ)."""
WRITERS = "locks/writers/"
READERS = "locks/readers/"
GC_SERIES = "locks/collector"
HELD = "held"
RELEASED = "released"
HEARTBEAT_MIN = 0.25
"""The shortest pause between two renewals, whatever the lifetime."""
_SEQ = re.compile(r"^[0-9]{12}$")


def lease_seconds(environ: Mapping[str, str] | None = None) -> float:
    """``$VMSNAP_LEASE_SECONDS``, else :data:`LEASE_SECONDS`.

    :raise UsageError: not a number of seconds of at least 1
    """
    value = (os.environ if environ is None else environ).get(LEASE_ENV, "").strip()
    if not value:
        return LEASE_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds >= 1.0 or seconds == float("inf"):
        raise UsageError(
            f"{LEASE_ENV}={value!r} is not a lease lifetime", hint="give seconds, at least 1 (default 120)"
        )
    return seconds


def writer_series(vm: str) -> str:
    """``locks/writers/<vm>``: the series of the VM's writer lease."""
    return WRITERS + validate_name(vm, "VM name")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The start time of ``pid`` (``/proc/PID/stat`` field 22), "" when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@attrs.frozen
class LeaseRecord:
    """What a lease object says (see the module docstring)."""

    kind: str
    what: str
    host: str
    boot_id: str
    pid: int
    pid_start: str
    token: str
    created: float
    expires: float
    state: str = HELD

    @classmethod
    def mine(cls, kind: str, what: str, ttl: float) -> LeaseRecord:
        now = time.time()
        pid = os.getpid()
        return cls(
            kind,
            what,
            socket.gethostname(),
            _boot_id(),
            pid,
            _pid_start(pid),
            secrets.token_hex(16),
            now,
            now + ttl,
        )

    def live(self, now: float | None = None) -> bool:
        """While held: taken on this host, as long as its process exists (stopped or not: a fact, not a
        timeout); taken on another host, until it expires."""
        if self.state != HELD:
            return False
        if self.mine_to_judge():
            if self.boot_id != _boot_id():
                return False  # taken before this host's last boot
            return bool(self.pid_start) and _pid_start(self.pid) == self.pid_start
        return (now if now is not None else time.time()) < self.expires

    def mine_to_judge(self) -> bool:
        """Taken on this host: its process can be seen here."""
        return self.host == socket.gethostname() and bool(self.boot_id)

    def describe(self) -> str:
        """``backup of vm1 (pid 123 on host h, since 12:00:01 UTC, lease until 12:04:00 UTC)``; a lease of
        this host past its expiry says its process is stopped or hung."""
        since = time.strftime("%H:%M:%S", time.gmtime(self.created))
        until = time.strftime("%H:%M:%S", time.gmtime(self.expires))
        where = f"pid {self.pid} on host {self.host}, since {since} UTC"
        if self.mine_to_judge() and time.time() >= self.expires:
            return f"{self.what} ({where}; not renewed since {until} UTC: that process is stopped or hung)"
        return f"{self.what} ({where}, lease until {until} UTC)"

    def to_bytes(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LeaseRecord | None:
        """The record, or None when the object is not one (treated as a dead lease)."""
        try:
            data = json.loads(raw)
            state = str(data.get("state", HELD))
            if state not in (HELD, RELEASED):
                return None
            return cls(
                str(data["kind"]),
                str(data["what"]),
                str(data["host"]),
                str(data["boot_id"]),
                int(data["pid"]),
                str(data["pid_start"]),
                str(data["token"]),
                float(data["created"]),
                float(data["expires"]),
                state,
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            return None


@attrs.frozen
class Head:
    """The newest entry of a lease series: its key, its number, and its record (None: not a lease)."""

    key: str
    seq: int
    record: LeaseRecord | None

    def live(self) -> bool:
        return self.record is not None and self.record.live()

    def held(self) -> bool:
        """Held (live or not): not released, and a lease object."""
        return self.record is None or self.record.state == HELD


def _read(store: Store, key: str) -> LeaseRecord | None:
    try:
        raw = store.get(key)
    except NotFoundError:
        return None
    except ChecksumMismatchError:  # a sealed lease that fails its check: not a lease (as garbage is)
        return None
    return LeaseRecord.from_bytes(raw)


def _entries(store: Store, series: str) -> list[tuple[int, str]]:
    """(number, key) of every entry of ``series``, lowest first."""
    found = []
    for stored in store.list(series + "/"):
        tail = stored.key[len(series) + 1 :]
        if _SEQ.match(tail):
            found.append((int(tail), stored.key))
    return sorted(found)


def read_head(store: Store, series: str) -> Head | None:
    """The head of ``series`` (None: it has no entry).

    :raise StoreError: the store failed
    """
    for _ in range(5):
        entries = _entries(store, series)
        if not entries:
            return None
        seq, key = entries[-1]
        try:
            raw = store.get(key)
        except NotFoundError:
            continue  # removed by a clean-up after a newer entry was made: list again
        except ChecksumMismatchError:  # a sealed lease that fails its check: not a lease
            return Head(key, seq, None)
        return Head(key, seq, LeaseRecord.from_bytes(raw))
    raise StoreError(f"the lease {series} in {store.url} keeps changing", hint="try again")


def _series_key(series: str, seq: int) -> str:
    return f"{series}/{seq:012d}"


class Lease:
    """A lease this process holds, renewed by a daemon thread until :meth:`release`.

    :param series: the lease's series, or None for a reader lease (a key of its own)
    :ivar lost: why the lease is no longer ours (another process took it over), or None
    """

    def __init__(self, store: Store, key: str, record: LeaseRecord, ttl: float, series: str | None) -> None:
        self.store, self.key, self.record, self.ttl, self.series = store, key, record, ttl, series
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"vmsnap-lease-{key}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.ttl / 4, HEARTBEAT_MIN)):
            try:
                self.renew()
            except StoreError:
                continue  # try again at the next beat; the lease lasts four beats
            if self.lost is not None:
                return

    def _still_mine(self) -> str | None:
        """None while the lease is this process's, else why not."""
        if self.series is None:
            current = _read(self.store, self.key)
            if current is None:
                return "the lease was removed"
            return None if current.token == self.record.token else "another process took the lease over"
        head = read_head(self.store, self.series)
        if head is None:
            return "the lease was removed"
        if head.key != self.key:
            return "another process took the lease over"
        if head.record is None or head.record.token != self.record.token or head.record.state != HELD:
            return "the lease was replaced"
        return None

    def renew(self) -> None:
        """Rewrite the lease with a later expiry, unless another process has taken it over."""
        lost = self._still_mine()
        if lost is not None:
            self.lost = self.lost or lost
            return
        self.record = attrs.evolve(self.record, expires=time.time() + self.ttl)
        self.store.put(self.key, self.record.to_bytes())

    def check(self) -> None:
        """:raise LeaseError: the lease is no longer this process's (it was stopped past its expiry)."""
        if self.lost is None:
            self.lost = self._still_mine()
        if self.lost is not None:
            raise LeaseError(
                f"lost the lease {self.series or self.key} ({self.lost}): this run was stopped longer than "
                "its lease lasts",
                hint="run it again",
            )

    def release(self) -> None:
        """Stop renewing; mark the lease released (a reader's: delete it) when it is still ours."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with contextlib.suppress(StoreError):
            if self._still_mine() is not None:
                return
            if self.series is None:
                self.store.delete(self.key)
            else:
                released = attrs.evolve(self.record, state=RELEASED, expires=time.time())
                self.store.put(self.key, released.to_bytes())


class Leases:
    """Taking and inspecting the leases of one store.

    :param store: the repository's store
    :param ttl: lease lifetime in seconds
    """

    def __init__(self, store: Store, *, ttl: float = LEASE_SECONDS) -> None:
        self.store = store
        self.ttl = ttl

    def read(self, key: str) -> LeaseRecord | None:
        """The lease object at ``key`` (None: none, or not a lease object)."""
        return _read(self.store, key)

    def head(self, series: str) -> Head | None:
        """The head of ``series`` (see :func:`read_head`)."""
        return read_head(self.store, series)

    def holder(self, series: str) -> LeaseRecord | None:
        """The live holder of ``series``, or None."""
        head = self.head(series)
        return head.record if head is not None and head.live() else None

    def take(self, series: str, kind: str, what: str) -> Lease:
        """Take the lease ``series`` for this process: the next entry after a head that is absent, released
        or not live (see the module docstring).

        :raise LeaseError: a live lease is there (the message says whose)
        """
        for _ in range(5):
            head = self.head(series)
            if head is not None and head.live():
                assert head.record is not None
                raise LeaseError(
                    f"{head.record.describe()} holds {series}",
                    hint="wait for it to finish; if it died, its lease is taken over when it expires "
                    "(at once on its own host)",
                )
            if head is not None and head.held():
                crash_point("lease-taking-over")  # a dead holder's lease (or garbage) is taken over
            record = LeaseRecord.mine(kind, what, self.ttl)
            key = _series_key(series, head.seq + 1 if head is not None else 1)
            if self.store.put(key, record.to_bytes(), if_absent=True):
                self._clean_below(series, key)
                return Lease(self.store, key, record, self.ttl, series)
        raise LeaseError(f"could not take the lease {series}: others keep taking it", hint="try again")

    def _clean_below(self, series: str, key: str) -> None:
        """Remove the entries below the new head ``key`` (clean-up only: the head alone says who holds)."""
        with contextlib.suppress(StoreError):
            for _, old in _entries(self.store, series):
                if old < key:
                    self.store.delete(old)

    def take_reader(self, kind: str, what: str) -> Lease:
        """A reader lease under a key of its own (see :meth:`reader_key`)."""
        key = self.reader_key()
        record = LeaseRecord.mine(kind, what, self.ttl)
        if not self.store.put(key, record.to_bytes(), if_absent=True):
            raise LeaseError(f"the reader lease {key} exists already", hint="a bug: reader keys are random")
        return Lease(self.store, key, record, self.ttl, None)

    def fence(self, series: str) -> LeaseRecord | None:
        """When the head of ``series`` is held but not live (its holder died, or was stopped past its lease),
        take the lease over and release it at once, so that holder's next :meth:`Lease.check` fails.

        :return: the record of the holder it fenced, or None (nothing to fence)
        :raise LeaseError: a live holder took it meanwhile
        """
        head = self.head(series)
        if head is None or not head.held() or head.live():
            return None
        fenced = head.record or LeaseRecord("?", "an unreadable lease", "?", "", 0, "", "", 0.0, 0.0)
        self.take(series, "fence", f"a fence of {fenced.what}").release()
        return fenced

    def live(self, prefix: str) -> list[tuple[str, LeaseRecord]]:
        """Live leases under ``prefix``: the live heads of the series under ``locks/writers/``, or the live
        reader leases under ``locks/readers/``."""
        if prefix == READERS:
            found = []
            for stored in self.store.list(prefix):
                record = self.read(stored.key)
                if record is not None and record.live():
                    found.append((stored.key, record))
            return found
        series = sorted({stored.key.rsplit("/", 1)[0] for stored in self.store.list(prefix)})
        found = []
        for name in series:
            head = self.head(name)
            if head is not None and head.record is not None and head.live():
                found.append((name, head.record))
        return found

    def dead_readers_of_this_host(self) -> list[tuple[str, LeaseRecord]]:
        """Reader leases taken on this host whose process is gone (``recover`` removes them)."""
        found = []
        for stored in self.store.list(READERS):
            record = self.read(stored.key)
            if record is not None and record.host == socket.gethostname() and not record.live():
                found.append((stored.key, record))
        return found

    def gc_running(self) -> LeaseRecord | None:
        """The live holder of the gc lock, or None."""
        return self.holder(GC_SERIES)

    @contextlib.contextmanager
    def holding(self, series: str | None, kind: str, what: str) -> Iterator[Lease]:
        """Take a writer lease (``series``) or a reader lease (None) for the body; refuse (after writing it)
        while gc runs.

        :raise LeaseError: the lease is held elsewhere, or gc is running
        """
        lease = self.take(series, kind, what) if series is not None else self.take_reader(kind, what)
        try:
            self.refuse_while_gc_runs()
            yield lease
        finally:
            lease.release()

    def refuse_while_gc_runs(self) -> None:
        """:raise LeaseError: a gc holds its lock (live)."""
        running = self.gc_running()
        if running is not None:
            raise LeaseError(
                f"{running.describe()} is collecting garbage in this repository",
                hint="run this again when gc has finished",
            )

    def reader_key(self) -> str:
        """A new reader lease key."""
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40].strip("-") or "host"
        return f"{READERS}{host}-{os.getpid()}-{secrets.token_hex(4)}"
