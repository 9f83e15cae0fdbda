"""A machine on another hypervisor: the machine (bare QEMU, libvirt domain or powered-off images) built on
that host's forwarded sockets and :class:`~vmsnap.runner.SshRunner`, plus what being elsewhere needs.

- **Exports** (:meth:`RemoteMachine.reachable`): a strategy names its export as the VM's host sees it — QEMU's
  NBD server on ``/tmp/vmsnap-nbd-…/nbd.sock`` *there*. The remote machine forwards that unix socket over
  the SSH master (``ssh -O forward -L LOCAL:REMOTE``) and hands the reader the same export on the local
  socket; dirty-bitmap contexts pass through NBD unchanged, so incrementals read only what changed. A file
  or device export (a strategy that yields an image) is served read-only by ``qemu-nbd`` on that host first
  and then forwarded the same way. Nothing but NBD crosses the tunnel, and nothing listens on TCP.
- **Work files** (:meth:`RemoteMachine.workspace`): QEMU writes a pull backup's fleecing files where it
  runs, so the backup's private work directory is made on that host too (same path, 0700, parents 0700),
  and removed there afterwards.

The local repository never sees the other host's paths: this is what lets one backup server serve a rack
of hypervisors into a local (or S3) chunks repository. (The qcow2 layout still has its images written by
commands on the VM's host, so it needs the repository on storage both hosts mount at the same path.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from vmsnap.errors import UnsupportedError, VmsnapError
from vmsnap.image.nbd import QemuNbdServer
from vmsnap.model import Disk, ExportSource
from vmsnap.runner import Runner
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.guards import GuardPlan, GuardTarget, SshGuardSite
from vmsnap.vm.machine import Machine
from vmsnap.vm.machine_state import MachineStateSource
from vmsnap.vm.qmp import QMPMonitor
from vmsnap.vm.remote import RemoteHost

_log = logging.getLogger(__name__)

_MAKE_DIR = """umask 077
if [ -e "$1" ] || [ -L "$1" ]; then exit 0; fi
mkdir -p -- "$1" && printf made"""
"""Makes a private directory (and missing parents, 0700) on the other host; prints "made" if it was not
there (only then is it removed afterwards: on storage both hosts share, it is the repository's own)."""


def nbd_unix_socket(uri: str) -> str:
    """The socket path of an ``nbd+unix:///EXPORT?socket=PATH`` URI.

    :raise UnsupportedError: another kind of NBD URI (TCP exports on another host are not forwarded)
    """
    if uri.startswith("nbd+unix://") and "?" in uri:
        for part in uri.split("?", 1)[1].split("&"):
            if part.startswith("socket="):
                return part.removeprefix("socket=")
    raise UnsupportedError(
        f"the NBD export {uri} cannot be forwarded from another host",
        hint="only unix-socket exports (nbd+unix://…?socket=…) are read through the SSH tunnel",
    )


def with_socket(uri: str, socket: Path) -> str:
    """``uri`` with its ``socket=`` parameter replaced by ``socket``."""
    head, query = uri.split("?", 1)
    parts = [f"socket={socket}" if p.startswith("socket=") else p for p in query.split("&")]
    return f"{head}?{'&'.join(parts)}"


class RemoteMachine:
    """``machine`` running on the host behind ``host`` (see the module docstring).

    :param machine: the machine, made with ``host``'s forwarded sockets and ``host.runner``
    :param host: the open SSH connection to its hypervisor
    :param forwards: remote sockets forwarded for it (its QMP and agent sockets), cancelled by :meth:`close`
    :param owns_host: :meth:`close` closes ``host`` too (a connection opened for this machine alone)
    """

    def __init__(
        self,
        machine: Machine,
        host: RemoteHost,
        *,
        forwards: Sequence[str] = (),
        owns_host: bool = False,
    ) -> None:
        self.machine = machine
        self.host = host
        self.name: str = machine.name
        self.runner: Runner = machine.runner
        self._forwards = tuple(forwards)
        self._owns_host = owns_host
        self._guards: SshGuardSite | None = None

    @property
    def is_running(self) -> bool:
        return self.machine.is_running

    def disks(self) -> list[Disk]:
        return self.machine.disks()

    def qmp(self) -> QMPMonitor:
        return self.machine.qmp()

    def agent(self) -> GuestAgent | None:
        return self.machine.agent()

    def definition(self) -> str | None:
        return self.machine.definition()

    def machine_state(self) -> MachineStateSource | None:
        """None: the machine's process and files are on the other host (not captured from there)."""
        return None

    def recover(self) -> list[str]:
        return self.machine.recover()

    def guard_plan(self) -> GuardPlan | None:
        """A guard on the other host for an agent socket forwarded from there (it outlives this process and
        its SSH connection); a libvirt domain's guard as the domain says (its own libvirt connection).

        Where the other host cannot run one (no ``python3`` there), the guard runs here on the forwarded
        socket, as the machine says: it thaws when this process dies while the SSH master still runs, not
        when the connection dies (a warning says so).
        """
        plan = self.machine.guard_plan()
        if plan is None or plan.target.kind != "socket":
            return plan
        local = Path(plan.target.address[0])
        remote = next((r for r in self._forwards if self.host.local(r) == local), None)
        if remote is None:  # not one of our forwards: the machine was made another way
            return plan
        if self._guards is None:
            self._guards = SshGuardSite(self.host)
        if not self._guards.available():
            _log.warning(
                "no thaw guard can run on %s (python3 is missing there): the guard runs here, through the "
                "SSH connection, and cannot thaw the guest if that connection dies",
                self.host.destination,
            )
            return plan
        qmp = plan.target.qmp
        remote_qmp = next((r for r in self._forwards if qmp and self.host.local(r) == Path(qmp)), None)
        return GuardPlan(GuardTarget.socket(remote, qmp=remote_qmp), self._guards)

    def close(self) -> None:
        """Close the machine, cancel its forwards (and close the connection when it owns it)."""
        try:
            self.machine.close()
        finally:
            for remote in self._forwards:
                self.host.cancel(remote)
            if self._owns_host:
                self.host.close()

    @contextlib.contextmanager
    def reachable(self, source: ExportSource) -> Iterator[ExportSource]:
        """``source`` as an NBD export on a local socket forwarded to the other host, for the body.

        :raise UnsupportedError: a TCP NBD export
        :raise NotFoundError: the export's socket does not exist there
        :raise TransferError: qemu-nbd could not serve a file or device there
        """
        if source.kind == "nbd":
            remote = nbd_unix_socket(source.location)
            with self.host.forwarded(remote) as local:
                yield attrs.evolve(source, location=with_socket(source.location, local))
            return
        with (
            QemuNbdServer.for_source(source, runner=self.runner) as server,
            self.host.forwarded(server.socket) as local,
        ):
            yield attrs.evolve(
                source,
                kind="nbd",
                location=with_socket(server.uri, local),
                format="raw",
                image_opts={},
                force_share=False,
            )

    @contextlib.contextmanager
    def workspace(self, path: Path) -> Iterator[Path]:
        """``path`` made on the other host (0700) for the body, and removed there afterwards if it was made.

        :raise CommandError: it cannot be made there
        """
        made = self.runner.run(["sh", "-c", _MAKE_DIR, "sh", str(path)], timeout=60).stdout == "made"
        try:
            yield path
        finally:
            if made:
                with contextlib.suppress(VmsnapError):
                    self.runner.run(["rm", "-rf", "--", str(path)], timeout=120)

    def __enter__(self) -> RemoteMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteMachine({self.machine!r}, host={self.host.destination!r})"
