"""Leases and gc with real processes: gc and a running backup never miss each other (stopped at exact points,
and both started at once), a writer stopped past its lease never seals over a gc, gc killed mid-sweep loses
nothing, prune of a backup another process is restoring (both layouts)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningVm
from tests.integration.cli_helpers import (
    VMSNAP,
    backup,
    capture,
    listed,
    qcow2_repo,
    same_content,
    vm_args,
    write,
)
from tests.integration.repo.layouts.helpers import (
    Worker,
    chunks_clean,
    held_leases,
    partial_backups,
    random_file,
)
from vmsnap.errors import LeaseError
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.repository import Repository
from vmsnap.repo.retention import RetentionPolicy
from vmsnap.repo.stores.local import LocalStore

DISKS = ("disk0", "disk1")


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test starts: killed (by pid) if still running at its end."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def _new_data(vm: RunningVm, tmp_path: Path, tag: str) -> dict[str, Path]:
    """Write fresh random data to both disks and capture what they hold."""
    for n, disk in enumerate(DISKS):
        data = random_file(tmp_path / f"{tag}-{disk}", 1 << 20)
        write(vm, disk, f"write -s {data} {n * 8 + 2}M 1M")
    return {d: capture(vm, d, tmp_path / f"{tag}-{d}.qcow2") for d in DISKS}


def _restores_to(repo: Path, backup_id: str, expected: dict[str, Path], out: Path) -> bool:
    _, restored = Repository.open(repo).restore("testvm", backup_id, out)
    return all(same_content(d.path, expected[d.name]) for d in restored)


def test_gc_and_a_running_backup_never_miss_each_other(
    two_disk_vm: RunningVm,
    tmp_path: Path,
    state_dir: Path,
    capsys: pytest.CaptureFixture[str],
    workers: list[Worker],
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    backup(capsys, vm, repo)
    expected = _new_data(vm, tmp_path, "b2")
    vm_args(vm)  # frees QEMU's monitor for the worker
    args = {"repo": str(repo), "qmp": str(vm.process.qmp_socket), "stop_at_progress": "second-disk"}
    writer = Worker.start("backup", args)
    workers.append(writer)
    writer.wait_stopped()  # inside the backup: disk0's new chunks and index stored, no manifest
    refused = Worker.start("gc", {"repo": str(repo)})
    code, _, err = refused.finish()
    assert code == 1 and "using the repository" in err and "testvm" in err, err
    waiting = Worker.start("gc", {"repo": str(repo), "wait": 120})
    workers.append(waiting)
    time.sleep(1.0)
    assert waiting.process.poll() is None  # it waits for the backup
    writer.resume()
    code, made, err = writer.finish()
    assert code == 0, err
    code, freed, err = waiting.finish()
    assert code == 0, err
    assert freed["chunks_freed"] == 0  # everything the new backup stored is referenced
    assert _restores_to(repo, made["backup_id"], expected, tmp_path / "r")
    assert Repository.open(repo).verify().ok
    assert chunks_clean(repo, state_dir)


def test_a_backup_refuses_while_gc_holds_its_lock(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: list[Worker]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    first = backup(capsys, vm, repo)
    gc = Worker.start("gc", {"repo": str(repo)}, env={CRASH_ENV: "stop:gc-locked"})
    workers.append(gc)
    gc.wait_stopped()
    result = subprocess.run(
        [VMSNAP, "backup", "--repo", str(repo), *vm_args(vm)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "collecting garbage" in result.stderr, result.stderr
    assert partial_backups(repo) == [] and held_leases(LocalStore(repo)) == ["locks/collector/000000000001"]
    gc.resume()
    assert gc.finish()[0] == 0
    assert len(listed(capsys, repo)) == 1 and listed(capsys, repo)[0] == first["backup_id"]
    backup(capsys, vm, repo)  # and now it goes


def test_backups_and_gc_started_at_once(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    backup(capsys, vm, repo)
    made: list[tuple[str, dict[str, Path]]] = []
    refused = 0
    for round_ in range(6):  # the backup started first in even rounds, gc first in odd ones
        expected = _new_data(vm, tmp_path, f"r{round_}")
        vm_args(vm)
        argv = [VMSNAP, "backup", "--repo", str(repo), "--qmp", str(vm.process.qmp_socket), "--json"]
        gc = Worker.start("gc", {"repo": str(repo)}) if round_ % 2 else None
        writer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        gc = gc or Worker.start("gc", {"repo": str(repo)})
        out, err = writer.communicate(timeout=120)
        gc_code, _, gc_err = gc.finish()
        if writer.returncode == 0:
            made.append((json.loads(out)["backup_id"], expected))
        else:
            assert "collecting garbage" in err, err  # refused, never broken
            refused += 1
        assert gc_code == 0 or "using the repository" in gc_err, gc_err
        Repository.open(repo).gc(wait=60)  # and a gc once both are done
        if len(made) >= 2 and round_ >= 2:
            break
    # backups that ran beside a gc went through (a test where every backup is refused proves nothing)
    assert len(made) >= 2, f"{refused} of {round_ + 1} backups refused"
    for backup_id, expected in made:
        assert _restores_to(repo, backup_id, expected, tmp_path / f"r-{backup_id}")
    assert Repository.open(repo).verify().ok


def test_a_writer_stopped_past_its_lease_never_seals_over_a_gc(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: list[Worker]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    first = backup(capsys, vm, repo)
    _new_data(vm, tmp_path, "late")
    vm_args(vm)
    args = {"repo": str(repo), "qmp": str(vm.process.qmp_socket), "stop_at_progress": "second-disk"}
    args["lease"] = 1.5
    writer = Worker.start("backup", args, host="other-host")  # judged by its lease's expiry
    workers.append(writer)
    writer.wait_stopped()
    time.sleep(2.0)  # its lease expires while it is stopped
    report = Repository.open(repo).gc()
    assert report.partial_backups  # the stopped run's objects went, its chunks too
    writer.resume()
    code, _, err = writer.finish()
    assert code == 1 and "a gc ran while this backup was stopped for longer than its lease" in err, err
    assert listed(capsys, repo) == [first["backup_id"]]
    assert partial_backups(repo) == [], (err, sorted(str(p) for p in (repo / "vms").rglob("*")))
    assert Repository.open(repo).verify().ok
    expected = {d: capture(vm, d, tmp_path / f"now-{d}.qcow2") for d in DISKS}
    again = backup(capsys, vm, repo)
    assert _restores_to(repo, again["backup_id"], expected, tmp_path / "r")


def test_a_writer_stopped_on_this_host_keeps_its_lease_past_its_expiry(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: list[Worker]
) -> None:
    """On its own host a lease lives as long as its process: gc refuses, naming a stopped or hung process."""
    vm = two_disk_vm
    repo = tmp_path / "repo"
    backup(capsys, vm, repo)
    expected = _new_data(vm, tmp_path, "late")
    vm_args(vm)
    args = {"repo": str(repo), "qmp": str(vm.process.qmp_socket), "stop_at_progress": "second-disk"}
    args["lease"] = 1.5
    writer = Worker.start("backup", args)
    workers.append(writer)
    writer.wait_stopped()
    time.sleep(2.0)  # past its lease's expiry, and still there (stopped)
    with pytest.raises(LeaseError, match="stopped or hung"):
        Repository.open(repo).gc()
    writer.resume()
    code, made, err = writer.finish()
    assert code == 0, err
    assert _restores_to(repo, made["backup_id"], expected, tmp_path / "r")


def test_gc_killed_mid_sweep_loses_nothing_a_kept_backup_needs(
    two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    ids = []
    for n in range(3):
        expected = _new_data(vm, tmp_path, f"g{n}")
        ids.append(backup(capsys, vm, repo, "--incremental")["backup_id"])
    Repository.open(repo).prune("testvm", RetentionPolicy(keep_last=1))
    dead = Worker.start("gc", {"repo": str(repo)}, env={CRASH_ENV: "gc-mid-sweep"})
    code, _, _ = dead.finish()
    assert code == -9
    assert held_leases(LocalStore(repo)) == [
        "locks/collector/000000000001"
    ]  # the dead gc's: taken over at once
    assert _restores_to(repo, ids[-1], expected, tmp_path / "r1")
    report = Repository.open(repo).gc()
    assert report.chunks_freed > 0  # what the dead one had not yet deleted
    assert Repository.open(repo).gc().chunks_freed == 0
    assert Repository.open(repo).verify().ok
    assert _restores_to(repo, ids[-1], expected, tmp_path / "r2")


@pytest.mark.parametrize("layout", ["chunks", "qcow2"])
def test_prune_of_a_backup_another_process_is_restoring(
    two_disk_vm: RunningVm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    workers: list[Worker],
    layout: str,
) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo" if layout == "chunks" else qcow2_repo(tmp_path / "repo")
    expected = _new_data(vm, tmp_path, "old")
    old = backup(capsys, vm, repo)["backup_id"]
    _new_data(vm, tmp_path, "new")
    backup(capsys, vm, repo)
    out = tmp_path / "restored"
    args = {"repo": str(repo), "vm": "testvm", "backup": old, "to": str(out), "stop_at_progress": True}
    restoring = Worker.start("restore", args)
    workers.append(restoring)
    restoring.wait_stopped()
    library = Repository.open(repo)
    if layout == "qcow2":
        with pytest.raises(LeaseError, match="is reading"):
            library.prune("testvm", RetentionPolicy(keep_last=1))
    else:  # the backup goes at once; its chunks stay while the restore reads them
        assert library.prune("testvm", RetentionPolicy(keep_last=1)).removed == (old,)
        with pytest.raises(LeaseError, match="a restore, verify or copy"):
            library.gc()
    restoring.resume()
    code, _, err = restoring.finish()
    assert code == 0, err
    assert all(same_content(out / f"{d}.qcow2", expected[d]) for d in DISKS)
    library.prune("testvm", RetentionPolicy(keep_last=1))
    assert library.gc().chunks_freed >= (2 if layout == "chunks" else 0)
    assert library.verify().ok
