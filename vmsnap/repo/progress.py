"""Progress of repository work (backup, restore, verify) reported per disk, in bytes.

The callers (the CLI's progress bar, tests) get ``(disk, bytes done, bytes total)``; hashing reports chunks,
which :func:`scaled` turns into bytes of the disk.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

DiskProgress = Callable[[str, int, int], None]
"""Progress of a repository operation: (disk name, bytes done, bytes total)."""


@attrs.frozen
class Transfer:
    """Where a disk's backup stands in a layout that reads the export itself (chunks), in bytes.

    :param read: read from the source
    :param stored: new blobs written to the store (compressed, encrypted)
    :param deduplicated: guest-visible bytes of chunks the store already had
    :param zero: guest-visible bytes that read as zeros (never stored)
    """

    read: int
    stored: int
    deduplicated: int
    zero: int


TransferProgress = Callable[[str, Transfer], None]
"""A backup's pipeline figures per disk, as they grow: (disk name, figures)."""


def no_transfer(disk: str, figures: Transfer) -> None:
    """The default :data:`TransferProgress`: report nothing."""


def no_progress(disk: str, done: int, total: int) -> None:
    """The default :data:`DiskProgress`: report nothing."""


def scaled(progress: DiskProgress, disk: str, virtual_size: int) -> Callable[[int, int], None]:
    """A hashing progress callback (chunks done, chunks to do) reported as bytes of ``disk``.

    The end (``done == total``) is not reported: the caller reports it once the disk is checked.
    """

    def report(done: int, total: int) -> None:
        if total and done < total:
            progress(disk, virtual_size * done // total, virtual_size)

    return report
