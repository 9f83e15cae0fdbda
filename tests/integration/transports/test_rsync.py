"""The rsync transport: the contract suite locally and over SSH (a real sshd on 127.0.0.1), plus the delta
transfer: a second send of a slightly changed image into the same target sends only the change."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.integration.transports.conftest import (
    SIZE,
    CaseFactory,
    SourceCase,
    images_equal,
    make_case,
    qemu_io,
)
from tests.integration.transports.contract import ProgressLog, TransportContract
from vmsnap.errors import NotFoundError, TransferError
from vmsnap.image.digest import guest_sha256
from vmsnap.model import ExportSource
from vmsnap.runner import SshRunner
from vmsnap.transports.rsync import RsyncTransport

KiB = 1024


class TestRsyncContract(TransportContract):
    transport_name = "rsync"


@pytest.fixture(scope="module")
def fast_ssh(sshd: SshRunner) -> Iterator[SshRunner]:
    """The sshd fixture's runner with one multiplexed connection (ControlMaster), closed at the end."""
    control = Path(tempfile.mkdtemp(prefix="vmsnap-ssh-"))
    options = {
        **sshd.options,
        "ControlMaster": "auto",
        "ControlPath": f"{control}/%C",
        "ControlPersist": "60",
    }
    runner = attrs.evolve(sshd, options=options)
    try:
        yield runner
    finally:
        subprocess.run([*runner.ssh_argv()[:-1], "-O", "exit", runner.destination], capture_output=True)
        shutil.rmtree(control, ignore_errors=True)


class TestRsyncOverSshContract(TransportContract):
    """The same contract with ``host:path`` targets through the SshRunner's ssh options. Source kinds only
    change the (local) reading side, so a plain file and a staged one are enough here."""

    transport_name = "rsync"

    @pytest.fixture(params=["qcow2", "snapshot"])
    def source_case(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceCase]:
        with make_case(request.param, tmp_path) as case:
            yield case

    @pytest.fixture(autouse=True)
    def _ssh(self, fast_ssh: SshRunner) -> None:
        self.ssh = fast_ssh

    def make(self, **options: Any) -> Any:
        return RsyncTransport(self.ssh, **options)

    def target(self, path: Path) -> Path | str:
        return f"127.0.0.1:{path}"


@pytest.mark.parametrize("remote", [False, True], ids=["local", "ssh"])
def test_second_send_transfers_only_the_change(
    remote: bool, case_factory: CaseFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    case = case_factory("qcow2")
    image = case.reference
    transport = RsyncTransport(request.getfixturevalue("fast_ssh")) if remote else RsyncTransport()
    target = tmp_path / "disk0.qcow2"
    spec = f"127.0.0.1:{target}" if remote else target
    first = transport.send(case.source, spec, progress=ProgressLog())
    assert transport.last_stats is not None and transport.last_stats.matched == 0
    first_sent = transport.last_stats.sent

    qemu_io(image, "qcow2", "write -P 0x77 1M 64K")  # 64 KiB of guest data, in an allocated cluster
    second = transport.send(case.source, spec, progress=ProgressLog())
    assert images_equal(target, image)
    assert transport.last_stats is not None
    assert transport.last_stats.matched > 0
    assert second.bytes_written <= 3 * 64 * KiB < first.bytes_written  # data cluster + L2/refcount updates
    assert transport.last_stats.sent < first_sent // 10


def test_staged_sources_leave_no_staging_behind(case_factory: CaseFactory, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    case = case_factory("snapshot")
    RsyncTransport(staging_dir=staging).send(case.source, tmp_path / "out.qcow2", progress=ProgressLog())
    assert images_equal(tmp_path / "out.qcow2", case.reference)
    assert list(staging.iterdir()) == []


def test_remote_directory_must_exist(case_factory: CaseFactory, fast_ssh: SshRunner, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist on"):
        RsyncTransport(fast_ssh).send(
            case_factory("qcow2").source, f"127.0.0.1:{tmp_path}/nowhere/x.qcow2", progress=ProgressLog()
        )


def test_argv_is_what_runs(case_factory: CaseFactory, fast_ssh: SshRunner, tmp_path: Path) -> None:
    """The -e command built from the SshRunner works when run by hand (no shell string anywhere)."""
    transport = RsyncTransport(fast_ssh)
    image = case_factory("qcow2").reference
    argv = transport.argv(str(image), transport.parse_target(f"x:{tmp_path}/y.qcow2"), 65536)
    subprocess.run(argv, check=True, capture_output=True)
    assert images_equal(tmp_path / "y.qcow2", image)


def test_without_inplace_a_failed_update_keeps_the_old_target(
    case_factory: CaseFactory, full_dir: Path, tmp_path: Path
) -> None:
    """inplace=False: rsync writes a temporary copy, so running out of space leaves the old target intact."""
    small = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(small), "64M"], check=True)
    qemu_io(small, "qcow2", "write -P 0x42 0 64K")
    disk = case_factory("qcow2").source.disk
    target = full_dir / "disk0.qcow2"
    transport = RsyncTransport(inplace=False)
    transport.send(ExportSource("file", str(small), "qcow2", disk, SIZE), target, progress=ProgressLog())
    before = guest_sha256(target, "qcow2")
    assert "--inplace" not in transport.argv(str(small), transport.parse_target(target), 65536)
    with pytest.raises(TransferError, match="full"):
        transport.send(case_factory("qcow2").source, target, progress=ProgressLog())  # 4.5 MiB > 2 MiB
    assert sorted(os.listdir(full_dir)) == ["disk0.qcow2"]
    assert guest_sha256(target, "qcow2") == before
