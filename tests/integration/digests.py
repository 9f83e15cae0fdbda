"""An independent computation of the repository's content digest (``sha256-4MiB-chunks``): raw bytes from
``qemu-img convert -O raw``, split in 4 MiB pieces, each hashed, the digests hashed again."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

MiB = 1024 * 1024
PIECE = 4 * MiB
ODD_SIZE = 10 * MiB + 192 * 1024  # three chunks, the last 2.1875 MiB


def independent_chunks(image: Path, workdir: Path, fmt: str = "qcow2") -> list[bytes]:
    """sha256 of each 4 MiB piece of the image's raw content, computed the obvious way."""
    raw = workdir / f"{image.name}.independent.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
    try:
        digests = []
        with open(raw, "rb") as f:
            while piece := f.read(PIECE):
                digests.append(hashlib.sha256(piece).digest())
        return digests
    finally:
        raw.unlink()


def independent_root(digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()
