"""The peers, measured on the same image in the same run: virtnbdbackup on a libvirt domain.

virtnbdbackup needs libvirt; ``make bench-peers`` installs it and starts libvirtd by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmsnap.errors import UnsupportedError


def run_peers(
    scratch: Path, bench: Any, *, progress: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Measure virtnbdbackup full, incremental and restore on ``bench``'s image.

    :raise UnsupportedError: virtnbdbackup or libvirt is not available here
    """
    raise UnsupportedError("the virtnbdbackup comparison is not wired yet", hint="run without --peers")
