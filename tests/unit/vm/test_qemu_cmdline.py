"""Parsing a QEMU command line, finding secrets in it, and rebuilding it for a throwaway boot: the copy may
write nothing the live VM uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vmsnap.errors import UnsupportedError
from vmsnap.vm.qemu_cmdline import find_secret, parse_argv, parse_opts, render_opts
from vmsnap.vm.qemu_rebuild import BootDisk, BootPlan, rebuild

LAB = [
    "qemu-system-x86_64", "-name", "labvm", "-machine", "q35,accel=tcg", "-cpu", "qemu64", "-m", "512",
    "-nodefaults", "-no-user-config", "-display", "none",
    "-qmp", "unix:/tmp/lab/labvm.qmp,server=on,wait=off", "-serial", "file:/tmp/lab/labvm.console",
    "-blockdev", '{"driver":"file","filename":"/srv/root.qcow2","node-name":"file-root"}',
    "-blockdev", '{"driver":"qcow2","file":"file-root","node-name":"fmt-root"}',
    "-device", "virtio-blk-pci,drive=fmt-root,id=root,serial=root",
    "-chardev", "socket,path=/tmp/lab/labvm.qga,server=on,wait=off,id=qga0",
    "-device", "virtio-serial-pci,id=vser0",
    "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    "-kernel", "/cache/vmlinux", "-append", "console=ttyS0 vmsnap.root=root", "-no-reboot",
]  # fmt: skip


def _plan(tmp: Path, **kwargs: object) -> BootPlan:
    disks = (BootDisk("fmt-root", "/srv/root.qcow2", tmp / "root.qcow2", "root"),)
    defaults: dict[str, object] = {
        "disks": disks,
        "qmp": tmp / "qmp.sock",
        "agent": tmp / "qga.sock",
        "console": tmp / "console.log",
        "name": "vmsnap-boot-labvm",
        "uuid": "6f1c0a51-0000-4000-8000-000000000001",
    }
    defaults.update(kwargs)
    return BootPlan(**defaults)  # type: ignore[arg-type]


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == flag]


def test_qemuopts_round_trip_with_doubled_commas() -> None:
    items = parse_opts("file,id=c0,path=/a,,b")
    assert items == [(None, "file"), ("id", "c0"), ("path", "/a,b")]
    assert render_opts(items) == "file,id=c0,path=/a,,b"


def test_parse_argv_knows_flags_and_double_dashes() -> None:
    program, options = parse_argv(["qemu-system-x86_64", "--nodefaults", "-m", "512", "-S"])
    assert program == "qemu-system-x86_64"
    assert [(o.flag, o.value) for o in options] == [("nodefaults", None), ("m", "512"), ("S", None)]


@pytest.mark.parametrize(
    ("option", "found"),
    [
        (["-object", "secret,id=sec0,data=letmein"], "-object (data=)"),
        (["-object", '{"qom-type":"secret","id":"s","data":"x"}'], "-object (data=)"),
        (["-spice", "port=5900,password=hunter2"], "-spice (password=)"),
        (["-iscsi", "user=me,password=pw"], "-iscsi (password=)"),
        (
            ["-drive", "file=https://me:pw@example.net/disk.img,if=virtio"],
            "-drive (file= (a URL with a password))",
        ),
        (["-blockdev", '{"driver":"ssh","node-name":"n","password":"pw"}'], "-blockdev (password=)"),
    ],
)
def test_a_secret_in_the_command_line_is_named(option: list[str], found: str) -> None:
    assert find_secret(["qemu-system-x86_64", "-m", "256", *option]) == found


@pytest.mark.parametrize(
    "option",
    [
        ["-object", "secret,id=sec0,file=/etc/vmsnap/disk.pw"],
        ["-vnc", "unix:/run/vm.vnc,password=on"],
        ["-drive", "file=/srv/d.qcow2,encrypt.key-secret=sec0"],
        ["-blockdev", '{"driver":"ssh","node-name":"n","password-secret":"sec0"}'],
    ],
)
def test_a_reference_to_a_secret_is_no_secret(option: list[str]) -> None:
    assert find_secret(["qemu-system-x86_64", *option]) is None


def test_rebuild_swaps_disks_sockets_name_and_console(tmp_path: Path) -> None:
    argv = rebuild(LAB, _plan(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert _options(argv, "-name") == ["vmsnap-boot-labvm"]
    assert _options(argv, "-uuid") == ["6f1c0a51-0000-4000-8000-000000000001"]
    assert _options(argv, "-qmp") == [f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off"]
    assert _options(argv, "-serial") == [f"file:{tmp_path / 'console.log'}"]
    blockdevs = [json.loads(b) for b in _options(argv, "-blockdev")]
    assert blockdevs == [
        {
            "driver": "qcow2",
            "node-name": "fmt-root",
            "file": {"driver": "file", "filename": str(tmp_path / "root.qcow2")},
        }
    ]
    assert f"socket,id=qga0,path={tmp_path / 'qga.sock'},server=on,wait=off" in _options(argv, "-chardev")
    assert "/srv/root.qcow2" not in " ".join(argv) and "/tmp/lab" not in " ".join(argv)
    assert _options(argv, "-kernel") == ["/cache/vmlinux"] and "-no-reboot" in argv
    assert _options(argv, "-display") == ["none"]
    assert not _options(argv, "-netdev")  # no NIC and no port asked: no network at all


def test_rebuild_restricts_every_nic_and_forwards_ports(tmp_path: Path) -> None:
    live = [
        *LAB,
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no",
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
    ]
    argv = rebuild(live, _plan(tmp_path, ports={22: 40022, 80: 40080}))
    assert _options(argv, "-netdev") == [
        "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:40080-:80"
    ]
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56" in _options(argv, "-device")
    without = rebuild(LAB, _plan(tmp_path, ports={80: 40080}))
    assert _options(without, "-netdev") == ["user,id=vmsnap-net0,restrict=on,hostfwd=tcp:127.0.0.1:40080-:80"]
    assert "virtio-net-pci,netdev=vmsnap-net0" in _options(without, "-device")
    nic = rebuild([*LAB, "-nic", "bridge,br=br0,model=e1000"], _plan(tmp_path))
    assert _options(nic, "-nic") == ["user,restrict=on,model=e1000"]


def test_rebuild_adds_an_agent_channel_and_drops_daemon_options(tmp_path: Path) -> None:
    bare = ["qemu-system-x86_64", "-daemonize", "-pidfile", "/run/vm.pid", "-S", "-monitor", "stdio"]
    bare += ["-drive", "file=/srv/root.qcow2,if=virtio,format=qcow2,id=root", "-vnc", ":1", "-device", "VGA"]
    plan = _plan(tmp_path)
    argv = rebuild(bare, plan)
    for gone in ("-daemonize", "-pidfile", "-S", "-monitor", "-vnc"):
        assert gone not in argv
    assert _options(argv, "-drive") == [f"file={tmp_path / 'root.qcow2'},format=qcow2,if=virtio,id=root"]
    assert "virtserialport,chardev=vmsnap-qga,name=org.qemu.guest_agent.0" in _options(argv, "-device")
    assert "VGA" in _options(argv, "-device")


def test_rebuild_puts_the_copy_of_the_firmware_variables_in_place(tmp_path: Path) -> None:
    ovmf = [*LAB, "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive", "if=pflash,format=raw,unit=1,file=/srv/vm_VARS.fd"]  # fmt: skip
    argv = rebuild(ovmf, _plan(tmp_path, pflash_vars={"/srv/vm_VARS.fd": tmp_path / "vars.fd"}))
    assert _options(argv, "-drive") == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars.fd'}",
    ]
    with pytest.raises(UnsupportedError, match="firmware variables"):
        rebuild(ovmf, _plan(tmp_path))


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["-drive", "file=/srv/other.qcow2,if=virtio"], "writable and not in the backup"),
        (["-blockdev", '{"driver":"file","filename":"/srv/other.raw","node-name":"o"}'], "not in the backup"),
        (["-virtfs", "local,path=/srv/share,mount_tag=s"], "shares a host directory"),
        (["-tpmdev", "emulator,id=tpm0,chardev=c"], "emulated TPM"),
        (["-readconfig", "/etc/vm.cfg"], "configuration file"),
    ],
)
def test_rebuild_refuses_what_would_let_the_copy_touch_the_vm(
    tmp_path: Path, extra: list[str], why: str
) -> None:
    with pytest.raises(UnsupportedError, match=why):
        rebuild([*LAB, *extra], _plan(tmp_path))


def test_rebuild_keeps_read_only_media_and_makes_file_memory_ram(tmp_path: Path) -> None:
    extra = ["-drive", "file=/srv/install.iso,media=cdrom"]
    extra += ["-object", "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm,share=on"]
    argv = rebuild([*LAB, *extra], _plan(tmp_path))
    assert "file=/srv/install.iso,media=cdrom" in _options(argv, "-drive")
    assert _options(argv, "-object") == ["memory-backend-ram,id=mem,size=512M"]


@pytest.mark.parametrize(
    ("option", "found"),
    [
        (
            ["-smbios", "type=11,value=io.systemd.credential:passwd.plaintext-password.root=x"],
            "-smbios (value=",
        ),
        (["-fw_cfg", "name=opt/io.systemd.credentials/pw,string=hunter2"], "-fw_cfg (string="),
        (["-append", "console=ttyS0 inst.rootpw=hunter2"], "-append (inst.rootpw=)"),
        (["-append", "quiet systemd.set_credential=passwd.hashed-password.root:$6$x"], "-append (systemd."),
        (["-drive", "file=https://me:p/ss@example.net/disk.img,if=virtio"], "-drive (file= (a URL"),
    ],
)
def test_secrets_beyond_passwords_are_named(option: list[str], found: str) -> None:
    assert (find_secret(["qemu-system-x86_64", "-m", "256", *option]) or "").startswith(found)


def test_a_command_line_that_cannot_be_parsed_is_searched_word_by_word() -> None:
    # an unknown value-less flag shifts every value: "-object" would be its value, "secret,…" no option
    argv = ["qemu-system-x86_64", "-made-up-flag", "-object", "secret,id=s0,data=hunter2", "-m", "256"]
    assert find_secret(argv) == "-object (data=)"
    assert (
        find_secret(["qemu-system-x86_64", "-curses", "-object", "secret,id=s0,data=x"]) == "-object (data=)"
    )


def test_value_less_display_flags_parse() -> None:
    _, options = parse_argv(["qemu-system-x86_64", "-curses", "-sdl", "-m", "256"])
    assert [(o.flag, o.value) for o in options] == [("curses", None), ("sdl", None), ("m", "256")]


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["-drive", "file.filename=/vm/data.qcow2,if=virtio"], "drive /vm/data.qcow2 is writable"),
        (["-drive", "driver=nbd,server.type=inet,server.host=10.0.0.1,server.port=10809,if=virtio"], "nbd"),
        (["-drive", "file=iscsi://10.0.0.1/iqn.2001-04.com.example/1,if=virtio"], "iscsi://"),
        (
            ["-blockdev", '{"driver":"nbd","node-name":"n","server":{"type":"inet","host":"h","port":"1"}}'],
            "nbd",
        ),
        (["-blockdev", "driver=iscsi,node-name=i,transport=tcp,portal=10.0.0.1,target=t,lun=0"], "iscsi"),
        (["-blockdev", '{"driver":"rbd","node-name":"r","pool":"p","image":"i"}'], "block node r (rbd i)"),
        (["-blockdev", '{"driver":"ssh","node-name":"s","server":{"host":"h"},"path":"/vm.img"}'], "ssh"),
        (
            ["-blockdev", '{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"/vm/d"}}'],
            "/vm/d",
        ),
        (["-blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=/vm/d"], "/vm/d"),
        (["-fda", "/vm/floppy.img"], "-fda /vm/floppy.img is not in the backup"),
        (["-fdb", "/vm/floppy.img"], "-fdb /vm/floppy.img is not in the backup"),
        (["-sd", "/vm/card.img"], "-sd /vm/card.img is not in the backup"),
        (["-mtdblock", "/vm/mtd.img"], "-mtdblock /vm/mtd.img is not in the backup"),
        (["-object", "filter-dump,id=f0,netdev=n0,file=/vm/dump.pcap"], "-object filter-dump"),
        (["-object", "input-linux,id=kbd,evdev=/dev/input/event0"], "-object input-linux"),
        (["-object", "qom-type=filter-dump,id=f0,netdev=n0,file=/vm/dump.pcap"], "-object filter-dump"),
        (["-device", "vfio-pci,host=0000:01:00.0"], "claims a device of the host"),
        (["-device", "usb-host,hostbus=1,hostaddr=2"], "claims a device of the host"),
        (["-set", "drive.d0.file=/vm/data.qcow2"], "-set"),
        (["-plugin", "/tmp/evil.so"], "TCG plugin"),
        (["-semihosting"], "semihosting"),
        (["-icount", "shift=auto,rr=record,rrfile=/vm/replay.bin"], "rr=record"),
        (["-usbdevice", "host:1234:5678"], "not a plain input device"),
        (["-dump-vmstate-typo", "x"], "does not know"),
        (["-xen-domid", "1"], "does not know"),
    ],
)
def test_rebuild_refuses_what_would_write_the_vm_s_files_or_claim_its_devices(
    tmp_path: Path, extra: list[str], why: str
) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(why)):
        rebuild([*LAB, *extra], _plan(tmp_path))


def test_a_drive_named_by_file_filename_is_swapped_for_its_overlay(tmp_path: Path) -> None:
    argv = [*LAB, "-drive", "file.filename=/srv/data.qcow2,file.driver=file,format=qcow2,if=virtio,id=data"]
    root = BootDisk("fmt-root", "/srv/root.qcow2", tmp_path / "root.qcow2", "root")
    plan = _plan(tmp_path, disks=(root, BootDisk("", "/srv/data.qcow2", tmp_path / "data.qcow2", "data")))
    drives = _options(rebuild(argv, plan), "-drive")
    assert drives == [f"file={tmp_path / 'data.qcow2'},format=qcow2,if=virtio,id=data"]


def test_floppy_sd_and_mtd_disks_in_the_backup_get_their_overlays(tmp_path: Path) -> None:
    root = BootDisk("fmt-root", "/srv/root.qcow2", tmp_path / "root.qcow2", "root")
    disks = (root, *(BootDisk("", f"/srv/{n}.img", tmp_path / f"{n}.qcow2") for n in ("fd", "sd", "mtd")))
    argv = [*LAB, "-fda", "/srv/fd.img", "-sd", "/srv/sd.img", "-mtdblock", "/srv/mtd.img"]
    drives = _options(rebuild(argv, _plan(tmp_path, disks=disks)), "-drive")
    assert drives == [
        f"file={tmp_path / 'fd.qcow2'},format=qcow2,if=floppy,index=0",
        f"file={tmp_path / 'sd.qcow2'},format=qcow2,if=sd",
        f"file={tmp_path / 'mtd.qcow2'},format=qcow2,if=mtd",
    ]
    assert "/srv/" not in " ".join(_options(rebuild(argv, _plan(tmp_path, disks=disks)), "-drive"))


def test_pflash_variables_are_the_copy_s_and_other_pflash_is_read_only(tmp_path: Path) -> None:
    argv = [*LAB, "-pflash", "/usr/share/OVMF/OVMF_CODE.fd", "-pflash", "/srv/vm_VARS.fd"]
    rebuilt = rebuild(argv, _plan(tmp_path, pflash_vars={"/srv/vm_VARS.fd": tmp_path / "vars.fd"}))
    assert "-pflash" not in rebuilt
    assert _options(rebuilt, "-drive") == [
        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
        f"if=pflash,format=raw,file={tmp_path / 'vars.fd'}",
    ]
    blockdev = '{"driver":"file","filename":"/srv/vm_VARS.fd","node-name":"vars-file"}'
    raw = '{"driver":"raw","file":"vars-file","node-name":"vars"}'
    nodes = rebuild([*LAB, "-blockdev", blockdev, "-blockdev", raw], _plan(tmp_path, pflash_vars={
        "/srv/vm_VARS.fd": tmp_path / "vars.fd"}))  # fmt: skip
    assert [json.loads(n).get("filename") for n in _options(nodes, "-blockdev")][1:] == [
        str(tmp_path / "vars.fd"),
        None,
    ]


def test_blockdev_qemuopts_stay_qemuopts(tmp_path: Path) -> None:
    argv = [*LAB, "-blockdev", "driver=file,filename=/srv/vm_VARS.fd,node-name=vars-file,auto-read-only=on"]
    argv += ["-blockdev", "driver=file,filename=/srv/install.iso,node-name=iso,read-only=on"]
    rebuilt = rebuild(argv, _plan(tmp_path, pflash_vars={"/srv/vm_VARS.fd": tmp_path / "vars.fd"}))
    assert _options(rebuilt, "-blockdev")[1:] == [
        f"driver=file,filename={tmp_path / 'vars.fd'},node-name=vars-file,auto-read-only=on",
        "driver=file,filename=/srv/install.iso,node-name=iso,read-only=on",
    ]


def test_read_only_nodes_and_filters_over_kept_nodes_stay(tmp_path: Path) -> None:
    iso = '{"driver":"file","filename":"/srv/install.iso","node-name":"iso-file","read-only":true}'
    cd = '{"driver":"raw","file":"iso-file","node-name":"cd","read-only":true}'
    throttle = '{"driver":"throttle","file":"cd","node-name":"slow","throttle-group":"tg"}'
    argv = rebuild([*LAB, "-blockdev", iso, "-blockdev", cd, "-blockdev", throttle], _plan(tmp_path))
    assert [json.loads(n)["node-name"] for n in _options(argv, "-blockdev")] == [
        "fmt-root",
        "iso-file",
        "cd",
        "slow",
    ]


def test_every_character_device_backend_and_host_file_option_becomes_the_copy_s(tmp_path: Path) -> None:
    extra = [
        "-chardev", "file,id=log0,path=/vm/log.txt", "-chardev", "socket,id=mon0,path=/vm/mon.sock,server=on",
        "-debugcon", "file:/vm/debug.log", "-parallel", "file:/vm/lpt.txt", "-serial", "file:/vm/s0.log",
        "-serial", "tcp:0.0.0.0:4444,server=on", "-virtioconsole", "pty",
        "-audiodev", "wav,id=snd0,path=/vm/sound.wav", "-machine", "q35,dumpdtb=/vm/dtb.bin",
        "-gdb", "tcp::1234", "-s", "-object", '{"qom-type":"memory-backend-file","id":"m","size":1024,'
        '"mem-path":"/vm/ram","share":true}', "-object", "qom-type=memory-backend-file,id=m2,size=1M,"
        "mem-path=/vm/ram2,share=on", "-runas", "nobody", "-chroot", "/vm/root",
    ]  # fmt: skip
    argv = rebuild([*LAB, *extra], _plan(tmp_path))
    text = " ".join(argv)
    assert "/vm/" not in text and "dumpdtb" not in text and "-gdb" not in argv and "-s" not in argv
    assert "log0" in text and "null,id=log0" in _options(argv, "-chardev")
    assert _options(argv, "-debugcon") == ["null"] and _options(argv, "-parallel") == ["null"]
    assert _options(argv, "-serial") == [f"file:{tmp_path / 'console.log'}", "null", "null"]
    assert _options(argv, "-virtioconsole") == ["null"]
    assert _options(argv, "-audiodev") == ["none,id=snd0"]
    assert _options(argv, "-object") == ['{"id":"m","qom-type":"memory-backend-ram","size":1024}',
                                         "memory-backend-ram,id=m2,size=1M"]  # fmt: skip
    assert _options(argv, "-runas") == ["nobody"] and "-chroot" not in argv


def test_the_program_is_the_one_asked_for_not_the_record_s(tmp_path: Path) -> None:
    recorded = ["/tmp/evil/qemu-system-x86_64", *LAB[1:]]
    assert rebuild(recorded, _plan(tmp_path))[0] == "qemu-system-x86_64"
    assert rebuild(recorded, _plan(tmp_path), program="/usr/bin/qemu-system-x86_64")[0] == (
        "/usr/bin/qemu-system-x86_64"
    )
