"""The chunks data path against real QEMU tools: qcow2 images written with qemu-io (patterns, seeded random
data, zeroed ranges, a short last chunk) are backed up over qemu-nbd into a LocalStore and restored to raw,
qcow2 and a loop block device, each checked with ``qemu-img compare``; an incremental from a persistent
dirty bitmap reads only the changed chunks; identical images share their chunks; an encrypted store holds no
plaintext; a 64 GiB sparse disk is backed up within a bounded memory; a full target leaves nothing behind."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.repo.chunks.mounts import loop_device, tmpfs
from vmsnap.errors import TransferError
from vmsnap.image.nbd import QemuNbdServer
from vmsnap.model import Disk, ExportSource
from vmsnap.repo.chunks.blob import CHUNK_SIZE, ChunkCodec
from vmsnap.repo.chunks.index import ChunkIndex, decode_index, encode_index
from vmsnap.repo.chunks.keys import create_key_file
from vmsnap.repo.chunks.pipeline import DiskBackup, backup_disk, list_known_chunks
from vmsnap.repo.chunks.readers import FileReader, NbdReader, open_image, open_source
from vmsnap.repo.chunks.restore import restore_disk
from vmsnap.repo.stores.local import LocalStore

MiB = 1024 * 1024
SIZE = 40 * MiB + 512 * 1024  # 11 chunks, the last 512 KiB
MARKER = b"<<vmsnap plaintext marker 0123456789>>"


def random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def build_image(workdir: Path, name: str = "src.qcow2") -> Path:
    """40.5 MiB qcow2: a pattern over two chunks, 6 MiB of seeded random data across a chunk boundary, a
    zeroed range, a marker text, sparse space, and data in the short last chunk."""
    image = workdir / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    rnd = random_file(workdir / "random.bin", 6 * MiB, seed=7)
    marker = workdir / "marker.bin"
    marker.write_bytes(MARKER * (65536 // len(MARKER) + 1))
    qemu_io(
        image,
        "write -P 0xab 0 8M",
        f"write -s {rnd} 13M 6M",
        "write -z 20M 4M",
        f"write -s {marker} 28M 1M",
        "write -P 0x5a 40M 256K",
    )
    return image


def compare(image: Path, other: Path, fmt: str) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(image), str(other)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def back_up(image: Path, store: LocalStore, codec: ChunkCodec, **options: object) -> DiskBackup:
    with open_image(image, "qcow2", connections=2) as reader:
        assert isinstance(reader, NbdReader)
        result = backup_disk(reader, store, codec, known=list_known_chunks(store), workers=2, **options)  # type: ignore[arg-type]
        assert result.stats.bytes_read == reader.bytes_read
        return result


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return build_image(tmp_path)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_full_backup_restores_to_raw_and_qcow2(tmp_path: Path, image: Path, encrypted: bool) -> None:
    codec = ChunkCodec(create_key_file(tmp_path / "repo.key") if encrypted else None)
    store = LocalStore(tmp_path / "store", create=True)
    result = back_up(image, store, codec)
    stats = result.stats
    # chunks 0-1: 0xab (one blob); 3-4: random; 5: zeroed; 7: marker; 10: pattern; the rest never written
    assert stats.virtual_size == SIZE and len(result.index) == 11
    assert (stats.new_chunks, stats.reused_chunks) == (5, 1)
    assert stats.bytes_read < 8 * MiB + 6 * MiB + 2 * MiB + 1 * MiB + 512 * 1024  # holes and zeros unread
    assert stats.zero_chunks == 5 and stats.zero_bytes == 5 * CHUNK_SIZE
    key = codec.key
    index = decode_index(encode_index(result.index, key), key)
    for fmt in ("raw", "qcow2"):
        target = tmp_path / f"restored.{fmt}"
        restore_disk(index, store, codec, target, format=fmt, workers=2)
        compare(image, target, fmt)
    assert (tmp_path / "restored.raw").stat().st_blocks * 512 < 24 * MiB  # sparse


def test_incremental_from_a_persistent_dirty_bitmap(tmp_path: Path, image: Path) -> None:
    codec = ChunkCodec()
    store = LocalStore(tmp_path / "store", create=True)
    full = back_up(image, store, codec)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    rnd = random_file(tmp_path / "random2.bin", 2 * MiB, seed=8)
    # chunk 1; chunks 3 and 4 (across the 16 MiB boundary); chunk 10 (the short last one)
    qemu_io(image, "write -P 0x77 5M 1M", f"write -s {rnd} 15M 2M", "write -P 0x78 40M 64K")
    with open_image(image, "qcow2", connections=2, bitmap="b0") as reader:
        assert isinstance(reader, NbdReader)
        changed = reader.dirty_chunks(CHUNK_SIZE)
        assert changed == {1, 3, 4, 10}
        known = list_known_chunks(store)
        result = backup_disk(reader, store, codec, parent=full.index, changed=changed, known=known, workers=2)
        read = reader.bytes_read
    stats = result.stats
    assert stats.unchanged_chunks == 7 and stats.unchanged_bytes == 7 * CHUNK_SIZE
    assert 0 < read == stats.bytes_read <= 3 * CHUNK_SIZE + 512 * 1024
    assert stats.new_chunks == 4  # each changed chunk differs from every stored one
    for number in (0, 2, 5, 6, 7, 8, 9):
        assert result.index.chunk_id(number) == full.index.chunk_id(number)
    target = tmp_path / "incremental.raw"
    restore_disk(result.index, store, codec, target)
    compare(image, target, "raw")
    old = tmp_path / "full.qcow2"
    restore_disk(full.index, store, codec, old, format="qcow2")  # the full backup is still whole
    changed_result = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image), str(old)]
    )
    assert changed_result.returncode == 1


def test_identical_images_store_their_chunks_once(tmp_path: Path, image: Path) -> None:
    twin = tmp_path / "twin.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(image), str(twin)], check=True)
    codec = ChunkCodec()
    store = LocalStore(tmp_path / "store", create=True)
    first = back_up(image, store, codec)
    listing = sorted((o.key, o.size) for o in store.list())
    second = back_up(twin, store, codec)
    assert second.index == first.index
    assert (second.stats.new_chunks, second.stats.new_bytes) == (0, 0)
    assert second.stats.reused_chunks == first.stats.new_chunks + first.stats.reused_chunks
    assert sorted((o.key, o.size) for o in store.list()) == listing


def test_an_encrypted_store_holds_no_plaintext(tmp_path: Path, image: Path) -> None:
    source = random.Random(7).randbytes(6 * MiB)  # what qemu-io wrote at 13 MiB
    windows = [source[i : i + 64] for i in range(0, len(source), 512 * 1024)]

    def store_bytes(store: LocalStore) -> bytes:
        return b"".join(path.read_bytes() for path in sorted(store.root.rglob("*")) if path.is_file())

    plain = LocalStore(tmp_path / "plain", create=True)
    back_up(image, plain, ChunkCodec())
    everything = store_bytes(plain)
    assert all(window in everything for window in windows)  # the check can fail: random data is stored raw
    key = create_key_file(tmp_path / "repo.key")
    sealed = LocalStore(tmp_path / "sealed", create=True)
    result = back_up(image, sealed, ChunkCodec(key))
    sealed.put("vms/vm1/b1/disk0.index", encode_index(result.index, key))
    everything = store_bytes(sealed)
    assert MARKER not in everything and MARKER[:16] not in everything
    assert not any(window in everything for window in windows)
    assert bytes([0xAB]) * 64 not in everything and bytes([0x5A]) * 64 not in everything
    master = json.loads((tmp_path / "repo.key").read_text())["key"].encode()
    assert master not in everything and key.encryption_key not in everything


def test_a_raw_file_is_read_without_its_holes(tmp_path: Path, image: Path) -> None:
    raw = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    allocated = raw.stat().st_blocks * 512
    codec = ChunkCodec()
    store = LocalStore(tmp_path / "store", create=True)
    with open_image(raw, "raw") as reader:
        assert isinstance(reader, FileReader)
        result = backup_disk(reader, store, codec, workers=2)
    assert 0 < result.stats.bytes_read <= allocated < SIZE
    target = tmp_path / "restored.qcow2"
    restore_disk(result.index, store, codec, target, format="qcow2")
    compare(image, target, "qcow2")


def test_restore_onto_a_block_device_zeroes_its_holes(tmp_path: Path, image: Path) -> None:
    codec = ChunkCodec()
    store = LocalStore(tmp_path / "store", create=True)
    result = back_up(image, store, codec)
    backing = tmp_path / "device.img"
    backing.write_bytes(bytes([0xEE]) * (SIZE + MiB))  # old contents everywhere, one MiB to spare
    with loop_device(backing) as device:
        stats = restore_disk(result.index, store, codec, device, workers=2)
        assert stats.hole_chunks == 5
        subprocess.run(["blockdev", "--flushbufs", str(device)], check=True)
    # qemu-img compare would also check the device's spare MiB (it must read as zeros there): compare the
    # disk's range with the image's raw content instead
    reference = tmp_path / "reference.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(reference)], check=True
    )
    assert backing.read_bytes()[:SIZE] == reference.read_bytes()
    assert backing.read_bytes()[SIZE:] == bytes([0xEE]) * MiB  # nothing past the disk


MEMORY_PROBE = """
import json, sys
from pathlib import Path
from vmsnap.repo.chunks.blob import ChunkCodec
from vmsnap.repo.chunks.pipeline import backup_disk
from vmsnap.repo.chunks.readers import open_image
from vmsnap.repo.stores.local import LocalStore
image, store = Path(sys.argv[1]), LocalStore(Path(sys.argv[2]), create=True)
with open_image(image, "qcow2", connections=4) as reader:
    result = backup_disk(reader, store, ChunkCodec(), workers=4)
hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
print(json.dumps({"maxrss_kib": int(hwm[0].split()[1]),  # unlike ru_maxrss, not inherited from pytest
                  "bytes_read": result.stats.bytes_read, "chunks": len(result.index),
                  "new": result.stats.new_chunks}))
"""


def test_a_64_gib_sparse_disk_is_backed_up_in_bounded_memory(tmp_path: Path) -> None:
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64G"], check=True)
    # 320 MiB of data in ten places, each 4 MiB chunk with its own pattern: more than the bound if the
    # pipeline held what it read
    commands = []
    for place in range(10):
        for piece in range(8):
            offset = place * 6 * 1024 * MiB + piece * 4 * MiB
            commands.append(f"write -P {place * 8 + piece + 1} {offset} 4M")
    qemu_io(image, *commands)
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(image), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(probe.stdout)
    assert report["chunks"] == 16384 and report["bytes_read"] == 320 * MiB and report["new"] == 80
    assert report["maxrss_kib"] < 300 * 1024, report


def test_index_round_trip_keeps_every_id(tmp_path: Path, image: Path) -> None:
    store = LocalStore(tmp_path / "store", create=True)
    index = back_up(image, store, ChunkCodec()).index
    assert decode_index(encode_index(index)) == index
    assert ChunkIndex.holes(SIZE).referenced() == set()


def test_a_full_restore_target_fails_cleanly(tmp_path: Path, image: Path) -> None:
    codec = ChunkCodec()
    store = LocalStore(tmp_path / "store", create=True)
    result = back_up(image, store, codec)
    with tmpfs(tmp_path / "small", "size=4m,mode=0700") as small:
        for fmt in ("raw", "qcow2"):
            with pytest.raises(TransferError) as info:
                restore_disk(result.index, store, codec, small / f"disk.{fmt}", format=fmt)
            assert f"restore into {small / f'disk.{fmt}'} failed" in info.value.message
            assert "No space left" in info.value.message and "free space" in info.value.hint
            assert list(small.iterdir()) == []  # nothing partial, not even a temporary file


def test_readers_for_export_sources_and_a_missing_bitmap(tmp_path: Path, image: Path) -> None:
    disk = Disk("disk0", "", image, "qcow2", SIZE)
    raw = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    store = LocalStore(tmp_path / "store", create=True)
    indexes = []
    with open_source(ExportSource("file", str(image), "qcow2", disk, SIZE)) as reader:
        assert isinstance(reader, NbdReader)
        indexes.append(backup_disk(reader, store, ChunkCodec()).index)
    with open_source(ExportSource("file", str(raw), "raw", disk, SIZE)) as reader:
        assert isinstance(reader, FileReader)
        indexes.append(backup_disk(reader, store, ChunkCodec()).index)
    with QemuNbdServer(image, "qcow2") as server:
        source = ExportSource("nbd", server.uri, "raw", disk, SIZE, dirty_bitmap="b0")
        with open_source(source) as reader:
            assert isinstance(reader, NbdReader)
            indexes.append(backup_disk(reader, store, ChunkCodec()).index)
            with pytest.raises(TransferError, match="does not offer qemu:dirty-bitmap:b0"):
                reader.dirty_chunks(CHUNK_SIZE)  # never "nothing changed"
    assert indexes[0] == indexes[1] == indexes[2]
