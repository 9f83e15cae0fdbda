"""The lab image's values: the built image, the error a build step raises, where builds are cached.

Shared by the parts of the build (:mod:`.packages`, :mod:`.initramfs`, :mod:`.builder`); imports none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from vmsnap.errors import CommandError, VmsnapError
from vmsnap.runner import LocalRunner, Runner

Progress = Callable[[str], None]


class LabImageError(VmsnapError):
    """The lab guest could not be built; the message names the step that failed."""

    default_hint = "install the packages in scripts/packages.d/lab.txt and check that apt-get works"


@attrs.frozen
class LabImage:
    """A built lab guest: what to pass to QEMU's ``-kernel``, ``-initrd`` and ``-append``.

    :param kernel: the uncompressed (PVH-bootable ELF) kernel
    :param initrd: the initramfs (cpio newc, uncompressed: TCG decompresses slowly)
    :param append: the kernel command line
    :param key: hash of the build's inputs (the cache directory's name)
    :param kernel_package: Debian package and version the kernel came from
    :param bzimage: the kernel as packaged (a bzImage with its EFI stub): what UEFI firmware boots (OVMF
        as ``-kernel``)
    """

    kernel: Path
    initrd: Path
    append: str
    key: str
    kernel_package: str
    bzimage: Path | None = None


def default_cache_dir() -> Path:
    """``$VMSNAP_LAB_CACHE``, else ``~/.cache/vmsnap/lab``."""
    configured = os.environ.get("VMSNAP_LAB_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "vmsnap" / "lab"


def run_step(
    runner: Runner, argv: Sequence[str], *, step: str, timeout: float = 600.0, cwd: Path | None = None
) -> str:
    """Run one build step on this host and return its stdout.

    :param step: what it does, for the message ("downloading linux-image-… 6.1")
    :param cwd: run there (with a local runner) instead of through ``runner``
    :raise LabImageError: the command failed
    """
    run = LocalRunner(cwd=cwd) if cwd is not None else runner
    try:
        return run.run(argv, timeout=timeout).stdout
    except CommandError as err:
        raise LabImageError(f"building the lab guest failed while {step}: {err.message}") from err
