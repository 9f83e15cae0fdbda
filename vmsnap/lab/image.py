"""Build the lab guest (a stock Debian kernel + a small initramfs with qemu-ga, LVM and e2fsprogs), cached.

The build is reproducible and keyed by a hash of everything that goes in (kernel package and version, the
host binaries and libraries copied, the generated scripts), so a second call with the same inputs only looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import attrs

from vmsnap.errors import CommandError, VmsnapError
from vmsnap.guest.hook import dispatcher_script
from vmsnap.runner import LocalRunner, Runner

#: bump when the layout of the initramfs or /init changes in a way the inputs below do not capture
BUILDER_VERSION = "1"

#: the meta-package whose dependency names the kernel package to use (override: VMSNAP_LAB_KERNEL_PACKAGE)
KERNEL_META_PACKAGE = "linux-image-amd64"

#: host programs copied into the guest with the libraries ``ldd`` lists (the rest comes from busybox)
GUEST_PROGRAMS: tuple[str, ...] = (
    "dash",
    "qemu-ga",
    "lvm",
    "dmsetup",
    "mke2fs",
    "e2fsck",
    "debugfs",
    "tune2fs",
    "dumpe2fs",
    "fsfreeze",
    "blkid",
    "dd",
)

#: names under which ``lvm`` runs its subcommands (it dispatches on argv[0])
LVM_COMMANDS: tuple[str, ...] = tuple(
    [
        "pvcreate",
        "pvremove",
        "pvs",
        "pvscan",
        "pvdisplay",
        "pvchange",
        "pvresize",
        "pvmove",
        "vgcreate",
        "vgremove",
        "vgs",
        "vgscan",
        "vgchange",
        "vgdisplay",
        "vgextend",
        "vgreduce",
        "vgrename",
        "lvcreate",
        "lvremove",
        "lvs",
        "lvscan",
        "lvchange",
        "lvconvert",
        "lvextend",
        "lvreduce",
        "lvresize",
        "lvrename",
        "lvdisplay",
    ]
)

#: kernel modules loaded at boot (their dependencies come along)
GUEST_MODULES: tuple[str, ...] = (
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "crct10dif_generic",
    "virtio_console",
    "virtio_rng",
    "ext4",
    "dm_mod",
    "dm_snapshot",
    "dm_thin_pool",
    "loop",
)

GUEST_DATA_PREFIX = "data"
"""A virtio disk whose serial starts with this is formatted (ext4, when blank) and mounted at /mnt/SERIAL."""

AGENT_PORT = "org.qemu.guest_agent.0"
HOOK_PATH = "/etc/qemu/fsfreeze-hook"
HOOK_DIR = "/etc/qemu/fsfreeze-hook.d"
HOOK_LOG = "/var/log/vmsnap-fsfreeze-hook.log"
KERNEL_APPEND = "console=ttyS0 loglevel=4 panic=-1 rdinit=/init"

KEEP_BUILDS = 3
"""Builds kept in the cache (older ones are removed after a new build; each is about 90 MB)."""

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
    """

    kernel: Path
    initrd: Path
    append: str
    key: str
    kernel_package: str


