"""What a backup into S3 costs, counted on a real server (SeaweedFS) with the requests every S3Store of this
process sends (``PROCESS_REQUESTS``, a botocore hook counting each HTTP attempt): an incremental costs
requests in proportion to what changed, the same for a 256 MiB and an 8 GiB disk, without a HEAD or a
listing of chunks; a backup resumed after one was killed does not put again what that one stored; and the
peak memory of a backup of 384 MiB of incompressible data stays bounded."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.cli_helpers import backup, cli_process, vm_args, write
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.hosts import MiB, base_image
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.stores.s3 import PROCESS_REQUESTS
from vmsnap.vm.machine import QemuMachine

pytestmark = pytest.mark.timeout(600)
Requests = Counter[tuple[str, str]]


@contextlib.contextmanager
def _one_disk_vm(workdir: Path, size: str) -> Iterator[RunningVm]:
    """A running QEMU (no OS) with one qcow2 disk ``disk0`` of ``size``."""
    workdir.mkdir()
    image = make_image(workdir / "disk0.qcow2", size=size)
    process = QemuProcess(workdir, [DriveSpec(image, "disk0")], name="vm-size").start()
    machine = QemuMachine(process.qmp_socket)
    try:
        yield RunningVm(process, machine, {"disk0": image}, workdir)
    finally:
        machine.close()
        process.stop()
        process.kill()


def _random_chunks(vm: RunningVm, tmp_path: Path, first: int, count: int) -> None:
    """New random data in ``count`` 4 MiB chunks of disk0, from chunk ``first`` on (1 MiB in each)."""
    for n in range(first, first + count):
        data = tmp_path / f"random-{n}"
        data.write_bytes(os.urandom(MiB))
        write(vm, "disk0", f"write -s {data} {n * 4}M 1M")


def _counted(
    capsys: pytest.CaptureFixture[str], vm: RunningVm, repo: str, *extra: str
) -> tuple[Any, Requests]:
    before = PROCESS_REQUESTS.snapshot()
    made = backup(capsys, vm, repo, *extra)
    return made, PROCESS_REQUESTS.snapshot() - before


def _without_leases(requests: Requests) -> Requests:
    """The requests that are not about leases (a heartbeat renews them by the clock, not by the work)."""
    return Counter({key: n for key, n in requests.items() if key[1] != "locks"})


def _incremental_costs(
    capsys: pytest.CaptureFixture[str], vm: RunningVm, repo: str, tmp_path: Path
) -> dict[int, Requests]:
    """A full backup, then incrementals with 1 and 3 chunks changed: their requests (leases left out)."""
    _random_chunks(vm, tmp_path, 0, 6)
    _, full = _counted(capsys, vm, repo)
    assert full[("HeadObject", "chunks")] == 0
    assert full[("PutObject", "chunks")] == 6  # one conditional put per new chunk, no HEAD first
    costs = {}
    for changed in (1, 3):
        _random_chunks(vm, tmp_path, 10, changed)
        made, requests = _counted(capsys, vm, repo, "--incremental")
        assert made["kind"] == "incremental"
        assert made["disks"][0]["chunks"]["new_chunks"] == changed
        assert requests[("PutObject", "chunks")] == changed
        assert not {key for key in requests if key[1] == "chunks" and key[0] != "PutObject"}, requests
        costs[changed] = _without_leases(requests)
    return costs


def test_an_incremental_costs_requests_for_what_changed_not_for_the_disk(
    s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    costs = {}
    for size in ("256M", "8G"):
        with _one_disk_vm(tmp_path / size, size) as vm:
            costs[size] = _incremental_costs(capsys, vm, f"s3://{BUCKET}/{s3_prefix}/{size}", tmp_path / size)
    for by_changed in costs.values():
        assert by_changed[3] - by_changed[1] == Counter({("PutObject", "chunks"): 2})  # one per changed chunk
    assert costs["256M"] == costs["8G"], "the requests of an incremental depend on the disk's size"
    print(f"an incremental with 1 chunk changed: {sum(costs['8G'][1].values())} requests (leases aside)")


def test_a_backup_after_a_killed_one_puts_nothing_again(
    two_disk_vm: RunningVm,
    s3_env: SeaweedServer,
    s3_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vm = two_disk_vm
    repo = f"s3://{BUCKET}/{s3_prefix}"
    for n, disk in enumerate(("disk0", "disk1")):
        data = tmp_path / f"random-{disk}"
        data.write_bytes(os.urandom(12 * MiB))
        write(vm, disk, f"write -s {data} {n * 16}M 12M")
    dead = cli_process("backup", "--repo", repo, *vm_args(vm), env={CRASH_ENV: "mid-export"})
    assert dead.code == -9, dead.err  # killed after disk0's three chunks and index were stored
    made, requests = _counted(capsys, vm, repo)
    chunks = {d["name"]: d["chunks"] for d in made["disks"]}
    assert chunks["disk0"]["new_chunks"] == 0 and chunks["disk0"]["reused_chunks"] == 3
    assert chunks["disk1"]["new_chunks"] == 3
    assert requests[("PutObject", "chunks")] == 3  # disk1's only: the dead run's chunks are not sent again


def test_peak_memory_of_a_backup_into_s3_stays_bounded(
    s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path
) -> None:
    """384 MiB of random data: more than the bound, so a backup that held what it sends would exceed it."""
    image = base_image(tmp_path / "big.qcow2", size="1G", data_mib=384)
    script = (
        "import sys; from vmsnap.cli import main; code = main(sys.argv[1:]); "
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
        "print(peak.split()[1], file=sys.stderr); sys.exit(code)"
    )
    argv = [
        sys.executable,
        "-c",
        script,
        "backup",
        "--repo",
        f"s3://{BUCKET}/{s3_prefix}",
        "--image",
        str(image),
    ]
    argv += ["--strategy", "offline-bitmap", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stderr.strip().splitlines()[-1]) / 1024
    assert '"new_chunks": 96' in done.stdout
    print(f"peak RSS of a backup of 384 MiB into S3: {peak_mib:.0f} MiB")
    assert peak_mib < 300, f"peak RSS {peak_mib:.0f} MiB"
