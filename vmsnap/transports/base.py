"""The Transport interface: take an :class:`ExportSource` and write it into a target, reporting progress."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from vmsnap.errors import UsageError
from vmsnap.model import ExportSource, Progress, TransferStats

OUTPUT_FORMATS = ("qcow2", "raw")


def check_options(
    transport: str, unknown: Mapping[str, Any], accepted: Sequence[str], output_format: str
) -> str:
    """Refuse options a transport does not have and output formats it cannot write; return the format.

    :raise UsageError: naming the unknown options (and the accepted ones), or the unknown format
    """
    if unknown:
        raise UsageError(
            f"the {transport} transport has no option(s) {', '.join(sorted(unknown))}",
            hint=f"it accepts {', '.join(accepted)}",
        )
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}", hint="use 'qcow2' or 'raw'")
    return output_format


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
