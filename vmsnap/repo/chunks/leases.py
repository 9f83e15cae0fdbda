"""Leases in a ``chunks`` repository's store: who is writing, reading or collecting garbage right now.

Store keys (a store cannot hold both ``a`` and ``a/b``, hence the separate folders)::

    locks/vms/<vm>           the writer lease of a VM: a backup, prune or recover of it (one at a time)
    locks/readers/<token>    a reader lease: a restore, verify or copy reading the repository
    locks/gc                 the gc lock

A lease is a small JSON object: kind, what, host, boot id, pid and the pid's start time, a random token,
created and expires (Unix seconds). It is created with ``put(if_absent=True)`` and renewed (rewritten with a
later ``expires``) by a heartbeat thread every quarter of its lifetime while its holder runs; it is deleted
when the holder finishes. A lease is **live** until it expires — or, when it was taken on this host, until
its process is gone (a dead pid, a reused pid, or another boot), so a killed run's lease is taken over at
once by the next run on the same host, and by anyone once it expires. Taking over is: delete the dead lease,
then ``put(if_absent=True)`` again (of two takers, one wins).

How gc and writers never miss each other: a writer (or reader) first writes its lease, then reads
``locks/gc``; gc first writes ``locks/gc``, then lists the writer and reader leases. Whichever writes second
sees the other's lease and backs off (a writer refuses; gc refuses or, with ``--wait``, lets go of its lock
and tries again later). Both writes land before either read, so at least one of them always sees the other.
A writer also keeps the gc generation (see :mod:`vmsnap.repo.chunks.known`) it saw when it took its lease,
and checks before sealing that the lease is still its own and no gc ran meanwhile (a process stopped past
its lease's expiry could otherwise rely on chunks a gc removed).
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

from vmsnap.errors import LeaseError, NotFoundError, StoreError, UsageError
from vmsnap.model import validate_name
from vmsnap.repo.stores.base import Store

LEASE_SECONDS = 120.0
"""How long a lease lives without renewal; the heartbeat renews it every quarter of that."""
LEASE_ENV = "VMSNAP_LEASE_SECONDS"
"""Overrides :data:`LEASE_SECONDS` for the leases this process takes (how soon another host may take over
the lease of a host that died; every holder writes its own expiry, so hosts may differ)."""
WRITERS = "locks/vms/"
READERS = "locks/readers/"
GC_KEY = "locks/gc"


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


def writer_key(vm: str) -> str:
    """``locks/vms/<vm>``."""
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
        """True until it expires, or (taken on this host) until its process is gone."""
        if (now if now is not None else time.time()) >= self.expires:
            return False
        if self.host == socket.gethostname() and self.boot_id:
            if self.boot_id != _boot_id():
                return False  # taken before this host's last boot
            return bool(self.pid_start) and _pid_start(self.pid) == self.pid_start
        return True

    def describe(self) -> str:
        """``backup of vm1 (pid 123 on host h, since 12:00:01 UTC, lease until 12:04:00 UTC)``."""
        since = time.strftime("%H:%M:%S", time.gmtime(self.created))
        until = time.strftime("%H:%M:%S", time.gmtime(self.expires))
        return f"{self.what} (pid {self.pid} on host {self.host}, since {since} UTC, lease until {until} UTC)"

    def to_bytes(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LeaseRecord | None:
        """The record, or None when the object is not one (treated as a dead lease)."""
        try:
            data = json.loads(raw)
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
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None


class Lease:
    """A lease this process holds, renewed by a daemon thread until :meth:`release`.

    :ivar lost: why the lease is no longer ours (another process took it over), or None
    """

    def __init__(self, store: Store, key: str, record: LeaseRecord, ttl: float) -> None:
        self.store, self.key, self.record, self.ttl = store, key, record, ttl
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"vmsnap-lease-{key}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except StoreError:
                continue  # try again at the next beat; the lease lasts four beats
            if self.lost is not None:
                return

    def renew(self) -> None:
        """Rewrite the lease with a later expiry, unless another process has taken it over."""
        current = _read(self.store, self.key)
        if current is None or current.token != self.record.token:
            self.lost = "another process took the lease over" if current else "the lease was removed"
            return
        self.record = attrs.evolve(self.record, expires=time.time() + self.ttl)
        self.store.put(self.key, self.record.to_bytes())

    def check(self) -> None:
        """:raise LeaseError: the lease is no longer this process's (it was stopped past its expiry)."""
        current = _read(self.store, self.key)
        if self.lost is None and (current is None or current.token != self.record.token):
            self.lost = "another process took the lease over" if current else "the lease was removed"
        if self.lost is not None:
            raise LeaseError(
                f"lost the lease {self.key} ({self.lost}): this run was stopped longer than its lease lasts",
                hint="run it again",
            )

    def release(self) -> None:
        """Stop renewing and delete the lease (when it is still ours)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with contextlib.suppress(StoreError):
            current = _read(self.store, self.key)
            if current is not None and current.token == self.record.token:
                self.store.delete(self.key)


def _read(store: Store, key: str) -> LeaseRecord | None:
    try:
        raw = store.get(key)
    except NotFoundError:
        return None
    return LeaseRecord.from_bytes(raw)


class Leases:
    """Taking and inspecting the leases of one store.

    :param store: the repository's store
    :param ttl: lease lifetime in seconds
    """

    def __init__(self, store: Store, *, ttl: float = LEASE_SECONDS) -> None:
        self.store = store
        self.ttl = ttl

    def read(self, key: str) -> LeaseRecord | None:
        """The lease at ``key`` (None: none, or not a lease object)."""
        return _read(self.store, key)

    def take(self, key: str, kind: str, what: str) -> Lease:
        """Create the lease ``key`` for this process, taking over a dead one.

        :raise LeaseError: a live lease is there (the message says whose)
        """
        for _ in range(5):
            record = LeaseRecord.mine(kind, what, self.ttl)
            if self.store.put(key, record.to_bytes(), if_absent=True):
                return Lease(self.store, key, record, self.ttl)
            current = self.read(key)
            if current is not None and current.live():
                raise LeaseError(
                    f"{current.describe()} holds {key}",
                    hint="wait for it to finish; if it died, its lease is taken over when it expires "
                    "(at once on its own host)",
                )
            self.store.delete(key)  # a dead holder's lease (or garbage): take it over
        raise LeaseError(f"could not take the lease {key}: others keep taking it", hint="try again")

    def live(self, prefix: str) -> list[tuple[str, LeaseRecord]]:
        """Live leases under ``prefix`` (``locks/vms/`` or ``locks/readers/``)."""
        found = []
        for stored in self.store.list(prefix):
            record = self.read(stored.key)
            if record is not None and record.live():
                found.append((stored.key, record))
        return found

    def dead_of_this_host(self, prefix: str) -> list[tuple[str, LeaseRecord]]:
        """Leases under ``prefix`` taken on this host whose process is gone (``recover`` removes them)."""
        found = []
        for stored in self.store.list(prefix):
            record = self.read(stored.key)
            if record is not None and record.host == socket.gethostname() and not record.live():
                found.append((stored.key, record))
        return found

    def gc_running(self) -> LeaseRecord | None:
        """The live gc lease, or None."""
        record = self.read(GC_KEY)
        return record if record is not None and record.live() else None

    @contextlib.contextmanager
    def holding(self, key: str, kind: str, what: str) -> Iterator[Lease]:
        """Take a writer or reader lease for the body; refuse (after writing it) while gc runs.

        :raise LeaseError: the lease is held elsewhere, or gc is running
        """
        lease = self.take(key, kind, what)
        try:
            running = self.gc_running()
            if running is not None:
                raise LeaseError(
                    f"{running.describe()} is collecting garbage in this repository",
                    hint="run this again when gc has finished",
                )
            yield lease
        finally:
            lease.release()

    def reader_key(self) -> str:
        """A new reader lease key."""
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40].strip("-") or "host"
        return f"{READERS}{host}-{os.getpid()}-{secrets.token_hex(4)}"
