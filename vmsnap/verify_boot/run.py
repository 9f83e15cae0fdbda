"""``vmsnap verify --boot``: prove that a backup boots.

One verification, in order:

1. resolve the backup and what boots it: the libvirt definition kept with it, else the bare QEMU command
   line kept as machine state (:mod:`vmsnap.vm.machine_state`); a backup with neither is refused before
   anything is made;
2. under this host's boot lock, make a session (:mod:`vmsnap.restore.boot_session`): the backup's disks
   served read-only over NBD and throwaway qcow2 overlays on them (:func:`vmsnap.restore.instant.prepare`:
   the copy writes no data of the repository and nothing of the live VM's);
3. start the copy (:mod:`~vmsnap.verify_boot.qemu_boot`, :mod:`~vmsnap.verify_boot.libvirt_boot`): a new
   name and UUID, its own QMP and agent sockets, no route to any network (a user-mode NIC with
   ``restrict=on`` at most, forwarding each ``--port`` from 127.0.0.1), the backup's firmware variables and
   TPM state;
4. wait for the guest agent (``guest-ping``, then ``guest-get-osinfo``), run each check (``guest-exec``),
   probe each port, take a screenshot (``screendump``, PNG) where there is a display;
5. stop the copy, keep its serial console's last lines, remove everything the session made;
6. keep the result beside the backup (:mod:`vmsnap.verify_boot.result`), under the reader lease still: the
   only thing a verification writes to the repository.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from vmsnap.errors import UsageError, VmsnapError
from vmsnap.image.sources import BackupSource
from vmsnap.model import validate_name
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.repository import Repository
from vmsnap.restore import instant
from vmsnap.restore.backups import read_machine_state
from vmsnap.restore.boot_session import BootBusyError, BootSession, boot_root, host_lock
from vmsnap.restore.commands import DEFAULT_RUN_ROOT
from vmsnap.sockets import free_tcp_port
from vmsnap.verify_boot import probe
from vmsnap.verify_boot.libvirt_boot import DomainCopy, start_domain_copy
from vmsnap.verify_boot.qemu_boot import QemuCopy, start_copy
from vmsnap.verify_boot.result import PREFIX, BootResult, CheckResult, PortResult, new_stamp
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.libvirt.domain import is_local_uri
from vmsnap.vm.machine_state import MachineState

DEFAULT_TIMEOUT = 300.0


class NotBootableError(VmsnapError):
    """A backup that vmsnap cannot boot: nothing kept with it says how the VM is started."""


def _no_note(message: str) -> None:
    pass


@attrs.frozen
class BootConfig:
    """What ``vmsnap verify --boot`` verifies and how.

    :param repo: the repository
    :param vm: the VM
    :param backup_id: the backup (None: the latest)
    :param key_file: an encrypted repository's key file
    :param checks: commands to run in the guest (each must exit 0)
    :param ports: guest TCP ports that must accept a connection
    :param timeout: seconds the guest agent has to answer (more than 0)
    :param connect: the libvirt URI a libvirt domain's copy runs under
    :param run_root: where sessions live (``$VMSNAP_RUN_DIR``, default ``/run/vmsnap``)
    :param lock_wait: seconds to wait for another boot verification on this host
    :param console_lines: serial console lines kept
    :raise UsageError: a timeout of 0 or less (or infinite), a port out of range, a check that is no
        command, a libvirt URI of another host
    """

    repo: Path | str
    vm: str
    backup_id: str | None = None
    key_file: Path | None = None
    checks: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    connect: str | None = None
    run_root: Path = DEFAULT_RUN_ROOT
    lock_wait: float = 3600.0
    console_lines: int = 40

    def __attrs_post_init__(self) -> None:
        validate_name(self.vm, "VM name")
        if self.backup_id is not None:
            validate_name(self.backup_id, "backup id")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise UsageError(
                f"--timeout {self.timeout:g} leaves the guest no time to boot",
                hint="give the seconds to wait for its agent, e.g. --timeout 300",
            )
        for port in self.ports:
            if not 0 < port < 65536:
                raise UsageError(f"--port {port} is no TCP port", hint="give a port from 1 to 65535")
        for check in self.checks:
            probe.check_argv(check)
        if not is_local_uri(self.connect):
            raise UsageError(
                f"--connect {self.connect} is another host's libvirtd: the copy runs on this host's overlays",
                hint="verify the boot on the domain's own host, with a local URI (qemu:///system)",
            )


def _refuse(manifest: Manifest, state: MachineState | None) -> NotBootableError:
    where = f"backup {manifest.backup_id} of {manifest.vm}"
    if state is not None and state.refused is not None:
        secret = "secret" in state.refused
        return NotBootableError(
            f"{where} cannot be booted: its QEMU command line was not kept because {state.refused}",
            hint="give that secret by file (-object secret,file=…), take a new backup and verify that one"
            if secret
            else "take a new backup on the VM's own host, through its QMP socket, and verify that one",
        )
    return NotBootableError(
        f"{where} has no bootable definition: it holds disk images only, with no libvirt definition and no "
        "QEMU command line",
        hint="back the VM up while it runs, with --qmp SOCKET (its command line is kept) or --domain NAME "
        "(its definition is kept), and verify that backup",
    )


def verify_boot(
    config: BootConfig, *, note: Callable[[str], None] = _no_note, store: bool = True
) -> BootResult:
    """Boot a backup on throwaway overlays and judge it (see the module docstring); the result is kept
    beside the backup (unless ``store`` is False) and returned, passed or failed.

    :raise NotFoundError: no such VM or backup
    :raise NotBootableError: nothing kept with the backup says how to start the VM
    :raise UnsupportedError: the kept command line has an option that would touch the live VM
    :raise BootBusyError: another boot verification held this host for ``lock_wait`` seconds
    :raise BootStartError: the copy did not start
    """
    repo = Repository.open(config.repo, key_file=config.key_file)
    manifest = repo.get(config.vm, config.backup_id)
    definition = repo.definition(manifest)
    state = read_machine_state(repo, manifest)
    if definition is None and (state is None or state.argv is None):
        raise _refuse(manifest, state)
    stamp = new_stamp()
    with repo.reading(manifest.vm):
        sources = {d.name: repo.disk_source(manifest, d.name) for d in manifest.disks}
        with contextlib.ExitStack() as waiting:
            try:
                waiting.enter_context(host_lock(config.run_root, wait=0))
            except BootBusyError:
                note("another boot verification runs on this host: waiting for it")
                waiting.enter_context(host_lock(config.run_root, wait=config.lock_wait))
            started = time.monotonic()  # the guest's time starts once it may boot, not while waiting
            # short: the copy's unix sockets are in it (108 bytes at most); the state names the VM
            session = BootSession(boot_root(config.run_root) / f"{stamp[:15]}-{secrets.token_hex(3)}")
            session.record(vm=manifest.vm, backup_id=manifest.backup_id)
            try:
                result, png = _boot(config, session, manifest, definition, state, sources, started, stamp)
            finally:
                session.cleanup()
        if store:  # under the reader lease still: prune cannot remove the backup beneath the result
            result = keep(repo, manifest, result, png)
    return result


@attrs.frozen
class _Probed:
    """What the probes found in a running copy."""

    to_agent: float | None
    alive: bool
    osinfo: dict[str, Any] | None
    checks: tuple[CheckResult, ...]
    ports: tuple[PortResult, ...]
    screenshot_skipped: str | None


def _start(
    config: BootConfig,
    session: BootSession,
    definition: str | None,
    state: MachineState | None,
    images: dict[str, Path],
    name: str,
    ports: dict[int, int],
) -> tuple[QemuCopy | DomainCopy, Callable[[], GuestAgent | None]]:
    """Start the copy (a libvirt domain from the definition, else QEMU from the command line); with it, a
    function that connects to its agent."""
    if definition is not None:
        domain = start_domain_copy(
            session,
            definition,
            state,
            images,
            name=name,
            uuid=str(uuid.uuid4()),
            uri=config.connect,
            ports=ports,
        )
        return domain, domain.agent
    assert state is not None
    copy = start_copy(session, state, images, name=name, ports=ports)
    socket = copy.agent

    def connect() -> GuestAgent | None:
        return GuestAgent.from_socket(socket, timeout=3.0) if socket.exists() else None

    return copy, connect


def _probe(
    config: BootConfig,
    copy: QemuCopy | DomainCopy,
    agent_of: Callable[[], GuestAgent | None],
    ports: dict[int, int],
    started: float,
    png: Path,
) -> _Probed:
    deadline = started + config.timeout
    agent = probe.wait_for_agent(agent_of, deadline=deadline, alive=copy.alive)
    to_agent = time.monotonic() - started if agent is not None else None
    osinfo = None
    checks: list[CheckResult] = []
    port_results: list[PortResult] = []
    if agent is not None:
        try:
            osinfo = probe.osinfo(agent)
            checks = [probe.run_check(agent, check) for check in config.checks]
            port_deadline = max(deadline, time.monotonic() + 10.0)
            port_results = [
                probe.probe_port(
                    p, ports[p], deadline=port_deadline, sockets=partial(probe.guest_sockets, agent)
                )
                for p in config.ports
            ]
        finally:
            agent.close()
    skipped: str | None = "the copy had stopped"
    if copy.alive():
        skipped = copy.screenshot(png)
    return _Probed(to_agent, copy.alive(), osinfo, tuple(checks), tuple(port_results), skipped)


def _boot(
    config: BootConfig,
    session: BootSession,
    manifest: Manifest,
    definition: str | None,
    state: MachineState | None,
    sources: dict[str, BackupSource],
    started: float,
    stamp: str,
) -> tuple[BootResult, bytes | None]:
    restore = instant.prepare(sources, session.disks, run_dir=session.servers)
    ports = {port: free_tcp_port() for port in config.ports}
    name = f"vmsnap-boot-{manifest.vm}"[:60]
    copy, agent_of = _start(config, session, definition, state, restore.images, name, ports)
    png = session.directory / "screen.png"
    try:
        found = _probe(config, copy, agent_of, ports, started, png)
    finally:
        copy.stop()
    tail, tail_skipped = probe.console_tail(copy.console, lines=config.console_lines)
    reason = _reason(config, found)
    result = BootResult(
        vm=manifest.vm,
        backup_id=manifest.backup_id,
        stamp=stamp,
        verdict="passed" if reason is None else "failed",
        reason=reason,
        kind="libvirt" if definition is not None else "qemu",
        seconds_to_agent=round(found.to_agent, 3) if found.to_agent is not None else None,
        seconds=round(time.monotonic() - started, 3),
        timeout=config.timeout,
        osinfo=found.osinfo,
        checks=found.checks,
        ports=found.ports,
        screenshot=f"{PREFIX}{stamp}.png" if found.screenshot_skipped is None else None,
        screenshot_skipped=found.screenshot_skipped,
        console_tail=tail,
        console_skipped=tail_skipped,
        accelerator=copy.accelerator,
    )
    return result, png.read_bytes() if found.screenshot_skipped is None else None


def _reason(config: BootConfig, found: _Probed) -> str | None:
    if found.to_agent is None:
        if not found.alive:
            return "the copy stopped before its guest agent answered"
        return f"the guest agent never answered within {config.timeout:g} s"
    for check in found.checks:
        if not check.ok:
            return check.describe()
    for port in found.ports:
        if not port.open:
            return f"port {port.port} did not answer ({port.detail})"
    return None


def keep(repo: RepositoryLayout, manifest: Manifest, result: BootResult, png: bytes | None) -> BootResult:
    """Keep a result (and its screenshot) beside the backup; returns it with ``stored_bytes`` (the kept
    objects' bytes before the repository compresses or encrypts them) set."""
    objects = {result.screenshot: png} if result.screenshot is not None and png is not None else {}
    for _ in range(3):  # the JSON holds its own size: settle it
        payload = json.dumps(result.to_json(), indent=1, sort_keys=True).encode()
        size = len(payload) + sum(len(v) for v in objects.values())
        if size == result.stored_bytes:
            break
        result = attrs.evolve(result, stored_bytes=size)
    for name, data in objects.items():
        assert name is not None
        repo.attach(manifest, name, data)
    repo.attach(manifest, result.name, json.dumps(result.to_json(), indent=1, sort_keys=True).encode())
    return result
