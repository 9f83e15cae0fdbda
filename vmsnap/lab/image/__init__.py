"""The lab guest image: a stock Debian kernel and a small initramfs with qemu-ga, LVM and e2fsprogs, cached.

:func:`build_lab_image` returns a :class:`LabImage` (kernel, initrd, command line) for QEMU's direct kernel
boot. The parts, one concern each: :mod:`.contents` (what the guest holds), :mod:`.kernel` (the kernel
package: apt, download cache, the uncompressed ELF), :mod:`.initramfs` (host programs, modules, the cpio
archive) and :mod:`.builder` (the cache keyed by every input, and the build itself).
"""

from __future__ import annotations

import typing

from vmsnap.lab.image.base import LabImage, LabImageError, Progress, default_cache_dir
from vmsnap.lab.image.builder import BUILDER_VERSION, KEEP_BUILDS, LabImageBuilder, build_lab_image, main
from vmsnap.lab.image.contents import (
    AGENT_PORT,
    GUEST_DATA_PREFIX,
    GUEST_MODULES,
    GUEST_PROGRAMS,
    HOOK_DIR,
    HOOK_LOG,
    HOOK_PATH,
    KERNEL_APPEND,
    LVM_COMMANDS,
    generated_files,
)
from vmsnap.lab.image.initramfs import write_cpio
from vmsnap.lab.image.kernel import KERNEL_META_PACKAGE, extract_vmlinux

__all__ = [
    "AGENT_PORT",
    "BUILDER_VERSION",
    "GUEST_DATA_PREFIX",
    "GUEST_MODULES",
    "GUEST_PROGRAMS",
    "HOOK_DIR",
    "HOOK_LOG",
    "HOOK_PATH",
    "KEEP_BUILDS",
    "KERNEL_APPEND",
    "KERNEL_META_PACKAGE",
    "LVM_COMMANDS",
    "LabImage",
    "LabImageBuilder",
    "LabImageError",
    "Progress",
    "build_lab_image",
    "default_cache_dir",
    "extract_vmlinux",
    "generated_files",
    "main",
    "write_cpio",
]


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
