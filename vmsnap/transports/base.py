"""The Transport interface: take an :class:`ExportSource` and write it into a target, reporting progress."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from vmsnap.model import ExportSource, Progress, TransferStats


@runtime_checkable
class Transport(Protocol):
    """Copies an exported snapshot to a target file (or ``host:path`` for remote transports)."""

    name: ClassVar[str]

    def accepts(self, source: ExportSource) -> bool:
        """True when this transport can read ``source``."""
        ...

    def send(self, source: ExportSource, target: Path | str, *, progress: Progress) -> TransferStats:
        """Write the source's guest-visible content to ``target``; fsync it before returning."""
        ...
