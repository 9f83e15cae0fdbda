"""The chunked content digest of an image (``sha256-4MiB-chunks``, :mod:`vmsnap.image.digest`) against an
independent computation: the documented shell recipe, every way of reading an image, reuse of a parent's
digests and the overlay fast path that reads an incremental's own qcow2 tables."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.digests import ODD_SIZE, PIECE, MiB, independent_chunks
from vmsnap.image.digest import ChunkDigests, image_chunks, overlay_map


def test_the_documented_shell_recipe_gives_the_manifest_digest(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", size=str(ODD_SIZE))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 3M 2M", "-c", "write -P 0x5b 10M 64k", str(image)],
        check=True,
        capture_output=True,
    )
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    subprocess.run(["split", "-b", "4M", "-d", "-a", "8", str(raw), str(pieces / "c.")], check=True)
    names = sorted(str(p) for p in pieces.iterdir())
    listing = subprocess.run(["sha256sum", *names], check=True, capture_output=True, text=True).stdout
    digests = b"".join(bytes.fromhex(line.split()[0]) for line in listing.splitlines())
    assert len(names) == 3
    assert hashlib.sha256(digests).hexdigest() == image_chunks(image).root


def test_an_overlay_reuses_the_parents_digests_except_where_its_own_clusters_are(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", size=str(ODD_SIZE))
    subprocess.run(["qemu-io", "-c", "write -P 0x01 0 10M", str(base)], check=True, capture_output=True)
    top = make_image(tmp_path / "top.qcow2", backing=base)
    subprocess.run(
        ["qemu-io", "-c", f"write -P 0x02 {PIECE + 100} 10", "-c", "write -z 8M 2M", str(top)],
        check=True,
        capture_output=True,
    )
    parent = image_chunks(base)
    # poison the parent's digest of chunk 0, which the overlay does not touch: it must be taken as it is
    poisoned = ChunkDigests(parent.size, b"\xee" * 32 + parent.digests[32:])
    reused = image_chunks(top, parent=poisoned)
    truth = independent_chunks(top, tmp_path)
    assert reused.chunk(0) == b"\xee" * 32
    assert [reused.chunk(1), reused.chunk(2)] == truth[1:]
    assert truth[2] == hashlib.sha256(bytes(ODD_SIZE - 8 * MiB)).digest()  # zeroed: not the parent's
    assert image_chunks(top).digests == b"".join(truth)  # without a parent: everything read


@pytest.mark.parametrize(
    "kind", ["compressed", "raw", "internal-snapshot", "chain-with-compressed-base", "empty"]
)
def test_every_way_of_reading_gives_the_same_digest(tmp_path: Path, kind: str) -> None:
    plain = make_image(tmp_path / "plain.qcow2", size=str(ODD_SIZE))
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x33 1M 3M", "-c", "write -P 0x34 9M 1M", str(plain)],
        check=True,
        capture_output=True,
    )
    options: dict[str, object] = {}
    fmt = "qcow2"
    if kind == "compressed":
        image = tmp_path / "c.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(image)], check=True)
    elif kind == "raw":
        image, fmt = tmp_path / "r.raw", "raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(plain), str(image)], check=True)
    elif kind == "internal-snapshot":
        image = tmp_path / "s.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(plain), str(image)], check=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(image)], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x99 0 8M", str(image)], check=True, capture_output=True)
        options["image_opts"] = {"snapshot.name": "s1"}
    elif kind == "chain-with-compressed-base":
        base = tmp_path / "cb.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(base)], check=True)
        image = make_image(tmp_path / "ct.qcow2", backing=base)
        subprocess.run(["qemu-io", "-c", "write -P 0x35 2M 64k", str(image)], check=True, capture_output=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x35 2M 64k", str(plain)], check=True, capture_output=True)
    else:
        image = plain = make_image(tmp_path / "e.qcow2", size=str(ODD_SIZE))
    expected = independent_chunks(plain, tmp_path)
    assert image_chunks(image, fmt, **options).digests == b"".join(expected)  # type: ignore[arg-type]
    if kind == "empty":
        assert image_chunks(image).digests == ChunkDigests.zeros(ODD_SIZE).digests


def _qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def _create(
    image: Path, size: int | None, *options: str, backing: Path | None = None, backing_fmt: str = "qcow2"
) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "raw" if image.suffix == ".raw" else "qcow2", *options]
    if backing is not None:
        argv += ["-b", backing.name, "-F", backing_fmt]
    subprocess.run([*argv, str(image), *([str(size)] if size is not None else [])], check=True)
    return image


@pytest.mark.parametrize(
    "chain", ["qcow2", "three-deep-mixed-clusters", "raw-base", "short-base", "v2-base", "compressed-base"]
)
def test_the_overlay_fast_path_agrees_with_an_independent_digest(tmp_path: Path, chain: str) -> None:
    """An incremental's digests from its own qcow2 tables (vmsnap.image.qcow2) equal the independent ones;
    a chain it does not understand (a compressed cluster where the overlay changed) is read through QEMU."""
    size = ODD_SIZE // 2 if chain == "short-base" else ODD_SIZE
    if chain == "raw-base":
        base = _create(tmp_path / "base.raw", size)
    elif chain == "v2-base":
        base = _create(tmp_path / "base.qcow2", size, "-o", "compat=0.10")
    else:
        cluster = "4k" if chain == "three-deep-mixed-clusters" else "64k"
        base = _create(tmp_path / "base.qcow2", size, "-o", f"cluster_size={cluster}")
    _qemu_io(base, "write -P 0x61 0 3M", f"write -P 0x62 {size - 8192} 8192", fmt=base.suffix[1:])
    if chain == "compressed-base":
        compressed = tmp_path / "base-c.qcow2"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(base), str(compressed)], check=True)
        base = compressed
    below = base
    if chain == "three-deep-mixed-clusters":
        below = _create(tmp_path / "middle.qcow2", None, "-o", "cluster_size=1M", backing=base)
        _qemu_io(below, "write -P 0x63 2M 2M", "write -z 5M 1M")
    backing_fmt = "raw" if below.suffix == ".raw" else "qcow2"
    # the parent's digests: what the backing reads like at the overlay's size (zeros past a shorter base)
    parent = image_chunks(_create(tmp_path / "empty.qcow2", ODD_SIZE, backing=below, backing_fmt=backing_fmt))
    top = _create(tmp_path / "top.qcow2", ODD_SIZE, backing=below, backing_fmt=backing_fmt)
    _qemu_io(
        top, f"write -P 0x64 {PIECE - 4096} 12k", "write -z 1M 64k", f"write -P 0x65 {ODD_SIZE - 4096} 4k"
    )
    assert (overlay_map(top) is None) == (chain == "compressed-base")
    expected = b"".join(independent_chunks(top, tmp_path))
    assert image_chunks(top, parent=parent).digests == expected
    assert image_chunks(top).digests == expected
