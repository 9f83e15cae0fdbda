"""What a machine on another host does with an export's address and its work directory, and how a VM
selector names another host (the real tunnel: tests/integration/test_remote_host.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsnap.errors import UnsupportedError, UsageError
from vmsnap.vm.hosts import HostSpec, ssh_config
from vmsnap.vm.remote import RemoteHost
from vmsnap.vm.remote_machine import nbd_unix_socket, with_socket
from vmsnap.vm.select import MachineSpec


def test_an_nbd_export_on_another_host_is_named_by_its_socket() -> None:
    uri = "nbd+unix:///disk0?socket=/tmp/vmsnap-nbd-1a2b/nbd.sock"
    assert nbd_unix_socket(uri) == "/tmp/vmsnap-nbd-1a2b/nbd.sock"
    local = Path("/tmp/vmsnap-ssh-x/s3.sock")
    assert with_socket(uri, local) == "nbd+unix:///disk0?socket=/tmp/vmsnap-ssh-x/s3.sock"
    assert with_socket("nbd+unix:///?socket=/a&x=1", local) == f"nbd+unix:///?socket={local}&x=1"
    for tcp in ("nbd://127.0.0.1:10809/disk0", "nbd+unix:///disk0"):
        with pytest.raises(UnsupportedError, match="cannot be forwarded"):
            nbd_unix_socket(tcp)


def test_a_vm_selector_with_a_host() -> None:
    spec = MachineSpec(qmp=Path("/run/qemu/db.qmp"), host="root@hv2:2222")
    assert spec.host == HostSpec("hv2", "root", 2222)
    assert MachineSpec(domain="web1", host="hv2").host == HostSpec("hv2")
    with pytest.raises(UsageError, match="must be absolute"):
        MachineSpec(qmp=Path("db.qmp"), host="hv2")
    with pytest.raises(UsageError, match="invalid host"):
        MachineSpec(qmp=Path("/run/db.qmp"), host="-oProxyCommand=evil")


def test_ssh_config_comes_from_the_argument_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host hv2\n  Port 2222\n")
    monkeypatch.delenv("VMSNAP_SSH_CONFIG", raising=False)
    assert ssh_config() is None
    assert ssh_config(config) == config
    monkeypatch.setenv("VMSNAP_SSH_CONFIG", str(config))
    assert ssh_config() == config
    monkeypatch.setenv("VMSNAP_SSH_CONFIG", str(tmp_path / "missing"))
    with pytest.raises(UsageError, match=r"missing \(\$VMSNAP_SSH_CONFIG\) does not exist"):
        ssh_config()


def test_the_ssh_command_lines_use_the_config_file_and_never_prompt(tmp_path: Path) -> None:
    host = RemoteHost("hv2", config=tmp_path / "ssh_config", socket_dir=tmp_path)
    host._dir = tmp_path  # the private directory open() would make
    argv = host.master_argv()
    assert argv[:6] == ["ssh", "-M", "-S", str(tmp_path / "ctl"), "-N", "-F"]
    assert argv[6] == str(tmp_path / "ssh_config") and "BatchMode=yes" in argv
    assert argv[-2:] == ["--", "hv2"]
    assert os.path.basename(argv[3]) == "ctl"
