"""The parts of a boot verification that need no VM: its configuration's refusals, the throwaway domain's
definition, the result's JSON, the console tail, the TPM state tar."""

from __future__ import annotations

import datetime as dt
import io
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs
import pytest

from vmsnap.cli import build_parser
from vmsnap.errors import RepositoryError, UsageError
from vmsnap.report.data import BackupRow
from vmsnap.report.page import _boot_cell
from vmsnap.verify_boot.libvirt_boot import QEMU_NS, boot_domain_xml
from vmsnap.verify_boot.probe import check_argv, console_tail
from vmsnap.verify_boot.result import BootResult, CheckResult, PortResult, boot_names
from vmsnap.verify_boot.run import BootConfig
from vmsnap.vm.machine_state import MachineStateError, tar_directory, untar_directory

DOMAIN = """<domain type='qemu'><name>web1</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
<memory unit='MiB'>256</memory>
<os><type arch='x86_64' machine='q35'>hvm</type>
<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/web1.qcow2'/>
<target dev='vda' bus='virtio'/></disk>
<interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
<serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>
<graphics type='vnc' port='5900' listen='0.0.0.0'/>
<video><model type='vga'/></video>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
</devices></domain>"""


def test_timeout_ports_and_checks_are_refused_when_malformed() -> None:
    with pytest.raises(UsageError, match="--timeout 0 leaves the guest no time"):
        BootConfig(repo="/r", vm="vm1", timeout=0)
    with pytest.raises(UsageError, match="no TCP port"):
        BootConfig(repo="/r", vm="vm1", ports=(70000,))
    with pytest.raises(UsageError, match="cannot be split"):
        BootConfig(repo="/r", vm="vm1", checks=("cat 'unbalanced",))
    assert check_argv("cat /root/proof") == ["cat", "/root/proof"]


def test_the_throwaway_domain_has_no_route_out_and_its_own_sockets(tmp_path: Path) -> None:
    root = boot_domain_xml(
        DOMAIN,
        name="vmsnap-boot-web1",
        uuid="99999999-0000-4000-8000-000000000000",
        images={"vda": tmp_path / "vda.qcow2"},
        console=tmp_path / "console.log",
        graphics=tmp_path / "vnc.sock",
        ports={80: 41080},
    )
    assert root.findtext("name") == "vmsnap-boot-web1"
    assert root.findtext("uuid") == "99999999-0000-4000-8000-000000000000"
    assert root.find("devices/disk/source").get("file") == str(tmp_path / "vda.qcow2")  # type: ignore[union-attr]
    assert root.find("devices/interface") is None
    serials = root.findall("devices/serial")
    assert [(s.get("type"), s.find("source").get("path")) for s in serials] == [
        ("file", str(tmp_path / "console.log"))
    ]  # type: ignore[union-attr]
    assert root.find("devices/console") is None
    assert [g.attrib for g in root.findall("devices/graphics")] == [
        {"type": "vnc", "socket": str(tmp_path / "vnc.sock")}
    ]
    agent = root.find("devices/channel/target")
    assert agent is not None and agent.get("name") == "org.qemu.guest_agent.0"
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args == [
        "-netdev",
        "user,id=vmsnap-net0,restrict=on,hostfwd=tcp:127.0.0.1:41080-:80",
        "-device",
        "virtio-net-pci,netdev=vmsnap-net0,bus=pcie.0,addr=0x19",
    ]
    text = ET.tostring(root, encoding="unicode")
    assert "5900" not in text and "52:54:00:aa:bb:cc" not in text and "/srv/web1.qcow2" not in text


def test_a_boot_result_round_trips_and_names_its_objects() -> None:
    result = BootResult(
        vm="vm1",
        backup_id="20261207T000000Z",
        stamp="20261207T223501.000001Z",
        verdict="failed",
        reason="check 'false' exited 1",
        kind="qemu",
        seconds_to_agent=3.2,
        seconds=5.0,
        timeout=60.0,
        checks=(CheckResult("false", 1, ""),),
        ports=(PortResult(80, True, "HTTP/1.0"),),
        console_tail=("vmsnap-lab: ready",),
    )
    again = BootResult.from_json(result.to_json(), where="test")
    assert again == result
    assert result.name == "boot-20261207T223501.000001Z.json"
    assert result.summary()["verdict"] == "failed"
    names = ["machine.json", "boot-2.json", "boot-1.json", "boot-1.png"]
    assert boot_names(names) == ["boot-1.json", "boot-2.json"]


def test_the_console_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"".join(b"line %d\r\n" % i for i in range(100)))
    tail, why = console_tail(log, lines=3)
    assert tail == ("line 97", "line 98", "line 99") and why is None
    assert console_tail(None) == (None, "the VM has no serial console")


def test_tpm_state_round_trips_as_a_tar_and_refuses_paths(tmp_path: Path) -> None:
    state = tmp_path / "tpm2"
    state.mkdir()
    (state / "tpm2-00.permall").write_bytes(b"\x01" * 4000)
    (state / ".lock").write_bytes(b"")
    (state / "x.lock").write_bytes(b"")
    data = tar_directory(state)
    written = untar_directory(data, tmp_path / "back")
    assert [p.name for p in written] == ["tpm2-00.permall"]
    assert (tmp_path / "back" / "tpm2-00.permall").read_bytes() == b"\x01" * 4000
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(MachineStateError, match="not a plain file"):
        untar_directory(evil.getvalue(), tmp_path / "evil")
    assert not (tmp_path / "escape").exists()


def _kept() -> dict[str, object]:
    return BootResult(
        "vm1", "b1", "20261207T223501.000001Z", "passed", None, "qemu", 1.0, 2.0, 60.0
    ).to_json()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("verdict", "<script>alert(1)</script>"),
        ("verdict", "maybe"),
        ("seconds", "fast"),
        ("seconds_to_agent", True),
        ("reason", 7),
        ("screenshot", "../../etc/passwd"),
        ("console_tail", "not a list"),
        ("ports", [{"port": "<b>80</b>", "open": True, "detail": ""}]),
        ("checks", [{"command": "true", "exit_code": "0"}]),
    ],
)
def test_a_kept_boot_result_of_the_wrong_shape_is_damaged(field: str, value: object) -> None:
    data = {**_kept(), field: value}
    with pytest.raises(RepositoryError, match="boot result here is damaged"):
        BootResult.from_json(data, where="here")


def test_the_report_escapes_what_a_boot_result_says(tmp_path: Path) -> None:
    result = attrs.evolve(
        BootResult.from_json(_kept(), where="here"),
        verdict="<i>x</i>",  # type: ignore[arg-type]
        ports=(PortResult("<b>80</b>", False, ""),),  # type: ignore[arg-type]
    )
    row = BackupRow("vm1", "b1", dt.datetime.now(dt.UTC), "full", 1, 1, 1, None, None, boot=result)
    with pytest.raises(ValueError, match="invalid literal"):  # a port that is no number is refused
        _boot_cell(row, tmp_path, [])
    cell = _boot_cell(attrs.evolve(row, boot=attrs.evolve(result, ports=())), tmp_path, [])
    assert "<i>" not in cell and "&lt;i&gt;" in cell


def test_a_timeout_must_be_finite() -> None:
    with pytest.raises(UsageError, match="--timeout inf"):
        BootConfig(repo="/r", vm="vm1", timeout=float("inf"))
    with pytest.raises(SystemExit) as exit_code:
        build_parser().parse_args(["verify", "--repo", "/r", "--boot", "--vm", "vm1", "--timeout", "inf"])
    assert exit_code.value.code == 2
