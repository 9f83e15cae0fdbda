"""vmsnap.image.io on real images: the guest-visible sha256 (qcow2 = raw = plain bytes, chain = flattened,
internal snapshots) and the qemu-nbd server's lifetime."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.transports.conftest import CaseFactory, qemu_io
from vmsnap.errors import NotFoundError, TransferError
from vmsnap.image.digest import guest_sha256, source_sha256
from vmsnap.image.nbd import QemuNbdServer
from vmsnap.processes import alive


def test_qcow2_raw_and_plain_bytes_hash_alike(case_factory: CaseFactory, tmp_path: Path) -> None:
    image = case_factory("qcow2").reference
    raw = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    plain = hashlib.sha256(raw.read_bytes()).hexdigest()
    assert guest_sha256(image, "qcow2") == guest_sha256(raw, "raw") == plain
    qemu_io(raw, "raw", "write -P 0x01 33M 512")  # one sector changed in a hole
    assert guest_sha256(raw, "raw") != plain


def test_a_chain_hashes_like_its_flattened_copy(case_factory: CaseFactory) -> None:
    case = case_factory("chain")
    top = Path(case.source.location)
    assert guest_sha256(top, "qcow2") == guest_sha256(case.reference, "qcow2")
    base = top.with_name("base.qcow2")
    assert guest_sha256(base, "qcow2") != guest_sha256(top, "qcow2")


def test_internal_snapshot_and_sources_of_every_kind(case_factory: CaseFactory) -> None:
    snap = case_factory("snapshot")
    image = Path(snap.source.location)
    expected = guest_sha256(snap.reference, "qcow2")
    assert guest_sha256(image, "qcow2", image_opts={"snapshot.name": "s1"}) == expected
    assert guest_sha256(image, "qcow2") != expected  # the live state moved on
    assert source_sha256(snap.source) == expected
    for kind in ("nbd", "block", "raw"):
        case = case_factory(kind)
        assert source_sha256(case.source) == guest_sha256(case.reference, case.source.disk.format), kind


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        guest_sha256(tmp_path / "nope.qcow2", "qcow2")


def test_server_is_stopped_by_pid_also_when_the_body_raises(case_factory: CaseFactory) -> None:
    image = case_factory("qcow2").reference
    server = QemuNbdServer(image, "qcow2")
    with pytest.raises(RuntimeError), server:
        pid = server.pid
        private = server.socket.parent
        assert pid is not None and alive(pid)
        assert private.stat().st_mode & 0o777 == 0o700
        raise RuntimeError("body failed")
    assert not alive(pid)
    assert not private.exists()


def test_unknown_snapshot_is_a_clear_error(case_factory: CaseFactory) -> None:
    image = case_factory("qcow2").reference
    server = QemuNbdServer(image, "qcow2", image_opts={"snapshot.name": "no-such"})
    with pytest.raises(TransferError, match="qemu-nbd could not serve") as info:
        server.start()
    assert "\n" not in str(info.value)
    assert server.pid is None


def test_server_exits_when_a_killed_client_goes_away(case_factory: CaseFactory) -> None:
    """A vmsnap killed mid-copy must not leave qemu-nbd behind: the server exits with its last client."""
    image = case_factory("qcow2").reference
    server = QemuNbdServer(image, "qcow2").start()
    try:
        pid = server.pid
        assert pid is not None
        client = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import nbd, sys, time; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
                "print('connected', flush=True); time.sleep(600)",
                server.uri,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdout.readline().strip() == "connected"
        client.kill()
        client.wait()
        deadline = time.monotonic() + 30  # generous: only "never exits" fails
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
    finally:
        server.stop()
