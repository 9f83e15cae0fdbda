"""``vmsnap instant-restore --define`` end to end against a real (private) libvirtd: a domain backed up by
``vmsnap backup --domain``, defined again under a new name on images backed by that backup and started in
one command, the command killed mid-pull and run again to finish, the images standalone and identical to
the backup; a taken name is refused before anything is prepared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.cli_helpers import VMSNAP, cli, cli_process
from tests.integration.libvirt.conftest import (  # noqa: F401 - fixtures
    Libvirtd,
    LibvirtTestDomain,
    assert_identical,
    domain,
    libvirt,  # the conftest fails naming python3-libvirt when it is missing
    libvirtd,
)
from tests.integration.restore.conftest import daemon_pids
from tests.integration.restore.test_cli_instant import servers_left
from tests.integration.restore.test_instant import alive, qemu_img_info
from vmsnap.restore.commands import instant_dir
from vmsnap.restore.instant import STATE


@pytest.mark.libvirt
def test_one_command_defines_starts_and_pulls_and_repeating_it_resumes(
    domain: LibvirtTestDomain,  # noqa: F811 - the fixture imported above
    libvirtd: Libvirtd,  # noqa: F811
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    domain.write("vda", 0x51, 0, 16)
    domain.write("sdb", 0x52, 4, 2)
    repo = tmp_path / "repo"
    assert cli_process("init", "--repo", repo, "--layout", "qcow2").code == 0  # compared with its images
    made = cli_process("backup", "--repo", repo, "--domain", domain.name, "--connect", domain.uri, "--json")
    assert made.code == 0, made.err
    backup_id = made.json()["backup_id"]
    domain.write("vda", 0x53, 0, 1)  # after the backup: must not come back
    to = tmp_path / "to"
    base = ["instant-restore", "--repo", repo, "--vm", domain.name, "--to", to, "--connect", domain.uri]

    taken = cli(capsys, *base, "--define", domain.name)  # the original's name
    assert taken.code == 2 and f"a libvirt domain {domain.name!r} exists already" in taken.error_line
    assert not to.exists() and servers_left(run_root) == []

    name = libvirtd.new_domain_name()
    argv = [VMSNAP, *map(str, base), "--define", name, "--speed", "1M"]
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while not (to / STATE).exists() or json.loads((to / STATE).read_text())["status"] != "streaming":
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the pull never started"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)  # vmsnap dies mid-pull
        child.wait()
    [server] = daemon_pids(instant_dir(run_root))
    conn = libvirt.open(domain.uri)
    dom = conn.lookupByName(name)
    try:
        assert dom.isActive() and dom.blockJobInfo("vda", 0)  # libvirt's pull goes on without vmsnap
        assert "<backingStore type='network'" in dom.XMLDesc(0)
        again = cli_process(*base, "--define", name, "--json")  # the same command, run again
        assert again.code == 0, again.err
        data = again.json()
        assert (data["mode"], data["status"], data["domain"], data["backup_id"]) == (
            "libvirt",
            "done",
            name,
            backup_id,
        )
        assert data["resumed"] and sorted(data["streamed"] + data["already_done"]) == ["sdb", "vda"]
        assert dom.isActive() and "<backingStore type='network'" not in dom.XMLDesc(0)
        assert not alive(server)
        dom.destroy()
    finally:
        libvirtd.reaper.remove(conn, dom)
    for disk in ("vda", "sdb"):
        assert "backing-filename" not in qemu_img_info(to / f"{disk}.qcow2")
        assert_identical(to / f"{disk}.qcow2", repo / domain.name / backup_id / f"{disk}.qcow2")
    assert not (to / STATE).exists() and servers_left(run_root) == []