def default_cache_dir() -> Path:
    """``$VMSNAP_LAB_CACHE``, else ``~/.cache/vmsnap/lab``."""
    configured = os.environ.get("VMSNAP_LAB_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "vmsnap" / "lab"


# -- the generated files of the guest ---------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# /init of the vmsnap lab guest: devices, modules, data disks, then busybox init runs qemu-ga.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/lock/lvm /run/lvm /tmp /var/log /var/run /mnt /etc/lvm/backup /etc/lvm/archive
chmod 1777 /tmp
modprobe -a @MODULES@
i=0
while [ $i -lt 100 ]; do
    /sbin/vmsnap-links
    [ -e /dev/virtio-ports/@AGENT_PORT@ ] && break
    sleep 0.05
    i=$((i + 1))
done
for dev in /sys/block/vd*; do
    [ -e "$dev/serial" ] || continue
    name=${dev##*/}
    serial=$(cat "$dev/serial")
    case "$serial" in
        @DATA_PREFIX@*)
            if ! blkid "/dev/$name" >/dev/null 2>&1; then
                mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 -L "$serial" "/dev/$name"
            fi
            mkdir -p "/mnt/$serial"
            mount -t ext4 "/dev/$name" "/mnt/$serial" || echo "vmsnap-lab: cannot mount /dev/$name"
            ;;
    esac
done
echo "vmsnap-lab: ready"
exec /sbin/init
"""

LINKS_SCRIPT = r"""#!/bin/sh
# (Re)create the names udev would: /dev/virtio-ports/NAME and /dev/disk/by-id/virtio-SERIAL.
mkdir -p /dev/virtio-ports /dev/disk/by-id
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] || continue
    name=$(cat "$port/name")
    [ -n "$name" ] && ln -sfn "../${port##*/}" "/dev/virtio-ports/$name"
done
for dev in /sys/block/vd*; do
    [ -e "$dev/serial" ] || continue
    serial=$(cat "$dev/serial")
    [ -n "$serial" ] && ln -sfn "../../${dev##*/}" "/dev/disk/by-id/virtio-$serial"
done
exit 0
"""

SHUTDOWN_SCRIPT = r"""#!/bin/sh
# qemu-ga's guest-shutdown runs /sbin/shutdown; busybox init unmounts (see /etc/inittab) and powers off.
case "${1:-}" in
    -r) exec reboot ;;
    -H) exec halt ;;
    *) exec poweroff ;;
esac
"""

INITTAB = f"""::respawn:/usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/{AGENT_PORT} \
--fsfreeze-hook={HOOK_PATH} -l /var/log/qemu-ga.log
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""

LVM_CONF = """# lvm.conf of the vmsnap lab guest: no udev, no daemons, no metadata archives
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    scan = [ "/dev" ]
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
global {
    use_lvmpolld = 0
    thin_check_executable = ""
    thin_repair_executable = ""
}
backup {
    backup = 0
    archive = 0
}
"""


def _init_script() -> str:
    return (
        INIT_SCRIPT.replace("@MODULES@", " ".join(GUEST_MODULES))
        .replace("@AGENT_PORT@", AGENT_PORT)
        .replace("@DATA_PREFIX@", GUEST_DATA_PREFIX)
    )


def generated_files() -> dict[str, tuple[str, int]]:
    """Files written into the guest from text: path → (content, mode)."""
    return {
        "init": (_init_script(), 0o755),
        "sbin/vmsnap-links": (LINKS_SCRIPT, 0o755),
        "sbin/shutdown": (SHUTDOWN_SCRIPT, 0o755),
        "etc/inittab": (INITTAB, 0o644),
        "etc/lvm/lvm.conf": (LVM_CONF, 0o644),
        "etc/qemu/fsfreeze-hook": (dispatcher_script(), 0o755),
        "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
        "etc/group": ("root:x:0:\n", 0o644),
        "etc/hostname": ("vmsnap-lab\n", 0o644),
    }


