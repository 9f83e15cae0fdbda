"""The lab guest (real Linux + qemu-ga) as a libvirt domain: the agent through libvirt, a quiesced CLI backup
with ``--domain``, and one killed while the guest is frozen, which its thaw guard (a libvirt connection of its
own) thaws."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli_process, qcow2_repo
from tests.integration.libvirt.conftest import Libvirtd
from vmsnap.backup.config import CRASH_ENV
from vmsnap.errors import AgentError
from vmsnap.lab.guest import DATA_MOUNT, DATA_SERIAL, fsck_image, read_image_file
from vmsnap.lab.image import build_lab_image
from vmsnap.lab.qemu import choose_accel
from vmsnap.vm.guards import GuardTarget, LocalGuardSite
from vmsnap.vm.libvirt.machine import LibvirtMachine

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

ROOT = Path(__file__).parents[3]
BOOT_TIMEOUT = 180.0


@attrs.define
class GuestDomain:
    """The lab guest running as a libvirt domain, with one ext4 data disk mounted at /mnt/data."""

    name: str
    uri: str
    data_image: Path
    console: Path
    machine: LibvirtMachine


def _guest_xml(
    name: str, data_image: Path, agent_socket: Path, console: Path, flash: tuple[Path, Path] | None = None
) -> str:
    image = build_lab_image()
    kind = "kvm" if choose_accel(booting_guest=True) == "kvm" else "qemu"
    firmware = (
        f"<loader readonly='yes' type='pflash'>{flash[0]}</loader><nvram>{flash[1]}</nvram>" if flash else ""
    )
    features = "<features><acpi/></features>" if flash else ""  # (libvirt takes a pflash loader for UEFI)
    return (
        f"<domain type='{kind}'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type>{firmware}"
        f"<kernel>{image.kernel}</kernel><initrd>{image.initrd}</initrd><cmdline>{image.append}</cmdline></os>"
        f"{features}"
        "<cpu mode='custom' match='exact' check='none'><model fallback='allow'>qemu64</model></cpu>"
        "<on_reboot>destroy</on_reboot>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{data_image}'/>"
        f"<target dev='vda' bus='virtio'/><serial>{DATA_SERIAL}</serial></disk>"
        f"<channel type='unix'><source mode='bind' path='{agent_socket}'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        f"<serial type='file'><source path='{console}'/><target port='0'/></serial>"
        "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
        "<video><model type='none'/></video><memballoon model='none'/></devices></domain>"
    )


@pytest.fixture
def guest_domain(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[GuestDomain]:
    """Boot the lab guest under libvirt and wait until its agent answers through libvirt."""
    yield from _booted(libvirtd, tmp_path)


@pytest.fixture
def flash_domain(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[GuestDomain]:
    """The lab guest as a domain with firmware flash: SeaBIOS as a read-only pflash loader, and a variables
    file (``<nvram>``), which vmsnap captures with the vCPUs paused."""
    code = tmp_path / "code.fd"
    shutil.copyfile("/usr/share/seabios/bios-256k.bin", code)
    variables = tmp_path / "vars.fd"
    variables.write_bytes(os.urandom(256 * 1024))
    yield from _booted(libvirtd, tmp_path, flash=(code, variables))


def _booted(
    libvirtd: Libvirtd, tmp_path: Path, flash: tuple[Path, Path] | None = None
) -> Iterator[GuestDomain]:
    import libvirt

    name = libvirtd.new_domain_name()
    data_image = make_image(tmp_path / "data.qcow2")
    console = tmp_path / "console.log"
    conn = libvirt.open(libvirtd.uri)
    dom = conn.defineXML(_guest_xml(name, data_image, tmp_path / "qga.sock", console, flash))
    machine: LibvirtMachine | None = None
    try:
        dom.create()
        machine = LibvirtMachine(name, uri=libvirtd.uri)
        agent = machine.agent()
        assert agent is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not agent.is_responding(timeout=2):
            if time.monotonic() > deadline or not dom.isActive():
                tail = console.read_text(errors="replace")[-1500:] if console.exists() else ""
                pytest.fail(f"the lab guest's agent did not answer through libvirt: {tail}")
            time.sleep(0.5)
        # the guest mounts the data disk after its agent starts: wait for the mount
        while b"/mnt/data" not in agent.read_file("/proc/mounts"):
            if time.monotonic() > deadline:
                pytest.fail("the lab guest did not mount its data disk")
            time.sleep(0.5)
        yield GuestDomain(name, libvirtd.uri, data_image, console, machine)
    finally:
        if machine is not None:
            machine.close()
        libvirtd.reaper.remove(conn, dom)


def _guest_sh(machine: LibvirtMachine, script: str) -> str:
    agent = machine.agent()
    assert agent is not None
    result = agent.run("/bin/sh", ["-c", script], timeout=60)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


def test_quiesced_cli_backup_of_a_domain_restores_a_clean_filesystem(
    guest_domain: GuestDomain, tmp_path: Path
) -> None:
    agent = guest_domain.machine.agent()
    assert agent is not None
    agent.write_file(f"{DATA_MOUNT}/hello.txt", b"hello from the guest\n")
    repo, out = qcow2_repo(tmp_path / "repo"), tmp_path / "restored"
    vm = ["--domain", guest_domain.name, "--connect", guest_domain.uri]
    backup = _cli("backup", "--repo", str(repo), *vm, "--quiesce", "on")
    assert agent.fsfreeze_status() == "thawed"
    status = subprocess.run(
        [str(ROOT / ".venv/bin/vmsnap"), "agent", *vm, "guest-fsfreeze-status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert json.loads(status.stdout) == {"return": "thawed"}, status.stderr
    _cli("restore", "--repo", str(repo), "--vm", guest_domain.name, "--to", str(out))
    restored = out / "vda.qcow2"
    assert fsck_image(restored, scratch=tmp_path).clean
    assert read_image_file(restored, "/hello.txt", scratch=tmp_path) == b"hello from the guest\n"
    manifest = json.loads((repo / guest_domain.name / backup["backup_id"] / "manifest.json").read_text())
    assert manifest["quiesced"] is True


def _cli(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(ROOT / ".venv/bin/vmsnap"), *args, "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    with contextlib.suppress(json.JSONDecodeError):
        return dict(json.loads(result.stdout))
    raise AssertionError(f"not JSON: {result.stdout!r}")


def test_a_backup_killed_while_the_domain_is_frozen_is_thawed_by_its_guard(
    guest_domain: GuestDomain, tmp_path: Path
) -> None:
    machine = guest_domain.machine
    agent = machine.agent()
    assert agent is not None
    vm = ["--domain", guest_domain.name, "--connect", guest_domain.uri]
    repo = tmp_path / "repo"
    dead = cli_process("backup", "--repo", repo, *vm, "--quiesce", "on", env={CRASH_ENV: "after-freeze"})
    assert dead.code == -signal.SIGKILL, dead.err
    started = time.monotonic()
    while (status := agent.fsfreeze_status()) != "thawed":  # no recover: the guard does it
        assert time.monotonic() - started < 10, f"the domain's guest is still {status}"
        time.sleep(0.1)
    print(f"\nthawed {time.monotonic() - started:.2f} s after the kill was seen")
    target = GuardTarget.libvirt(guest_domain.uri, str(machine.domain.UUIDString()), guest_domain.name)
    while LocalGuardSite().live(target) is not None:  # it ends once the guest is thawed
        assert time.monotonic() - started < 20, "the guard outlived its thaw"
        time.sleep(0.1)
    agent.write_file(f"{DATA_MOUNT}/after-kill.txt", b"writes go on\n")

    recovered = cli_process("recover", *vm, "--repo", repo, "--json")
    assert recovered.code == 0, recovered.err
    assert "the guest's filesystems are thawed" in recovered.json()["found"]
    again = cli_process("recover", *vm, "--repo", repo, "--json")
    assert again.code == 0 and again.json()["clean"], again.out


def test_a_backup_killed_while_the_domain_is_paused_is_resumed_and_thawed_by_its_guard(
    flash_domain: GuestDomain, tmp_path: Path
) -> None:
    """A domain with UEFI variables is paused inside the freeze while its variables are read; killed there,
    the run leaves it paused and frozen. Its guard resumes it through libvirt, then thaws."""
    import libvirt

    machine = flash_domain.machine
    assert machine.machine_state() is not None
    vm = ["--domain", flash_domain.name, "--connect", flash_domain.uri]
    repo = tmp_path / "repo"
    dead = cli_process("backup", "--repo", repo, *vm, "--quiesce", "on", env={CRASH_ENV: "while-paused"})
    assert dead.code == -signal.SIGKILL, dead.err
    agent = machine.agent()
    assert agent is not None
    started = time.monotonic()
    status = "?"
    while time.monotonic() - started < 60:  # no recover: the guard does it
        with contextlib.suppress(AgentError):
            status = agent.fsfreeze_status()
        if status == "thawed":
            break
        time.sleep(0.2)
    assert status == "thawed", f"the domain's guest is still {status}"
    assert machine.domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    agent.write_file(f"{DATA_MOUNT}/after-kill.txt", b"writes go on\n")
    recovered = cli_process("recover", *vm, "--repo", repo, "--json")
    assert recovered.code == 0, recovered.err
    assert not any("resumed" in a or "thawed the guest" in a for a in recovered.json()["actions"])


def _cli(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(ROOT / ".venv/bin/vmsnap"), *args, "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    with contextlib.suppress(json.JSONDecodeError):
        return dict(json.loads(result.stdout))
    raise AssertionError(f"not JSON: {result.stdout!r}")
