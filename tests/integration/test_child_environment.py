"""No secret reaches a process vmsnap starts: AWS credentials and the key file's path are read by vmsnap
itself and stripped from every child's environment, read back here from ``/proc/<pid>/environ`` of real
children: a command run by the runner, the ssh client, the thaw guard and the QEMU of a booted copy (nbdkit
serving an S3 repository: tests/integration/restore/test_nbdkit_environment.py)."""

from __future__ import annotations

import os
import pwd
import threading
import time
from pathlib import Path

import pytest

from vmsnap.lab.guest import LabGuest
from vmsnap.restore.boot_session import BootSession
from vmsnap.runner import SECRET_VARIABLES, LocalRunner, SshRunner
from vmsnap.verify_boot.qemu_boot import start_copy
from vmsnap.vm.freeze import frozen
from vmsnap.vm.machine_state import MachineState

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-secret",
    "AWS_SESSION_TOKEN": "session-token-secret",
    "VMSNAP_KEY_FILE": "/root/some.key",
}


def environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_command_gets_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_PROFILE", "kept")
    child = LocalRunner().run(["cat", "/proc/self/environ"]).stdout
    seen = dict(item.split("=", 1) for item in child.split("\0") if "=" in item)
    assert not set(seen) & set(SECRET_VARIABLES), seen.keys()
    assert seen["AWS_PROFILE"] == "kept" and seen["PATH"] == os.environ["PATH"]
    given = LocalRunner(env={"PATH": os.environ["PATH"], **SECRETS, "X": "1"}).run(["env"]).stdout
    assert "secret" not in given and "X=1" in given.splitlines()


def children_named(program: str) -> list[int]:
    """Pids of this process's children whose command is ``program``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and Path(argv0).name == program:
            found.append(int(entry.name))
    return found


def test_the_ssh_client_gets_no_secrets(sshd: SshRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    running = threading.Thread(target=sshd.run, args=(["sleep", "3"],))
    running.start()
    try:
        deadline = time.monotonic() + 3
        pids: list[int] = []
        while not pids and time.monotonic() < deadline:
            pids = children_named("ssh")
            time.sleep(0.02)
        assert pids, "the ssh client was not seen running"
        env = environ(pids[0])
        assert env and not set(env) & set(SECRET_VARIABLES), sorted(env)
    finally:
        running.join()


@pytest.mark.guest
def test_the_thaw_guard_gets_no_secrets(lab_guest: LabGuest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The detached thaw guard a freeze starts (it outlives vmsnap) inherits no secret."""
    marker = f"claims-{os.getpid()}-{time.monotonic_ns()}"
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VMSNAP_TEST_MARKER", marker)
    with frozen(lab_guest.machine):
        guards = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                env = environ(int(entry.name))
            except OSError:
                continue
            if any(b"thawguard" in word for word in argv) and env.get("VMSNAP_TEST_MARKER") == marker:
                guards.append(env)
    assert guards, "the thaw guard was not seen running"
    for env in guards:
        assert not set(env) & set(SECRET_VARIABLES), sorted(env)


def test_a_booted_copy_s_qemu_gets_no_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The QEMU ``verify --boot`` starts for a bare QEMU's copy (guestless here: no disk, nothing to boot)."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VMSNAP_TEST_MARKER", "kept")
    recorded = ("/nowhere/qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-nodefaults")
    recorded += ("-device", "VGA", "-runas", "nobody")  # a VM that dropped to a user boots as that user
    session = BootSession(tmp_path / "session")
    copy = start_copy(session, MachineState(kind="qemu", argv=recorded), {}, name="vmsnap-env", ports={})
    try:
        env = environ(copy.process.pid)
        assert env.get("VMSNAP_TEST_MARKER") == "kept" and not set(env) & set(SECRET_VARIABLES), sorted(env)
        assert Path(f"/proc/{copy.process.pid}/exe").resolve().name == "qemu-system-x86_64"
        assert copy.screenshot(tmp_path / "screen.png") is None  # QEMU runs as nobody; it writes the screen
        assert (tmp_path / "screen.png").read_bytes().startswith(b"\x89PNG")
        nobody = pwd.getpwnam("nobody").pw_uid
        status = Path(f"/proc/{copy.process.pid}/status").read_text()
        assert f"Uid:\t{nobody}\t" in status
    finally:
        copy.stop()
        session.cleanup()
