"""The Transport interface: take an :class:`ExportSource` and write it into a target, reporting progress."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from vmsnap.errors import TransferError, UnsupportedError, UsageError
from vmsnap.image.qemu_img import LOCKED_HINT, check_source
from vmsnap.model import ExportSource, Progress, TransferStats
from vmsnap.runner import Runner

OUTPUT_FORMATS = ("qcow2", "raw")


def no_space(text: str) -> bool:
    """True when an error text says a filesystem is full."""
    return "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text


def write_failed(what: str, target: object, detail: str) -> TransferError:
    """A TransferError for a failed write into ``target``, with a hint that fits the cause."""
    last = [line.strip() for line in detail.strip().splitlines() if line.strip()]
    reason = last[-1] if last else "unknown error"
    if no_space(detail):
        return TransferError(
            f"{what} into {target} failed: the target filesystem is full ({reason})",
            hint="free space there or choose another target; nothing partial was kept",
        )
    if "Failed to get" in detail and "lock" in detail:
        return TransferError(
            f"{what} failed: the image is locked by another process ({reason})",
            hint=LOCKED_HINT,
        )
    return TransferError(
        f"{what} into {target} failed: {reason}", hint="run with --debug for the full output"
    )


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


def check_send(
    transport: Transport,
    source: ExportSource,
    target: Path | str,
    *,
    backing: Path | str | None = None,
    local_target: bool = True,
) -> None:
    """What every transport checks before it copies: the source is one it reads and exists, ``backing`` only
    for transports that write incrementals, and a local path when the transport writes only those.

    :raise UnsupportedError: a source it cannot read, or ``backing`` for a full-copy transport
    :raise UsageError: a ``host:path`` target for a local-only transport
    :raise NotFoundError: the source does not exist
    """
    name = transport.name
    if backing is not None and not transport.incremental:
        raise UnsupportedError(
            f"the {name} transport makes full copies only, not incrementals on a backing file",
            hint="use the nbd transport for incremental backups",
        )
    if not transport.accepts(source):
        raise UnsupportedError(
            f"the {name} transport cannot read this {source.kind!r} source ({source.location})"
            + (" with a dirty bitmap" if source.dirty_bitmap else ""),
            hint="sources are 'file', 'block' or 'nbd'; incrementals need the nbd transport",
        )
    if local_target and isinstance(target, str) and ":" in target.split("/", 1)[0]:
        raise UsageError(f"the {name} transport writes local files only, not {target!r}", hint="use rsync")
    check_source(source)


@runtime_checkable
class Transport(Protocol):
    """Copies an exported snapshot to a target file (or ``host:path`` for remote transports).

    :cvar preference: transports are tried in this order (lowest first) when the user leaves the choice to
        vmsnap: the first that accepts the source is used
    :cvar incremental: ``send`` with ``backing`` writes only the changed extents of a source that names them
        (``ExportSource.dirty_bitmap``) into an overlay on ``backing``
    """

    name: ClassVar[str]
    preference: ClassVar[int]
    incremental: ClassVar[bool]

    def __init__(self, runner: Runner | None = None, **options: Any) -> None:
        """A transport whose commands run through ``runner`` (this host by default), with its options.

        :raise UsageError: an option it does not have
        """
        ...

    def accepts(self, source: ExportSource) -> bool:
        """True when this transport can read ``source``."""
        ...

    def send(
        self,
        source: ExportSource,
        target: Path | str,
        *,
        progress: Progress,
        backing: Path | str | None = None,
    ) -> TransferStats:
        """Write the source's guest-visible content to ``target``; fsync it before returning.

        :param backing: make ``target`` an overlay on this image holding only the changed extents (only
            transports whose ``incremental`` is true; the others refuse it)
        """
        ...
