"""A boot verification's footprint on this host, recorded before each thing is made so that nothing outlives
it: ``RUN_ROOT/boot/<time>-<random>/`` (0700) holds the overlays, the NBD servers' directories, the copy's
sockets, console log and firmware variables, and ``state.json``: the owner (pid and start time), the VM
and backup, the copy's
QEMU (pid, start time) or libvirt domain (name, URI and the UUID chosen before it was created), and a TPM
state directory made for it.

At most one boot runs per host at a time: :func:`host_lock` (an flock on ``RUN_ROOT/boot/.lock``, released
by the kernel when its holder dies). :func:`recover` (run by ``vmsnap recover``) undoes every session whose
owner is dead: it stops the copy's QEMU (only that process: its pid, start time and private directory must
match) or destroys and undefines its domain (found by its UUID, and only when it bears the recorded name:
never another domain of that name), stops its servers, removes its TPM state and its directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmsnap import processes
from vmsnap.errors import VmsnapError
from vmsnap.files import FILE_MODE, make_private_dir, write_json_atomic
from vmsnap.restore.state import owner, owner_alive, read_state, stop_daemons_under
from vmsnap.runner import LocalRunner, Runner
from vmsnap.vm.qemu_cmdline import is_qemu_program

STATE = "state.json"
LOCK = ".lock"
SERVERS = "nbd"
"""In a session: the NBD servers' run directory (see :func:`vmsnap.restore.instant.prepare`)."""
PID_FILE = "qemu.pid"
"""In a session: the copy's QEMU writes its pid here (``-pidfile``)."""
DISKS = "disks"
"""In a session: the copy's overlays."""


class BootStartError(VmsnapError):
    """The booted copy's QEMU (or libvirt domain) did not start; the message carries the end of its log."""


class BootBusyError(VmsnapError):
    """Another boot verification runs on this host and did not end in time."""

    default_hint = "wait for it (at most one boot verification runs per host), or run `vmsnap recover`"


def boot_root(run_root: Path) -> Path:
    """``RUN_ROOT/boot``: where boot sessions live."""
    return run_root / "boot"


@contextlib.contextmanager
def host_lock(run_root: Path, *, wait: float) -> Iterator[None]:
    """Hold this host's boot lock for the body, waiting up to ``wait`` seconds for it.

    :raise BootBusyError: another boot held it all that time
    """
    root = make_private_dir(boot_root(run_root), tighten=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BootBusyError(
                        f"another boot verification held {root / LOCK} for {wait:g} s"
                    ) from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


class BootSession:
    """One boot's private directory and its state file (see the module docstring).

    :param directory: ``RUN_ROOT/boot/<time>-<random>`` (made 0700)
    """

    def __init__(self, directory: Path) -> None:
        self.directory = make_private_dir(directory, tighten=True)
        self.state: dict[str, Any] = {"owner": owner()}
        self.save()

    @property
    def disks(self) -> Path:
        return self.directory / DISKS

    @property
    def servers(self) -> Path:
        return self.directory / SERVERS

    def save(self) -> None:
        write_json_atomic(self.directory / STATE, self.state)

    def record(self, **values: Any) -> None:
        """Record what is about to be made (before making it)."""
        self.state.update(values)
        self.save()

    def cleanup(self, *, runner: Runner | None = None) -> list[str]:
        """Undo everything the state names, then remove the directory; one line per thing undone."""
        return cleanup(self.directory, self.state, runner or LocalRunner())


def cleanup(directory: Path, state: dict[str, Any], runner: Runner) -> list[str]:
    """Stop and remove what a session's ``state`` names (see the module docstring), then ``directory``."""
    done = []
    qemu = state.get("qemu")
    if not isinstance(qemu, dict) or "pid" not in qemu:
        qemu = _from_pid_file(directory)  # died between starting QEMU and recording it
    if qemu is not None:
        identity = processes.Identity(str(qemu["program"]), str(directory), qemu.get("start_time"))
        if processes.terminate(int(qemu["pid"]), timeout=10.0, identity=identity):
            done.append(f"stopped the booted copy's QEMU (pid {qemu['pid']})")
    domain = state.get("domain")
    if isinstance(domain, dict) and domain.get("name"):
        from vmsnap.vm.libvirt.definition import remove_domain

        uuid = domain.get("uuid")
        if remove_domain(str(domain["name"]), domain.get("uri"), uuid=str(uuid) if uuid else None):
            done.append(f"removed the booted copy's libvirt domain {domain['name']}")
    stopped = []
    servers = directory / SERVERS
    for servers_dir in sorted(servers.iterdir()) if servers.is_dir() else []:  # RUN_DIR/<key>/ of prepare
        if servers_dir.is_dir() and not servers_dir.is_symlink():
            stopped += stop_daemons_under(servers_dir, runner=runner)
    if stopped:
        done.append(f"stopped the backup's NBD servers ({', '.join(stopped)})")
    tpm = state.get("tpm_dir")
    if tpm and Path(str(tpm)).exists():
        shutil.rmtree(Path(str(tpm)).parent if Path(str(tpm)).name in ("tpm2", "tpm1.2") else Path(str(tpm)))
        done.append(f"removed the copy's TPM state {tpm}")
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        done.append(f"removed {directory}")
    return done


def _from_pid_file(directory: Path) -> dict[str, Any] | None:
    """The QEMU a session's ``-pidfile`` names, when that pid is a ``qemu-system-*`` (its arguments must
    name the session's directory too: :func:`processes.terminate` checks that)."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    argv = processes.cmdline(pid)
    if not argv or not is_qemu_program(argv[0]):
        return None
    return {"pid": pid, "program": Path(argv[0]).name, "start_time": None}


def recover(run_root: Path, *, runner: Runner | None = None) -> list[str]:
    """Undo every boot session whose owner died (``vmsnap recover``); one line per session."""
    root = boot_root(run_root)
    if not root.is_dir():
        return []
    lines = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        try:
            state = read_state(directory / STATE) or {}
        except VmsnapError:
            state = {}
        holder = state.get("owner")
        if isinstance(holder, dict) and owner_alive(holder):
            continue
        done = cleanup(directory, state, runner or LocalRunner())
        what = f"{state.get('vm', '?')}/{state.get('backup_id', '?')}"
        lines.append(f"undid the boot verification of {what} in {directory}: {'; '.join(done)}")
    return lines
