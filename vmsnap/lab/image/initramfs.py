"""The lab guest's initramfs: this host's programs with their libraries, busybox, kernel modules, scripts.

:func:`host_files` lists what is copied from this host, :func:`assemble_root` lays the guest's root out in a
directory, and :func:`write_cpio` packs it as a reproducible cpio "newc" archive.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from vmsnap.guest import hook
from vmsnap.lab.image.base import LabImageError, run_step
from vmsnap.lab.image.contents import (
    GUEST_MODULES,
    GUEST_OPTIONAL_MODULES,
    GUEST_PROGRAMS,
    LVM_COMMANDS,
    generated_files,
)
from vmsnap.runner import Runner

_DIRECTORIES = (
    *("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys", "dev", "run"),
    *("tmp", "var/log", "var/run", "mnt", "root", hook.HOOK_DIR),
)

#: names the guest gets from e2fsprogs and dash, never from busybox
_OWN_NAMES = frozenset({"sh", "mkfs.ext2", "fsck.ext4", "mkfs.ext4", "mke2fs"})
_ALIASES = (("mkfs.ext4", "mke2fs"), ("fsck.ext4", "e2fsck"), ("mkfs.ext2", "mke2fs"))


def find_program(name: str) -> Path | None:
    """Where program ``name`` is on this host (sbin and bin first, then ``PATH``), or None."""
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def _is_static(program: Path) -> bool:
    # a dynamic ELF has a PT_INTERP naming the loader; a static busybox has none
    return b"/lib64/ld-linux" not in program.read_bytes()[:4096]


def _libraries(program: Path, runner: Runner) -> set[Path]:
    out = run_step(runner, ["ldd", str(program)], step=f"listing the libraries of {program}")
    libs: set[Path] = set()
    for line in out.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.add(Path(match.group(1)))
    return libs


def host_files(runner: Runner) -> list[Path]:
    """The host binaries for the guest and every library they load (sorted, absolute).

    :raise LabImageError: a program (or a static busybox) is not installed here
    """
    files: set[Path] = set()
    for program in GUEST_PROGRAMS:
        found = find_program(program)
        if found is None:
            raise LabImageError(
                f"{program} is not installed on this host; the lab guest needs it",
                hint="install the packages listed in scripts/packages.d/lab.txt",
            )
        files.add(found)
        files.update(_libraries(found, runner))
    busybox = find_program("busybox")
    if busybox is None or not _is_static(busybox):
        raise LabImageError("a static busybox is not installed", hint="apt-get install busybox-static")
    files.add(busybox)
    mke2fs_conf = Path("/etc/mke2fs.conf")
    if mke2fs_conf.exists():
        files.add(mke2fs_conf)
    return sorted(files)


def _copy_host_files(root: Path, files: Sequence[Path]) -> set[str]:
    """Copy ``files`` under ``root`` (the files themselves, not symlinks); the guest programs among them."""
    real_names: set[str] = set()
    for path in files:
        dest = root / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)  # follows symlinks: the guest gets the library itself
        dest.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
        if path.name in GUEST_PROGRAMS:
            real_names.add(path.name)
    return real_names


def _link_programs(root: Path) -> None:
    """Programs where the guest looks for them, whatever the host's /usr merge does; dash as /bin/sh, the
    e2fsprogs aliases, and lvm under each of its command names (it dispatches on argv[0])."""
    for program in GUEST_PROGRAMS:
        found = find_program(program)
        assert found is not None
        link = root / "usr/sbin" / program
        if not link.exists():
            link.symlink_to(str(found))
    (root / "bin/sh").symlink_to("/usr/sbin/dash" if (root / "usr/sbin/dash").exists() else "/bin/dash")
    for alias, program in _ALIASES:
        (root / "usr/sbin" / alias).symlink_to("/usr/sbin/" + program)
    for command in LVM_COMMANDS:
        (root / "usr/sbin" / command).symlink_to("/usr/sbin/lvm")


def _link_busybox(root: Path, taken: set[str], runner: Runner) -> None:
    """Every busybox applet that no real program (in ``taken``) provides, as a link to busybox."""
    busybox = find_program("busybox")
    assert busybox is not None
    applets = run_step(runner, [str(busybox), "--list-full"], step="listing busybox applets").split()
    for applet in applets:
        name = applet.rsplit("/", 1)[-1]
        dest = root / applet
        if name in taken or dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(str(busybox))


def assemble_root(root: Path, files: Sequence[Path], unpacked: Path, release: str, runner: Runner) -> None:
    """Lay the guest's root out under ``root``: host files, program links, busybox applets, the generated
    scripts and the kernel modules (with their dependencies) of ``release`` from the unpacked package.

    :raise LabImageError: a module is missing, or busybox or depmod failed
    """
    for d in _DIRECTORIES:
        (root / d).mkdir(parents=True, exist_ok=True)
    real_names = _copy_host_files(root, files)
    _link_programs(root)
    _link_busybox(root, real_names | set(LVM_COMMANDS) | _OWN_NAMES, runner)
    for rel, (text, mode) in generated_files().items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(mode)
    _copy_modules(root, unpacked, release, runner)


def _copy_modules(root: Path, unpacked: Path, release: str, runner: Runner) -> None:
    source = unpacked / "lib" / "modules" / release
    index = {_module_name(p): p for p in source.rglob("*.ko*")}
    wanted: list[str] = []
    pending = [m.replace("-", "_") for m in (*GUEST_MODULES, *GUEST_OPTIONAL_MODULES)]
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        if name not in index:
            if _is_builtin(source, name):
                continue
            raise LabImageError(f"kernel module {name} is not in {release}")
        wanted.append(name)
        pending.extend(_module_depends(index[name]))
    target = root / "lib" / "modules" / release
    for name in sorted(wanted):
        src = index[name]
        dest = target / src.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (source / meta).exists():
            shutil.copyfile(source / meta, target / meta)
    run_step(runner, ["depmod", "-b", str(root), release], step="running depmod for the guest's modules")


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _module_depends(path: Path) -> list[str]:
    data = path.read_bytes()
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if match is None or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d]


def _is_builtin(source: Path, name: str) -> bool:
    builtin = source / "modules.builtin"
    if not builtin.exists():
        return False
    return any(_module_name(Path(line)) == name for line in builtin.read_text().split())


def write_cpio(
    root: Path, out: io.BufferedWriter, *, extra_devices: dict[str, tuple[int, int, int]] | None = None
) -> None:
    """Write ``root`` as a deterministic cpio "newc" archive (owner root, mtime 0, sorted names).

    :param extra_devices: device nodes to add without creating them on the host: name → (mode, major, minor)
    """
    inode = 0

    def entry(name: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal inode
        inode += 1
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        name = path.relative_to(root).as_posix()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            entry(name, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISDIR(info.st_mode):
            entry(name, stat.S_IFDIR | (info.st_mode & 0o7777), b"", nlink=2)
        else:
            entry(name, stat.S_IFREG | (info.st_mode & 0o7777), path.read_bytes())
    for name, (mode, major, minor) in sorted((extra_devices or {}).items()):
        entry(name, mode, b"", rdev=(major, minor))
    entry("TRAILER!!!", 0, b"")
