"""What the test sshds share (the session's sshd in tests/conftest.py, the far host's in
tests/integration/far_host.py): a free port on 127.0.0.1 (:func:`tests.parallel.free_port`, re-exported
here) and waiting until the started sshd accepts."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.parallel import free_port

__all__ = ["free_port", "wait_for_sshd"]


def wait_for_sshd(proc: subprocess.Popen[bytes], port: int, log: Path, what: str = "sshd") -> None:
    """Until ``proc`` accepts connections on ``port`` (10 s); fails the test with its log if it exits or
    does not."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start: {log.read_text()}")
        time.sleep(0.05)
