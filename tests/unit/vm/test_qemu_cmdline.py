"""Parsing a QEMU command line, finding secrets in it, and rebuilding it for a throwaway boot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmsnap.errors import UnsupportedError
from vmsnap.vm.qemu_cmdline import (
    BootDisk,
    BootPlan,
    find_secret,
    parse_argv,
    parse_opts,
    rebuild,
    render_opts,
)

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
