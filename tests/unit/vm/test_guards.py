"""The thaw guard program's pieces that need no guest (its lock, its record, its key, its grammar) and the
parent side's reading of a record; the guards themselves are tested on the lab guest (tests/integration/
guest/test_thaw_guard.py, libvirt/test_guest_domain.py, test_remote_host.py)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsnap import processes
from vmsnap.repo.repository import Repository
from vmsnap.vm import thawguard
from vmsnap.vm.guards import (
    PROGRAM,
    GuardPlan,
    GuardRecord,
    GuardTarget,
    LocalGuardSite,
    ThawGuard,
    stand_down_leftovers,
)

HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("thawguard", sys.argv[1])
thawguard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(thawguard)
fd = thawguard.take_lock(sys.argv[2], sys.argv[3])
thawguard.write_record(sys.argv[2], sys.argv[3], {"pid": 4242, "since": 1.0})
print("held" if fd is not None else "busy", flush=True)
time.sleep(60)
"""


def test_the_program_parses_as_python_3_8_and_imports_nothing_of_vmsnap() -> None:
    source = PROGRAM.read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "vmsnap" not in imported
    assert imported <= set(sys.stdlib_module_names) | {"libvirt", "libvirt_qemu"}


def test_a_target_key_names_the_target() -> None:
    a = thawguard.target_key(["socket", "/run/vm1.qga"])
    assert a == thawguard.target_key(GuardTarget.socket("/run/vm1.qga").words())
    assert a != thawguard.target_key(["socket", "/run/vm2.qga"])
    assert a != thawguard.target_key(["libvirt", "qemu:///system", "/run/vm1.qga"])
    with pytest.raises(SystemExit, match="a target is"):
        thawguard.agent_for(["tcp", "host:1"])


