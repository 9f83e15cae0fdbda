"""Helpers for the end-to-end CLI tests: run ``vmsnap`` in-process or as a process, write data into a running
VM's disks, and capture what a disk holds at a given moment."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import RunningVm
from vmsnap.cli import main
from vmsnap.lab.qemu import qemu_io
from vmsnap.repo.repository import Repository

VMSNAP = str(Path(sys.executable).with_name("vmsnap"))


@attrs.frozen
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        """The one ``vmsnap: error:`` line (notes before it are separate remarks, not the error)."""
        lines = [line for line in self.err.splitlines() if line.startswith("vmsnap: error:")]
        assert len(lines) == 1, f"expected one error line, got: {self.err!r}"
        assert self.err.rstrip("\n").endswith(lines[0]), "the error line comes last"
        return lines[0]


def qcow2_repo(path: Path) -> Path:
    """A new repository of layout qcow2 at ``path`` (what ``vmsnap init --layout qcow2`` makes): the tests
    of that layout's files and of transports use one; a new directory given to ``backup`` is a chunks one."""
    Repository.init(path, layout="qcow2")
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> CliResult:
    """``vmsnap ARGV`` in this process (the VM's QMP socket must be free: close the fixture's connection)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def cli_process(*argv: str | Path, env: Mapping[str, str] | None = None, timeout: float = 120) -> CliResult:
    """``vmsnap ARGV`` as a separate process (what a user runs; needed to kill it mid-way)."""
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(
        [VMSNAP, *[str(a) for a in argv]], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def cli_started(*argv: str | Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """``vmsnap ARGV`` started as a process in a session (so a process group) of its own: a test can stop
    it at a ``stop:`` crash point (:func:`wait_stopped`) and kill it with what it started (``os.killpg``)."""
    return subprocess.Popen(
        [VMSNAP, *[str(a) for a in argv]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def wait_stopped(process: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Wait until ``process`` is stopped (it reached a ``stop:`` crash point); fails if it ends first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        if state == "T":
            return
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"vmsnap ended ({process.returncode}) before its crash point: {err}")
        assert time.monotonic() < deadline, f"vmsnap did not reach its crash point within {timeout:g} s"
        time.sleep(0.05)


def cli_on_a_terminal(*argv: str | Path, timeout: float = 120) -> CliResult:
    """``vmsnap ARGV`` as a process whose stderr is a (pseudo-)terminal, 120 columns wide: what a user sees.
    ``err`` is what the terminal received, escape sequences included."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    try:
        process = subprocess.Popen(
            [VMSNAP, *[str(a) for a in argv]], stdout=subprocess.PIPE, stderr=follower, text=True, env=env
        )
    finally:
        os.close(follower)
    received: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end of the terminal
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        reader.join(timeout=10)
        os.close(leader)
    return CliResult(process.returncode, out, b"".join(received).decode(errors="replace"))


def vm_args(vm: RunningVm) -> list[str]:
    """The CLI's VM selector for ``vm``; frees its QMP socket (QEMU serves one client at a time)."""
    vm.machine.close()
    return ["--qmp", str(vm.process.qmp_socket)]


def write(vm: RunningVm, disk: str, *commands: str) -> None:
    """Run qemu-io commands on a guest disk (as guest writes), flush, and free the QMP socket again."""
    qmp = vm.machine.qmp()
    try:
        for command in commands:
            qemu_io(qmp, disk, command)
        qemu_io(qmp, disk, "flush")
    finally:
        vm.machine.close()


def block_state(vm: RunningVm) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(device, node, file, backing files) per attached disk, then QEMU's node names, block jobs, NBD exports
    and run state: equal before and after a backup (or a recovered crash) when nothing was left behind."""
    qmp = vm.machine.qmp()
    try:
        disks = [
            (d.name, d.node_name, str(d.file), tuple(str(p) for p in d.backing_chain)) for d in qmp.disks()
        ]
        nodes = tuple(sorted(qmp.node_names()))
        jobs = tuple(j.id for j in qmp.query_jobs())
        exports = tuple(str(e.get("id")) for e in qmp.execute("query-block-exports"))
        status = qmp.status()
    finally:
        vm.machine.close()
    return [*disks, ("nodes", "", "", nodes), ("jobs", "", "", jobs), ("exports", status, "", exports)]


def capture(vm: RunningVm, disk: str, dest: Path) -> Path:
    """What the guest sees on ``disk`` right now (after a flush), as a standalone qcow2 at ``dest``."""
    qmp = vm.machine.qmp()
    try:
        qemu_io(qmp, disk, "flush")
        current = next(d for d in qmp.disks() if d.name == disk)
    finally:
        vm.machine.close()
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", current.format, "-O", "qcow2", str(current.file), str(dest)],
        check=True,
    )
    return dest


def same_content(a: Path, b: Path) -> bool:
    """True when two images hold the same guest-visible content (``qemu-img compare``)."""
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(a), str(b)]).returncode == 0


def restore_and_compare(
    capsys: pytest.CaptureFixture[str], repo: Path, backup_id: str, out: Path, expected: Mapping[str, Path]
) -> None:
    """Restore ``backup_id`` into ``out`` through the CLI and compare each disk with ``expected``."""
    result = cli(
        capsys, "restore", "--repo", repo, "--vm", "testvm", "--backup", backup_id, "--to", out, "--json"
    )
    assert result.code == 0, result.err
    data = result.json()
    assert data["backup_id"] == backup_id
    assert sorted(d["name"] for d in data["disks"]) == sorted(expected)
    for disk, reference in expected.items():
        restored = out / f"{disk}.qcow2"
        assert same_content(restored, reference), f"{backup_id}/{disk} differs from what the disk held"


def backup(capsys: pytest.CaptureFixture[str], vm: RunningVm, repo: Path, *extra: str) -> dict[str, Any]:
    """``vmsnap backup --json`` through the CLI; returns the JSON object."""
    result = cli(capsys, "backup", "--repo", repo, *vm_args(vm), *extra, "--json")
    assert result.code == 0, result.err
    data: dict[str, Any] = result.json()
    return data


def listed(capsys: pytest.CaptureFixture[str], repo: Path, *extra: str) -> list[str]:
    result = cli(capsys, "list", "--repo", repo, "--json", *extra)
    assert result.code == 0, result.err
    return [b["backup_id"] for b in result.json()["backups"]]


def no_leftovers(repo: Path, vm: str = "testvm") -> bool:
    vm_dir = repo / vm
    names: Sequence[str] = [p.name for p in vm_dir.iterdir()] if vm_dir.exists() else []
    return not [n for n in names if n.startswith((".partial-", ".deleting-", ".journal"))]


def processes_matching(patterns: Sequence[str]) -> list[int]:
    """Pids of qemu-nbd/qemu-img/... processes whose command line contains one of ``patterns``."""
    from vmsnap.backup.run import ORPHAN_PROGRAMS

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        ours = any(p in " ".join(argv) for p in patterns)
        if argv and state != "Z" and Path(argv[0]).name in ORPHAN_PROGRAMS and ours:
            found.append(int(entry.name))
    return found


def wait_until_qmp_listens(socket_path: Path, timeout: float = 15.0) -> None:
    """QemuProcess.start returns once the socket file exists, which under load is before QEMU listens."""
    from vmsnap.errors import QMPConnectionError
    from vmsnap.vm.qmp import QMPMonitor

    deadline = time.monotonic() + timeout
    while True:
        try:
            QMPMonitor(socket_path, timeout=5).connect().close()
            return
        except QMPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
