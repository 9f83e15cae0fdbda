"""Test-only crash points: a named step at which a vmsnap process kills itself, so that tests can stop a
backup (or a gc) at an exact moment and check what a ``kill -9`` there leaves behind."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "VMSNAP_TEST_CRASH_AT"
"""Test-only: a step name at which the process SIGKILLs itself (see :func:`crash_point`)."""


def crash_point(name: str) -> None:
    """TEST ONLY: kill this process with SIGKILL when ``$VMSNAP_TEST_CRASH_AT`` is ``name`` (SIGTERM when it
    is ``term:name``; SIGSTOP when it is ``stop:name``, so that a test can act while it is stopped there and
    SIGCONT it).

    The crash-recovery tests use it to stop a ``vmsnap backup`` or ``gc`` at an exact step; nothing else sets
    it.
    """
    wanted = os.environ.get(CRASH_ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"term:{name}":
        os.kill(os.getpid(), signal.SIGTERM)
    elif wanted == f"stop:{name}":
        os.kill(os.getpid(), signal.SIGSTOP)
