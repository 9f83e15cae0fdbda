"""How vmsnap cuts a disk, defined once: guest-visible content in :data:`CHUNK_SIZE` chunks (the last one
short), and :class:`Extent`, a run of content that reads as zeros or holds data (with where it lives, when
a map of an image's layers says so). The chunk digests (:mod:`vmsnap.image.digest`), the repository's chunk
ids and indexes (:mod:`vmsnap.repo.chunks`) and the marker's ``chunk_size`` all use these; the NBD
block-status flags that say which extents read as zeros are :mod:`vmsnap.image.nbd`'s.
"""

from __future__ import annotations

import attrs

CHUNK_SIZE = 4 * 1024 * 1024
"""Bytes of guest-visible content per chunk (the last chunk of a disk may be shorter)."""


def chunk_count(size: int) -> int:
    """How many chunks a disk of ``size`` bytes has (0 for an empty disk)."""
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def chunk_length(index: int, size: int) -> int:
    """The length of chunk ``index`` of a disk of ``size`` bytes (:data:`CHUNK_SIZE`, the last one less)."""
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE)


@attrs.frozen
class Extent:
    """A run of guest-visible content: ``zero`` when it is known to read as zeros (a hole or a zeroed range).

    A map of an image's layers also says where its data lives:

    :param layer: index of the file that holds it (``-1``: read over NBD, or not known; unused for zeros)
    :param host_offset: where in that file it starts
    :param top: the image's own top layer holds it (allocated there: data or zeros)
    """

    start: int
    length: int
    zero: bool
    layer: int = -1
    host_offset: int = 0
    top: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length
