"""The chunk geometry is defined once (vmsnap.image.geometry) and every user reads it from there."""

from __future__ import annotations

import pytest

from vmsnap.image import digest, geometry, nbd
from vmsnap.image.geometry import CHUNK_SIZE, Extent, chunk_count, chunk_length
from vmsnap.repo import manifest, marker
from vmsnap.repo.chunks import blob, index, readers


@pytest.mark.parametrize(
    ("size", "count", "last"),
    [
        (0, 0, None),
        (1, 1, 1),
        (CHUNK_SIZE, 1, CHUNK_SIZE),
        (CHUNK_SIZE + 1, 2, 1),
        (3 * CHUNK_SIZE, 3, CHUNK_SIZE),
    ],
)
def test_a_disk_is_cut_in_4_mib_chunks_the_last_one_short(size: int, count: int, last: int | None) -> None:
    assert CHUNK_SIZE == 4 * 1024 * 1024
    assert chunk_count(size) == count
    if last is not None:
        assert chunk_length(count - 1, size) == last
        assert sum(chunk_length(n, size) for n in range(count)) == size


def test_an_extent_knows_its_end_and_where_its_data_lives() -> None:
    extent = Extent(8, 4, False, layer=1, host_offset=4096)
    assert extent.end == 12 and not extent.top


def test_every_user_has_the_one_definition() -> None:
    assert digest.CHUNK_SIZE is blob.CHUNK_SIZE is marker.CHUNK_SIZE is geometry.CHUNK_SIZE
    assert manifest.INDEX_CHUNK_SIZE == geometry.CHUNK_SIZE
    assert digest.chunk_count is index.chunk_count is geometry.chunk_count
    assert digest.Extent is readers.Extent is geometry.Extent
    assert readers.STATE_ZERO is nbd.STATE_ZERO and readers.DIRTY is nbd.DIRTY
