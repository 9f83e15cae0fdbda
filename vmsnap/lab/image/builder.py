"""Build the lab guest (a stock Debian kernel + a small initramfs with qemu-ga, LVM and e2fsprogs), cached.

The build is reproducible and keyed by a hash of everything that goes in (kernel package and version, the
host binaries and libraries copied, the generated scripts), so a second call with the same inputs only looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import attrs

from vmsnap.errors import VmsnapError
from vmsnap.lab.image import initramfs, kernel
from vmsnap.lab.image.base import LabImage, LabImageError, Progress, default_cache_dir, run_step
from vmsnap.lab.image.contents import (
    GUEST_MODULES,
    GUEST_OPTIONAL_MODULES,
    GUEST_PROGRAMS,
    KERNEL_APPEND,
    LVM_COMMANDS,
    generated_files,
)
from vmsnap.runner import LocalRunner, Runner

#: bump when the layout of the initramfs or /init changes in a way the inputs below do not capture
BUILDER_VERSION = "2"

KEEP_BUILDS = 3
"""Builds kept in the cache (older ones are removed after a new build, unless a process uses them; each is
about 90 MB)."""

IN_USE = ".in-use"
"""A file in each build that every process using the build holds a shared ``flock`` on until it exits, so
that a prune (by a newer build, in another worktree or test run) never removes it under a running guest."""

_in_use: dict[Path, int] = {}
"""Build directory → the open file descriptor of its :data:`IN_USE` lock held by this process."""


@attrs.define
class LabImageBuilder:
    """Builds (or finds in the cache) the lab guest.

    :param cache_dir: where builds and downloaded .debs live (default :func:`default_cache_dir`)
    :param runner: runs apt-get, apt-cache, dpkg, ldd and depmod on this host
    :param progress: called with a short line per step (None: silent)
    """

    cache_dir: Path = attrs.Factory(default_cache_dir)
    runner: Runner = attrs.Factory(LocalRunner)
    progress: Progress | None = None

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    # -- inputs

    def kernel_package(self) -> tuple[str, str]:
        """(package, version) of the kernel to use (see :func:`~vmsnap.lab.image.kernel.kernel_package`)."""
        return kernel.kernel_package(self.cache_dir, self.runner)

    def host_files(self) -> list[Path]:
        """The host binaries for the guest and every library they load (sorted, absolute)."""
        return initramfs.host_files(self.runner)

    def key(self, package: str, version: str, files: Iterable[Path]) -> str:
        """The hash of every input: builder version, kernel, host files' contents, generated files."""
        digest = hashlib.sha256()
        parts: dict[str, object] = {
            "builder": BUILDER_VERSION,
            "kernel": f"{package}={version}",
            "modules": list(GUEST_MODULES),
            "optional_modules": list(GUEST_OPTIONAL_MODULES),
            "programs": list(GUEST_PROGRAMS),
            "lvm_commands": list(LVM_COMMANDS),
            "append": KERNEL_APPEND,
            "generated": {k: v[0] for k, v in sorted(generated_files().items())},
        }
        digest.update(json.dumps(parts, sort_keys=True).encode())
        for path in files:
            digest.update(str(path).encode() + b"\0")
            digest.update(_file_sha256(path).encode())
        return digest.hexdigest()[:20]

    # -- the build

    def build(self, *, force: bool = False) -> LabImage:
        """The lab guest for the current inputs, built unless the cache holds it.

        :param force: rebuild even when the cache holds a build with this key
        :raise LabImageError: a step failed (apt-get, dpkg, a missing program); the message names it
        """
        package, version = self.kernel_package()
        files = self.host_files()
        key = self.key(package, version, files)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        target = self.cache_dir / key
        image = LabImage(
            kernel=target / "vmlinux",
            initrd=target / "initrd.cpio",
            append=KERNEL_APPEND,
            key=key,
            kernel_package=f"{package}={version}",
            bzimage=target / "vmlinuz",
        )
        if not force and _hold(target):
            return image
        with _locked(self.cache_dir / ".lock"):
            if not force and _hold(target):
                return image  # another process built it while we waited
            self._say(f"building the lab guest {key} from {package} {version}")
            with tempfile.TemporaryDirectory(prefix=".build-", dir=self.cache_dir) as tmp:
                staged = self._stage(Path(tmp), image, package, version, files)
                if target.exists():
                    with contextlib.suppress(KeyError):
                        os.close(_in_use.pop(target))
                    shutil.rmtree(target)
                staged.rename(target)
            if not _hold(target):
                raise LabImageError(f"the lab guest built into {target} is not there")
            self._say(f"lab guest cached in {target}")
            self.prune(keep=KEEP_BUILDS)
        return image

    def _stage(self, work: Path, image: LabImage, package: str, version: str, files: Sequence[Path]) -> Path:
        """Build into ``work/out``: the uncompressed kernel, the initramfs, the manifest (written last)."""
        deb = kernel.download(self.cache_dir, self.runner, package, version, self._say)
        unpacked = work / "kernel"
        run_step(self.runner, ["dpkg-deb", "-x", str(deb), str(unpacked)], step=f"unpacking {deb.name}")
        staged = work / "out"
        staged.mkdir()
        kernel_release = kernel.kernel_release(unpacked)
        self._say("extracting the uncompressed kernel (PVH boot)")
        (staged / "vmlinux").write_bytes(
            kernel.extract_vmlinux((unpacked / "boot" / f"vmlinuz-{kernel_release}").read_bytes())
        )
        # the compressed kernel as packaged: an EFI application (UEFI firmware boots it, -kernel with OVMF)
        shutil.copyfile(unpacked / "boot" / f"vmlinuz-{kernel_release}", staged / "vmlinuz")
        root = work / "root"
        self._say("assembling the initramfs")
        initramfs.assemble_root(root, files, unpacked, kernel_release, self.runner)
        with open(staged / "initrd.cpio", "wb") as out:
            initramfs.write_cpio(root, out, extra_devices={"dev/console": (0o020600, 5, 1)})
        manifest = {
            "key": image.key,
            "kernel_package": image.kernel_package,
            "kernel_release": kernel_release,
            "append": KERNEL_APPEND,
            "files": [str(f) for f in files],
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return staged

    def prune(self, *, keep: int) -> list[Path]:
        """Remove all but the ``keep`` newest builds from the cache (downloaded .debs stay), except those a
        running process uses (see :data:`IN_USE`).

        :return: the build directories removed
        """
        builds = sorted(
            (d for d in self.cache_dir.iterdir() if (d / "manifest.json").is_file()),
            key=lambda d: (d / "manifest.json").stat().st_mtime,
            reverse=True,
        )
        removed = []
        for old in builds[keep:]:
            if old in _in_use:
                continue
            try:
                fd = os.open(old / IN_USE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # in use
            try:  # unusable first (no manifest), then gone
                (old / "manifest.json").unlink()
                shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(old)
        return removed


def build_lab_image(
    *, cache_dir: Path | None = None, force: bool = False, progress: Progress | None = None
) -> LabImage:
    """Build (or reuse) the lab guest; see :class:`LabImageBuilder`.

    :raise LabImageError: a build step failed
    """
    builder = LabImageBuilder(progress=progress)
    if cache_dir is not None:
        builder.cache_dir = cache_dir
    return builder.build(force=force)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hold(build: Path) -> bool:
    """Take (once per process) a shared lock on ``build``'s :data:`IN_USE` file and keep it until this
    process exits; True when the build is complete (its manifest exists) and now held."""
    if build in _in_use:
        return (build / "manifest.json").exists()
    try:
        fd = os.open(build / IN_USE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False  # no such build (yet)
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not (build / "manifest.json").exists():  # not built yet, or a prune took it
        os.close(fd)
        return False
    _in_use[build] = fd
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: concurrent test runs build the guest once."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmsnap.lab.image [--force] [--cache DIR]``: build (or find) the lab guest; print paths."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m vmsnap.lab.image", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has this build")
    parser.add_argument("--cache", type=Path, help="cache directory (default: $VMSNAP_LAB_CACHE or ~/.cache)")
    args = parser.parse_args(argv)
    try:
        image = build_lab_image(
            cache_dir=args.cache, force=args.force, progress=lambda line: print(line, file=sys.stderr)
        )
    except VmsnapError as err:
        print(f"vmsnap.lab.image: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps({k: str(v) for k, v in attrs.asdict(image).items()}, indent=2))
    return 0