# -- the builder ------------------------------------------------------------------------------------


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

    def _run(self, argv: Sequence[str], *, step: str, timeout: float = 600.0, cwd: Path | None = None) -> str:
        runner = LocalRunner(cwd=cwd) if cwd is not None else self.runner
        try:
            return runner.run(argv, timeout=timeout).stdout
        except CommandError as err:
            raise LabImageError(f"building the lab guest failed while {step}: {err.message}") from err

    # -- inputs

    def kernel_package(self) -> tuple[str, str]:
        """(package, version) of the kernel to use: ``VMSNAP_LAB_KERNEL_PACKAGE`` or what the meta-package
        depends on.

        apt-cache takes seconds on a loaded host, so the answer is remembered in the cache until apt's
        package lists change (``apt-get update``).
        """
        wanted = os.environ.get("VMSNAP_LAB_KERNEL_PACKAGE", "").strip()
        memo = self.cache_dir / "apt-kernel.json"
        lists = _apt_lists_stamp()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            known = json.loads(memo.read_text())
            if known["lists"] == lists and known["wanted"] == wanted:
                return str(known["package"]), str(known["version"])
        package, version = self._ask_apt(wanted)
        with contextlib.suppress(OSError):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(
                json.dumps({"lists": lists, "wanted": wanted, "package": package, "version": version})
            )
            tmp.replace(memo)
        return package, version

    def _ask_apt(self, wanted: str) -> tuple[str, str]:
        package = wanted
        if not package:
            out = self._run(
                ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
                step=f"asking apt which kernel {KERNEL_META_PACKAGE} depends on",
            )
            match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,]*)", out, re.MULTILINE)
            if match is None:
                raise LabImageError(f"apt-cache show {KERNEL_META_PACKAGE} names no kernel package")
            package = match.group(1)
        out = self._run(
            ["apt-cache", "show", "--no-all-versions", package], step=f"asking apt for {package}'s version"
        )
        version = re.search(r"^Version:\s*(\S+)", out, re.MULTILINE)
        if version is None:
            raise LabImageError(f"apt-cache show {package} has no version")
        return package, version.group(1)

    def host_files(self) -> list[Path]:
        """The host binaries for the guest and every library they load (sorted, absolute)."""
        files: set[Path] = set()
        for program in GUEST_PROGRAMS:
            found = _find_program(program)
            if found is None:
                raise LabImageError(
                    f"{program} is not installed on this host; the lab guest needs it",
                    hint="install the packages listed in scripts/packages.d/lab.txt",
                )
            files.add(found)
            files.update(self._libraries(found))
        busybox = _find_program("busybox")
        if busybox is None or not _is_static(busybox):
            raise LabImageError("a static busybox is not installed", hint="apt-get install busybox-static")
        files.add(busybox)
        mke2fs_conf = Path("/etc/mke2fs.conf")
        if mke2fs_conf.exists():
            files.add(mke2fs_conf)
        return sorted(files)

    def _libraries(self, program: Path) -> set[Path]:
        out = self._run(["ldd", str(program)], step=f"listing the libraries of {program}")
        libs: set[Path] = set()
        for line in out.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match:
                libs.add(Path(match.group(1)))
        return libs

    def key(self, package: str, version: str, files: Iterable[Path]) -> str:
        """The hash of every input: builder version, kernel, host files' contents, generated files."""
        digest = hashlib.sha256()
        parts: dict[str, object] = {
            "builder": BUILDER_VERSION,
            "kernel": f"{package}={version}",
            "modules": list(GUEST_MODULES),
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
        )
        if not force and (target / "manifest.json").exists():
            return image
        with _locked(self.cache_dir / ".lock"):
            if not force and (target / "manifest.json").exists():
                return image  # another process built it while we waited
            self._say(f"building the lab guest {key} from {package} {version}")
            with tempfile.TemporaryDirectory(prefix=".build-", dir=self.cache_dir) as tmp:
                work = Path(tmp)
                deb = self._download(package, version)
                unpacked = work / "kernel"
                self._run(["dpkg-deb", "-x", str(deb), str(unpacked)], step=f"unpacking {deb.name}")
                staged = work / "out"
                staged.mkdir()
                kernel_release = _kernel_release(unpacked)
                self._say("extracting the uncompressed kernel (PVH boot)")
                (staged / "vmlinux").write_bytes(
                    extract_vmlinux((unpacked / "boot" / f"vmlinuz-{kernel_release}").read_bytes())
                )
                root = work / "root"
                self._say("assembling the initramfs")
                self._assemble_root(root, files, unpacked, kernel_release)
                with open(staged / "initrd.cpio", "wb") as out:
                    write_cpio(root, out, extra_devices={"dev/console": (0o020600, 5, 1)})
                manifest = {
                    "key": key,
                    "kernel_package": image.kernel_package,
                    "kernel_release": kernel_release,
                    "append": KERNEL_APPEND,
                    "files": [str(f) for f in files],
                }
                (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
                if target.exists():
                    shutil.rmtree(target)
                staged.rename(target)
            self._say(f"lab guest cached in {target}")
            self.prune(keep=KEEP_BUILDS)
        return image

    def prune(self, *, keep: int) -> list[Path]:
        """Remove all but the ``keep`` newest builds from the cache (downloaded .debs stay).

        :return: the build directories removed
        """
        builds = sorted(
            (d for d in self.cache_dir.iterdir() if (d / "manifest.json").is_file()),
            key=lambda d: (d / "manifest.json").stat().st_mtime,
            reverse=True,
        )
        removed = builds[keep:]
        for old in removed:
            shutil.rmtree(old, ignore_errors=True)
        return removed

    def _download(self, package: str, version: str) -> Path:
        debs = self.cache_dir / "debs"
        debs.mkdir(exist_ok=True)
        quoted = version.replace(":", "%3a")
        deb = debs / f"{package}_{quoted}_amd64.deb"
        if deb.exists():
            return deb
        self._say(f"apt-get download {package}={version}")
        self._run(
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

    def _assemble_root(self, root: Path, files: Sequence[Path], unpacked: Path, release: str) -> None:
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys", "dev", "run"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for d in ("tmp", "var/log", "var/run", "mnt", "root", "etc/qemu/fsfreeze-hook.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        real_names: set[str] = set()
        for path in files:
            dest = root / path.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)  # follows symlinks: the guest gets the library itself
            dest.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
            if path.name in GUEST_PROGRAMS:
                real_names.add(path.name)
        # programs where the guest looks for them, whatever the host's /usr merge does
        for program in GUEST_PROGRAMS:
            found = _find_program(program)
            assert found is not None
            link = root / "usr/sbin" / program
            if not link.exists():
                link.symlink_to(str(found))
        (root / "bin/sh").symlink_to("/usr/sbin/dash" if (root / "usr/sbin/dash").exists() else "/bin/dash")
        for alias, program in (("mkfs.ext4", "mke2fs"), ("fsck.ext4", "e2fsck"), ("mkfs.ext2", "mke2fs")):
            (root / "usr/sbin" / alias).symlink_to("/usr/sbin/" + program)
        for command in LVM_COMMANDS:
            (root / "usr/sbin" / command).symlink_to("/usr/sbin/lvm")
        busybox = _find_program("busybox")
        assert busybox is not None
        applets = self._run([str(busybox), "--list-full"], step="listing busybox applets").split()
        taken = real_names | set(LVM_COMMANDS) | {"sh", "mkfs.ext2", "fsck.ext4", "mkfs.ext4", "mke2fs"}
        for applet in applets:
            name = applet.rsplit("/", 1)[-1]
            dest = root / applet
            if name in taken or dest.exists() or dest.is_symlink():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(str(busybox))
        for rel, (text, mode) in generated_files().items():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            dest.chmod(mode)
        self._copy_modules(root, unpacked, release)

    def _copy_modules(self, root: Path, unpacked: Path, release: str) -> None:
        source = unpacked / "lib" / "modules" / release
        index = {_module_name(p): p for p in source.rglob("*.ko*")}
        wanted: list[str] = []
        pending = [m.replace("-", "_") for m in GUEST_MODULES]
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
        self._run(["depmod", "-b", str(root), release], step="running depmod for the guest's modules")


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


# -- helpers ----------------------------------------------------------------------------------------


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


def _find_program(name: str) -> Path | None:
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def _is_static(program: Path) -> bool:
    # a dynamic ELF has a PT_INTERP naming the loader; a static busybox has none
    return b"/lib64/ld-linux" not in program.read_bytes()[:4096]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kernel_release(unpacked: Path) -> str:
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabImageError(f"the kernel package unpacked into {unpacked} has no /boot/vmlinuz-*")
    return kernels[0].name.removeprefix("vmlinuz-")


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


if __name__ == "__main__":
    raise SystemExit(main())
