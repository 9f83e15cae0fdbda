"""The lab guest's kernel: which Debian package, downloaded once into the cache, and its uncompressed ELF.

The package is what ``linux-image-amd64`` depends on (or ``$VMSNAP_LAB_KERNEL_PACKAGE``); apt's answer is
remembered until apt's package lists change, and the ``.deb`` stays in ``CACHE/debs`` across builds.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import re
import struct
from pathlib import Path

from vmsnap.lab.image.base import LabImageError, Progress, run_step
from vmsnap.runner import Runner

#: the meta-package whose dependency names the kernel package to use (override: VMSNAP_LAB_KERNEL_PACKAGE)
KERNEL_META_PACKAGE = "linux-image-amd64"


def kernel_package(cache_dir: Path, runner: Runner) -> tuple[str, str]:
    """(package, version) of the kernel to use: ``VMSNAP_LAB_KERNEL_PACKAGE`` or what the meta-package
    depends on.

    apt-cache takes seconds on a loaded host, so the answer is remembered in ``cache_dir`` until apt's
    package lists change (``apt-get update``).

    :raise LabImageError: apt-cache failed or named no kernel
    """
    wanted = os.environ.get("VMSNAP_LAB_KERNEL_PACKAGE", "").strip()
    memo = cache_dir / "apt-kernel.json"
    lists = _apt_lists_stamp()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(memo.read_text())
        if known["lists"] == lists and known["wanted"] == wanted:
            return str(known["package"]), str(known["version"])
    package, version = _ask_apt(runner, wanted)
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"lists": lists, "wanted": wanted, "package": package, "version": version}))
        tmp.replace(memo)
    return package, version


def _ask_apt(runner: Runner, wanted: str) -> tuple[str, str]:
    package = wanted
    if not package:
        out = run_step(
            runner,
            ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
            step=f"asking apt which kernel {KERNEL_META_PACKAGE} depends on",
        )
        match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,]*)", out, re.MULTILINE)
        if match is None:
            raise LabImageError(f"apt-cache show {KERNEL_META_PACKAGE} names no kernel package")
        package = match.group(1)
    argv = ["apt-cache", "show", "--no-all-versions", package]
    out = run_step(runner, argv, step=f"asking apt for {package}'s version")
    version = re.search(r"^Version:\s*(\S+)", out, re.MULTILINE)
    if version is None:
        raise LabImageError(f"apt-cache show {package} has no version")
    return package, version.group(1)


def _apt_lists_stamp() -> str:
    """Changes whenever apt's view of the archive does (its package lists and their cache)."""
    parts = []
    for path in (
        Path("/var/lib/apt/lists"),
        Path("/var/cache/apt/pkgcache.bin"),
        Path("/etc/apt/sources.list"),
    ):
        with contextlib.suppress(OSError):
            info = path.stat()
            parts.append(f"{path}:{info.st_mtime_ns}:{info.st_size}")
    return "|".join(parts)


def download(cache_dir: Path, runner: Runner, package: str, version: str, say: Progress) -> Path:
    """The ``.deb`` of ``package`` ``version`` in ``cache_dir/debs``, downloaded with apt-get unless there.

    :raise LabImageError: apt-get failed or left no .deb
    """
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    quoted = version.replace(":", "%3a")
    deb = debs / f"{package}_{quoted}_amd64.deb"
    if deb.exists():
        return deb
    say(f"apt-get download {package}={version}")
    run_step(
        runner,
        ["apt-get", "download", "-q", f"{package}={version}"],
        step=f"downloading {package} {version}",
        cwd=debs,
    )
    if not deb.exists():
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise LabImageError(f"apt-get download {package} left no .deb in {debs}")
        return found[-1]
    return deb


def kernel_release(unpacked: Path) -> str:
    """The kernel release (``6.1.0-18-amd64``) of a kernel package unpacked into ``unpacked``.

    :raise LabImageError: the package has no ``/boot/vmlinuz-*``
    """
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabImageError(f"the kernel package unpacked into {unpacked} has no /boot/vmlinuz-*")
    return kernels[0].name.removeprefix("vmlinuz-")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside an x86 bzImage with an xz payload.

    The boot header holds the payload's offset and length at 0x248; the ELF has a PVH entry note, so QEMU
    boots it directly and the guest skips its slow (under TCG) decompressor.

    :raise LabImageError: not a bzImage, or its payload is not xz
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise LabImageError("the kernel image is not an x86 bzImage")
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise LabImageError("the kernel's payload is not xz-compressed; cannot extract it")
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    except lzma.LZMAError as err:
        raise LabImageError(f"the kernel's xz payload is damaged: {err}") from err
    if not elf.startswith(b"\x7fELF"):
        raise LabImageError("the kernel's payload is not an ELF image")
    return elf
