"""Undo stacks for strategies: what a multi-step create did is put on a :class:`contextlib.ExitStack` as it
happens, undone last-first when a later step fails, and kept (``pop_all``) when every step succeeded."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from vmsnap.errors import VmsnapError


def undo_later(undo: contextlib.ExitStack, step: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
    """Put ``step(*args, **kwargs)`` on the ``undo`` stack (run, last first, when the ``with`` body fails).
    Undo is best effort: its own errors are ignored, the error that made it run is the one raised."""

    def run() -> None:
        with contextlib.suppress(VmsnapError, OSError):
            step(*args, **kwargs)

    undo.callback(run)
