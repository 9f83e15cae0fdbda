"""What a test needs to run beside others: under pytest-xdist (``make test`` runs the suite on several worker
processes) and beside other test runs on the same machine.

- :func:`worker_id`: ``gw0``, ``gw1`` … under xdist, ``main`` without it;
- :func:`unique_name`: a name no other test, worker or run uses (VM names, S3 prefixes, LV names …);
- :func:`free_port` / :func:`free_ports`: TCP ports on 127.0.0.1 that nothing listens on and that no other
  test process on this machine is handed, until this process exits (see :func:`free_port`);
- :func:`run_dir` and :func:`built_once`: a directory all workers of one run share, and an artefact built
  there once for all of them (read-only afterwards).

Session-scoped fixtures are per worker: each worker process has its own lab guest, sshd, SeaweedFS, libvirtd
and temporary directories (``tmp_path_factory`` gives each worker a directory of its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import random
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

PORT_RANGE = (20000, 32767)
"""Where test ports come from: below Linux's default ephemeral range (32768-60999), so neither the kernel's
choice of a client's source port nor a ``bind(0)`` elsewhere lands on a port a test handed out."""

PORT_LOCKS = Path("/tmp/vmsnap-test-ports")
"""One lock file per port handed out; a test process holds the lock (``flock``) until it exits."""

_held_ports: dict[int, int] = {}
"""port → the open, locked file that reserves it (for this process's lifetime)."""


def worker_id() -> str:
    """This process's xdist worker (``gw0`` …), or ``main`` when the suite runs without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def worker_count() -> int:
    """How many workers run the suite (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def unique_name(prefix: str, *, length: int = 6) -> str:
    """``PREFIX-<random hex>`` (``length`` digits): a name no other test, worker or concurrent run picks."""
    return f"{prefix}-{secrets.token_hex((length + 1) // 2)[:length]}"


def _reserve(port: int) -> bool:
    """Lock ``port``'s file and check that nothing listens on it; keep the lock if both hold."""
    if port in _held_ports:
        return False
    PORT_LOCKS.mkdir(mode=0o1777, exist_ok=True)
    fd = os.open(PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            os.close(fd)  # someone outside the tests listens there: leave it alone
            return False
    _held_ports[port] = fd
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and that no other test process on this machine
    (another xdist worker, another run) gets from this function until this process exits.

    The port is in :data:`PORT_RANGE`, outside the kernel's ephemeral range, and its reservation is an
    ``flock`` on ``PORT_LOCKS/PORT``, released by the kernel when the process ends (also when it is killed).
    """
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randint(*PORT_RANGE)
        if _reserve(port):
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE} after 1000 tries")


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports, each as :func:`free_port` gives them."""
    return [free_port() for _ in range(count)]


def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every worker of this run shares (the run's base temp directory), and only this run."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the body."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """What ``build(directory)`` returns, built by the first worker of this run that asks (under a lock)
    in a directory all workers share; the others wait for it and get a copy of the same value (pickled).

    The directory and its files are shared read-only: a test that changes them must copy them first.
    """
    shared = run_dir(tmp_path_factory)
    directory = shared / f"shared-{name}"
    value_file = directory / ".value.pickle"
    with locked(shared / f"shared-{name}.lock"):
        if value_file.exists():
            loaded: T = pickle.loads(value_file.read_bytes())
            return loaded
        if directory.exists():  # a build that failed half-way in an earlier worker
            shutil.rmtree(directory)
        directory.mkdir()
        value = build(directory)
        value_file.write_bytes(pickle.dumps(value))
        return value
