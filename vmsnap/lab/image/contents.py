"""What the lab guest holds: host programs, kernel modules, the scripts written into it, its command line.

Every value here goes into the build's key (see :meth:`~vmsnap.lab.image.builder.LabImageBuilder.key`):
changing one makes the next build a new one.
"""

from __future__ import annotations

from vmsnap.guest import hook
from vmsnap.guest.hook import dispatcher_script

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
    "chattr",
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
    "virtio_net",
)

#: kernel modules copied into the guest but loaded only when needed (efivarfs: booted by UEFI firmware)
GUEST_OPTIONAL_MODULES: tuple[str, ...] = ("efivarfs",)

ROOT_SERIAL_PARAMETER = "vmsnap.root"
"""``vmsnap.root=SERIAL`` on the kernel command line: the root filesystem is the ext4 on the virtio disk
with that serial (:func:`vmsnap.lab.rootfs.make_root_disk` makes one); the initramfs switches to it, or
stops there (no guest agent) when that disk holds no root filesystem."""

ROOT_MARKER = "etc/vmsnap-root-disk"
"""Exists on a root disk made by :func:`vmsnap.lab.rootfs.make_root_disk`, never in the initramfs."""

GUEST_DATA_PREFIX = "data"
"""A virtio disk whose serial starts with this is formatted (ext4, when blank) and mounted at /mnt/SERIAL."""

AGENT_PORT = "org.qemu.guest_agent.0"
"""The virtio-serial port of the guest agent (QEMU's ``virtserialport name=``; qemu-ga listens on it)."""

HOOK_PATH = "/" + hook.HOOK_PATH
HOOK_DIR = "/" + hook.HOOK_DIR
HOOK_LOG = hook.HOOK_LOG
KERNEL_APPEND = "console=ttyS0 loglevel=4 panic=-1 rdinit=/init"


# -- the generated files of the guest ---------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# /init of the vmsnap lab guest: devices, modules, the root disk (vmsnap.root=SERIAL), data disks, network,
# /etc/rc.local, then busybox init runs qemu-ga.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/class ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
if [ -e /@ROOT_MARKER@ ]; then
    # on the root disk, run-time state is not kept across boots (qemu-ga's frozen marker among it)
    for dir in /run /var/run /tmp; do mount -t tmpfs -o mode=755 tmpfs $dir; done
fi
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
root=$(sed -n 's/.*@ROOT_PARAMETER@=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$root" ] && [ ! -e /@ROOT_MARKER@ ]; then
    i=0
    while [ $i -lt 100 ] && [ ! -e "/dev/disk/by-id/virtio-$root" ]; do
        sleep 0.05
        /sbin/vmsnap-links
        i=$((i + 1))
    done
    mkdir -p /newroot
    if mount -t ext4 "/dev/disk/by-id/virtio-$root" /newroot && [ -e /newroot/@ROOT_MARKER@ ]; then
        for fs in dev proc sys; do mount --move /$fs /newroot/$fs; done
        exec switch_root /newroot /init
    fi
    echo "vmsnap-lab: no root filesystem on virtio-$root: the guest stops here" > /dev/console
    echo "<2>vmsnap-lab: no root filesystem on virtio-$root: the guest stops here" > /dev/kmsg
    while :; do sleep 3600; done
fi
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
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
if [ -d /sys/firmware/efi ] && modprobe efivarfs; then
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars
fi
[ -x /etc/rc.local ] && /etc/rc.local
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
        .replace("@ROOT_PARAMETER@", ROOT_SERIAL_PARAMETER.replace(".", r"\."))
        .replace("@ROOT_MARKER@", ROOT_MARKER)
    )


def generated_files() -> dict[str, tuple[str, int]]:
    """Files written into the guest from text: path → (content, mode)."""
    return {
        "init": (_init_script(), 0o755),
        "sbin/vmsnap-links": (LINKS_SCRIPT, 0o755),
        "sbin/shutdown": (SHUTDOWN_SCRIPT, 0o755),
        "etc/inittab": (INITTAB, 0o644),
        "etc/lvm/lvm.conf": (LVM_CONF, 0o644),
        hook.HOOK_PATH: (dispatcher_script(), 0o755),
        "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
        "etc/group": ("root:x:0:\n", 0o644),
        "etc/hostname": ("vmsnap-lab\n", 0o644),
    }
