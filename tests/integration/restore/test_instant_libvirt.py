"""Instant restore of a libvirt domain against a real (private) libvirtd: defined from the saved definition on
images backed by the backup over NBD, pulled by libvirt, vmsnap killed mid-pull and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.libvirt.conftest import (  # noqa: F401 - the fixture
    Libvirtd,
    domain_xml,
    libvirt,  # fails naming python3-libvirt when it is missing
    libvirtd,
)
from tests.integration.restore.conftest import daemon_pids
from tests.integration.restore.test_instant import alive, identical, instant_run_dir, qemu_img_info  # noqa: F401
from vmsnap.errors import UsageError
from vmsnap.restore.instant import STATE, InstantDisk, InstantRestore, prepare
from vmsnap.restore.instant_libvirt import start_domain, stream_domain
from vmsnap.restore.source import ImageSource

PULL_IN_A_CHILD = """
import sys
from pathlib import Path
from vmsnap.restore.instant_libvirt import stream_domain
stream_domain(Path(sys.argv[1]), name=sys.argv[2], uri=sys.argv[3], speed=int(sys.argv[4]))
"""


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


@pytest.mark.libvirt
def test_instant_restore_of_a_libvirt_domain(
    libvirtd: Libvirtd,  # noqa: F811 - the fixture imported above
    instant_run_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    base = make_image(tmp_path / "base.qcow2", "64M")
    qemu_io(base, "write -P 0x11 0 16M")
    inc = make_image(tmp_path / "inc.qcow2", backing=base)
    qemu_io(inc, "write -P 0x22 8M 4M")
    saved = domain_xml("original-vm", {"vda": base})  # the definition a backup of it saved

    to = tmp_path / "to"
    restore = prepare({"vda": ImageSource(inc)}, to, run_dir=instant_run_dir)
    [server] = daemon_pids(instant_run_dir)
    name = libvirtd.new_domain_name()
    start_domain(restore, saved, name=name, uri=libvirtd.uri)
    start_domain(restore, saved, name=name, uri=libvirtd.uri)  # the resume: it runs already, left alone
    conn = libvirt.open(libvirtd.uri)
    dom = conn.lookupByName(name)
    try:
        assert dom.isActive()
        assert "<backingStore type='network'" in dom.XMLDesc(0)
        other = InstantRestore(
            tmp_path, (InstantDisk("vda", tmp_path / "other.qcow2", tmp_path / "s", 1),), tmp_path
        )
        with pytest.raises(UsageError, match="exists already"):  # a domain of that name on other images
            start_domain(other, saved, name=name, uri=libvirtd.uri)
        child = subprocess.Popen(
            [sys.executable, "-c", PULL_IN_A_CHILD, str(to), name, libvirtd.uri, str(1024 * 1024)],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while json.loads((to / STATE).read_text())["status"] != "streaming":
                assert child.poll() is None, child.stderr.read() if child.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert dom.blockJobInfo("vda", 0)  # libvirt's pull goes on without vmsnap
        assert dom.isActive()
        result = stream_domain(to, name=name, uri=libvirtd.uri)  # the resume
        assert result.streamed == ("vda",)
        assert "<backingStore type='network'" not in dom.XMLDesc(0)
        assert not alive(server)
        dom.destroy()
    finally:
        libvirtd.reaper.remove(conn, dom)
    assert "backing-filename" not in qemu_img_info(restore.images["vda"])
    assert identical(restore.images["vda"], inc)
    assert not (to / STATE).exists()
    assert [p.name for p in instant_run_dir.iterdir()] in ([], [".lock"])