def test_one_lock_per_target_held_by_a_live_process_only(tmp_path: Path) -> None:
    directory = thawguard.guard_dir(str(tmp_path / "guards"))
    assert os.stat(directory).st_mode & 0o777 == 0o700
    key = thawguard.target_key(["socket", "/x.sock"])
    assert thawguard.live_record(directory, key) == {}
    holder = subprocess.Popen(
        [sys.executable, "-I", "-c", HOLD, str(PROGRAM), directory, key],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert thawguard.take_lock(directory, key) is None  # another holder: busy
        assert thawguard.live_record(directory, key)["pid"] == 4242
    finally:
        processes.stop_child(holder, timeout=0)  # SIGKILL: it leaves its lock file and record behind
    assert thawguard.live_record(directory, key) == {}  # the dead holder's record is removed on sight
    assert sorted(os.listdir(directory)) == []
    fd = thawguard.take_lock(directory, key)
    assert fd is not None
    thawguard.drop_lock(directory, key, fd)
    assert os.listdir(directory) == []


def test_a_guard_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(SystemExit, match="no one else can write"):
        thawguard.guard_dir(str(shared))


def test_a_record_names_its_parent_and_says_whether_it_lives() -> None:
    me = os.getpid()
    data = {
        "pid": 77,
        "start": 5,
        "since": time.time(),
        "parent": {
            "host": socket.gethostname(),
            "boot": thawguard.boot_id(),
            "pid": me,
            "start": processes.start_time(me),
        },
    }
    record = GuardRecord.from_json("local", data)
    assert (record.pid, record.start, record.parent_pid) == (77, 5, me)
    assert record.parent_alive() is True
    gone = GuardRecord.from_json("local", {**data, "parent": {**data["parent"], "start": 1}})
    assert gone.parent_alive() is False  # the pid is someone else's now
    elsewhere = GuardRecord.from_json("ssh:hv2", {**data, "parent": {"host": "other", "boot": "x", "pid": 1}})
    assert elsewhere.parent_alive() is None  # another host's process: it cannot be asked here
    assert GuardRecord.from_json("local", {}).pid == 0  # a guard still starting


def test_the_guard_is_told_who_its_parent_is_and_when_to_give_up() -> None:
    guard = ThawGuard(_plan("/run/vm1.qga"), give_up=30, deadline=90, lease=5)
    options = guard.options()
    pairs = dict(zip(options[::2], options[1::2], strict=True))
    assert pairs["--parent-pid"] == str(os.getpid())
    assert pairs["--parent-start"] == str(processes.start_time(os.getpid()))
    assert pairs["--parent-boot"] == thawguard.boot_id()
    assert (pairs["--lease"], pairs["--deadline"], pairs["--give-up"]) == ("5", "90", "30")


def _plan(path: str) -> GuardPlan:
    return GuardPlan(GuardTarget.socket(path), LocalGuardSite())


def test_status_prints_one_json_object(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-I", str(PROGRAM), "status", "--dir", str(tmp_path / "g"), "socket", "/x.sock"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == {}


def test_a_new_repository_that_a_dead_run_never_made_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "new"
    assert (
        Repository.missing(missing)
        == f"no vmsnap repository at {missing} (no such directory): nothing to undo in it"
    )
    missing.mkdir()
    assert (
        Repository.missing(missing)
        == f"no vmsnap repository at {missing} (an empty directory): nothing to undo in it"
    )
    (missing / ".tmp-0123456789abcdef").write_bytes(b'{"format"')  # the marker, half-written
    assert Repository.missing(missing) is not None
    assert Repository.clear_unmade(missing) == [
        f"removed {missing}/.tmp-0123456789abcdef: the half-written marker of a dead run's new repository"
    ]
    assert list(missing.iterdir()) == []
    (missing / "photo.jpg").write_bytes(b"\xff\xd8")
    assert Repository.missing(missing) is None  # someone's data: opening it says what it is
    assert Repository.clear_unmade(missing) == []
    assert (missing / "photo.jpg").exists()


def _guard_log_after(tmp_path: Path, body_fails: bool) -> str:
    """Run a real guard (on an agent socket that does not exist: a thaw finds nothing to do) as a context
    manager whose body fails or not; its log once it has ended."""
    log = tmp_path / f"guard-{body_fails}.log"
    plan = GuardPlan(GuardTarget.socket(tmp_path / "no-vm.qga"), LocalGuardSite(tmp_path / "guards"))
    with contextlib.suppress(RuntimeError), ThawGuard(plan, log=log) as guard:
        if body_fails:
            raise RuntimeError("the snapshot broke")
    assert guard.pid is not None
    deadline = time.monotonic() + 30
    while processes.alive(guard.pid):
        assert time.monotonic() < deadline, "the guard did not end"
        time.sleep(0.05)
    return log.read_text()


def test_a_guard_left_by_an_exception_thaws_and_one_left_normally_does_not(tmp_path: Path) -> None:
    assert "the parent thawed the guest itself" in _guard_log_after(tmp_path, body_fails=False)
    failed = _guard_log_after(tmp_path, body_fails=True)
    assert "the parent handed the thaw over" in failed  # not "done": the guest may still be frozen
    assert "is gone: the VM stopped, nothing to thaw" in failed


def _backdate(directory: Path, target: GuardTarget, seconds: float) -> None:
    """Make the guard's record say it started ``seconds`` ago (as if it had been watching that long)."""
    path = directory / f"{thawguard.target_key(target.words())}.json"
    record = json.loads(path.read_text())
    record["since"] = time.time() - seconds
    path.write_text(json.dumps(record))


def test_recover_leaves_a_guard_of_another_hosts_run_alone_while_its_deadline_and_give_up_last(
    tmp_path: Path,
) -> None:
    """A real guard whose vmsnap runs on another host (so recover here cannot ask whether it lives), given a
    long freeze timeout: deadline 1000 s, give-up 300 s. 500 s into its watch it may still be guarding a live
    freeze, and recover must not stand it down; past 1300 s (and the clock slack) it must."""
    directory = tmp_path / "guards"
    target = GuardTarget.socket(tmp_path / "vm.qga")
    control_read, control_write = os.pipe()
    ready_read, ready_write = os.pipe()
    argv = [sys.executable, "-I", str(PROGRAM), "guard", "--dir", str(directory)]
    argv += ["--parent-host", "hv-other", "--parent-boot", "another-boot", "--parent-pid", "4242"]
    argv += ["--deadline", "1000", "--give-up", "300", "--control-fd", str(control_read)]
    argv += ["--ready-fd", str(ready_write), *target.words()]
    guard = subprocess.Popen(argv, pass_fds=(control_read, ready_write))
    os.close(control_read)
    os.close(ready_write)
    try:
        with os.fdopen(ready_read) as ready:
            assert ready.readline().split() == ["ready", str(guard.pid)]
        plan = GuardPlan(target, LocalGuardSite(directory))
        _backdate(directory, target, 500)
        lines, holder = stand_down_leftovers(plan)
        assert lines == [] and holder is not None and holder.pid == guard.pid
        assert (holder.deadline, holder.give_up) == (1000, 300)
        assert guard.poll() is None  # still guarding
        _backdate(directory, target, 1000 + 300 + 61)
        lines, holder = stand_down_leftovers(plan)
        assert lines == [f"stopped the thaw guard (pid {guard.pid}) of a dead vmsnap run"]
        assert guard.wait(30) == 0
    finally:
        os.close(control_write)
        if guard.poll() is None:
            guard.kill()
            guard.wait(10)
