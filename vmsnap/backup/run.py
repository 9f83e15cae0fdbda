"""The backup run: plan → snapshot all disks at one instant (frozen) → export each disk into the repository
→ delete the snapshots → seal (manifest last). The orchestrator asks strategies, transports and the
repository what they can do (:mod:`vmsnap.backup.plan`); it never names one. What a backup's bytes become is
the repository's business: its :class:`~vmsnap.repo.layout.BackupWriter` takes each export and seals it.

Every step is recorded in the VM's journal (:mod:`vmsnap.repo.journal`) before it starts, under the VM's
repository lock, so a ``kill -9`` at any point is undone by ``vmsnap recover`` or by the next backup
(:mod:`vmsnap.backup.recover`). A new repository is made before the machine is touched: a first run that
dies before the repository exists has left nothing on the machine (``recover`` says there is no repository).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator, Mapping

import attrs

from vmsnap.backup.config import (
    BackupConfig,
    BackupResult,
    Quiesce,
    RecoveryError,
    crash_point,
)
from vmsnap.backup.plan import Resolved, choose_disks, find_parent, resolve
from vmsnap.backup.recover import ORPHAN_PROGRAMS as ORPHAN_PROGRAMS  # re-exported for callers of 0.1
from vmsnap.backup.recover import recover as recover

__all__ = ["DOMAIN_XML", "ORPHAN_PROGRAMS", "Backup", "BackupConfig", "BackupResult", "recover"]
from vmsnap.backup.recover import recover_leftovers, undo_run
from vmsnap.errors import (
    AgentError,
    RepositoryError,
    SnapshotError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.model import Disk, ExportSource, SnapshotRef, validate_name
from vmsnap.repo.journal import Journal, snapshot_to_json
from vmsnap.repo.layout import DEFINITION_FILE, BackupWriter, RepositoryLayout
from vmsnap.repo.manifest import Kind, Manifest
from vmsnap.repo.progress import DiskProgress, TransferProgress, no_transfer
from vmsnap.repo.reports import WrittenDisk
from vmsnap.repo.repository import Repository
from vmsnap.strategies.base import BackupContext, Checkpoint, Strategy, paused
from vmsnap.transports import transport_class, transport_names
from vmsnap.transports.base import Transport
from vmsnap.vm.freeze import frozen
from vmsnap.vm.machine import Machine
from vmsnap.vm.machine_state import MachineState, MachineStateSource

DOMAIN_XML = DEFINITION_FILE
"""Beside a backup of a machine that has a definition (a libvirt domain): that definition, for ``restore
--define``."""


def _no_disk_progress(disk: str, done: int, total: int) -> None:
    pass


def _no_note(message: str) -> None:
    pass


@contextlib.contextmanager
def _quiesced(
    machine: Machine,
    mode: Quiesce,
    timeout: float,
    note: Callable[[str], None],
    windows: list[float] | None = None,
) -> Iterator[bool]:
    """Freeze the guest for the body when ``mode`` (and an answering agent) says so; yield whether it did.

    :param windows: receives the freeze window in ms (freeze's answer to thaw's answer) when it froze
    """
    if mode == "off" or not machine.is_running:
        if mode == "on":
            raise UsageError(f"--quiesce on needs a running VM; {machine.name} is not running")
        yield False
        return
    agent = machine.agent()
    if agent is None and mode == "auto":  # no agent channel at all: nothing to ask, nothing to say
        yield False
        return
    responding = agent is not None and agent.is_responding()
    if not responding:
        if mode == "on":
            raise AgentError(
                f"--quiesce on: no guest agent answers for {machine.name}",
                hint="start qemu-ga in the guest and pass --agent SOCKET, or use --quiesce auto|off",
            )
        note("no guest agent answered: the backup is crash-consistent, not quiesced")
        yield False
        return
    with frozen(machine, timeout=timeout) as report:
        yield True
    if windows is not None:
        windows.append(float(report.window_ms))


@attrs.frozen
class _Run:
    """One run, decided before its first step (the journal's header records the same)."""

    vm: str
    writer: BackupWriter
    resolved: Resolved
    context: BackupContext
    parent: Manifest | None

    @property
    def backup_id(self) -> str:
        return self.writer.backup_id

    @property
    def strategy_name(self) -> str:
        return self.resolved.strategy.name


class Backup:
    """Runs one backup of ``machine`` into a repository, as :class:`BackupConfig` says.

    :param machine: the VM (running or not)
    :param config: what and how
    :param progress: called with (disk, bytes done, bytes total) while disks are copied
    :param transfer: called with (disk, bytes read/stored/deduplicated/zero) where the repository's layout
        reads the export itself (chunks)
    :param note: called with one-line remarks (fallbacks, recovered leftovers); the CLI prints them
    """

    def __init__(
        self,
        machine: Machine,
        config: BackupConfig,
        *,
        progress: DiskProgress = _no_disk_progress,
        transfer: TransferProgress = no_transfer,
        note: Callable[[str], None] = _no_note,
    ) -> None:
        self.machine = machine
        self.config = config
        self.progress = progress
        self.transfer = transfer
        self.note = note
        self.notes: list[str] = []

    def _note(self, message: str) -> None:
        self.notes.append(message)
        self.note(message)

    def run(self) -> BackupResult:
        """Take the backup.

        :raise UsageError: bad options (unknown disk, incremental with a strategy that cannot)
        :raise RepositoryError: the repository is missing, foreign, or locked by another run
        :raise VmsnapError: any step failed; what it had done is undone and the error re-raised
        """
        started = time.monotonic()
        vm = validate_name(self.machine.name, "VM name")
        found = Repository.locate(
            self.config.repo, create=True, key_file=self.config.key_file, runner=self.machine.runner
        )
        resolved = resolve(
            self.machine, self.config, found.traits()
        )  # bad options fail here, before any write
        crash_point("before-repository")
        repo = found.open()  # the store found above; a new repository is made here
        with repo.lock(vm):
            report = recover_leftovers(repo, self.machine)
            for action in report.actions:
                self._note(f"recovered a dead run: {action}")
            if report.actions:  # the disks may have changed (an overlay committed back): look at them again
                resolved = attrs.evolve(resolved, disks=choose_disks(self.machine, self.config))
            return self._run_locked(repo, vm, resolved, started)

    def _start(self, repo: RepositoryLayout, vm: str, resolved: Resolved) -> tuple[_Run, Journal]:
        """Choose the parent, begin the backup in the repository and start its journal."""
        config = self.config
        parent: Manifest | None = None
        if config.incremental:
            parent, reason = find_parent(repo, vm, resolved.disks, config, resolved.strategy.name)
            if reason is not None:
                self._note(f"taking a full backup: {reason}")
        journal_path = repo.journal_path(vm)
        if journal_path.exists():  # before anything is begun: a dead run must be recovered first
            raise RepositoryError(
                f"{journal_path} exists: a previous run has not been recovered",
                hint="run `vmsnap recover` for this VM and repository",
            )
        writer = repo.begin_backup(vm, parent, runner=self.machine.runner)
        since = None
        if parent is not None:
            since = Checkpoint(parent.backup_id, writer.checkpoint_images(parent, resolved.disks))
        # the strategy's remarks (fallbacks, slow settings) come through the context, not `warnings`: those
        # are process-wide, and a job backs several VMs up at once
        context = BackupContext(writer.workdir, config.bitmap, since, resolved.push, note=self._note)
        journal = Journal.start(
            journal_path,
            vm=vm,
            backup_id=writer.backup_id,
            repo=repo.location,
            staging=str(writer.workdir),
            strategy=resolved.strategy.name,
            context=context.to_json(),
            transport=resolved.transport,
            machine=repr(self.machine),
        )
        return _Run(vm, writer, resolved, context, parent), journal

    def _run_locked(
        self, repo: RepositoryLayout, vm: str, resolved: Resolved, started: float
    ) -> BackupResult:
        run, journal = self._start(repo, vm, resolved)
        with contextlib.ExitStack() as workspace:
            try:
                crash_point("after-start")
                # a machine on another host needs the work directory there too (QEMU writes fleecing files)
                workspace.enter_context(self.machine.workspace(run.writer.workdir))
                return self._take(repo, journal, run, started)
            except BaseException as err:
                try:
                    undo_run(repo, self.machine, journal)
                except VmsnapError as undo_err:
                    raise RecoveryError(
                        f"{_one_line(err)}; undoing the run failed too: {undo_err.message}",
                        hint=f"fix that, then run `vmsnap recover --repo {repo.location}` for {vm}",
                    ) from err
                with contextlib.suppress(VmsnapError, OSError):
                    run.writer.discard()  # what undo_run left of it (the chunks layout's open cache file)
                if isinstance(err, OSError):  # e.g. the journal could not be written: QEMU filled the disk
                    raise _repository_write_error(repo, err) from err
                raise

    def _take(self, repo: RepositoryLayout, journal: Journal, run: _Run, started: float) -> BackupResult:
        strategy = run.resolved.strategy.for_backup(self.machine, run.context)
        for disk in run.resolved.disks:
            if not strategy.probe(disk):
                raise UnsupportedError(
                    f"strategy {run.strategy_name} cannot snapshot disk {disk.name} "
                    f"({disk.file}, {disk.format})",
                    hint="`vmsnap strategies` shows what each one needs; choose another with --strategy",
                )
        state_source = self.machine.machine_state()  # found before anything is frozen
        refs, quiesced, freeze_ms, state = self._snapshot(strategy, journal, run, state_source)
        if state is not None and state.refused is not None:
            self._note(f"the QEMU command line was not kept with the backup: {state.refused}")
        exported = self._export_all(strategy, refs, journal, run)
        for disk in run.resolved.disks:
            journal.record("deleting", disk=disk.name)
            strategy.delete(refs[disk.name])
            journal.record("deleted", disk=disk.name)
        crash_point("after-delete")
        kind = self._kind(run, exported)
        definition = self.machine.definition()
        journal.record("sealing")
        for name, data in (state.objects() if state is not None else {}).items():
            run.writer.attach(name, data)  # sealed with the backup by its manifest
        crash_point("before-manifest")
        manifest = run.writer.seal(
            kind=kind,
            parent=run.parent if kind == "incremental" else None,
            strategy=run.strategy_name,
            quiesced=quiesced,
            bitmap=self.config.bitmap if run.resolved.strategy.capabilities.incremental else None,
            definition=definition,
        )
        crash_point("after-manifest")
        journal.record("committed", path=run.writer.location)
        if run.resolved.strategy.capabilities.tracks_changes and kind == "full":
            repo.clear_full_required(run.vm)
        journal.remove()
        return BackupResult(
            vm=run.vm,
            backup_id=run.backup_id,
            kind=kind,
            parent=manifest.parent,
            strategy=run.strategy_name,
            transport=manifest.transport,
            quiesced=manifest.quiesced,
            disks=manifest.disks,
            seconds=time.monotonic() - started,
            path=run.writer.location,
            notes=tuple(self.notes),
            freeze_ms=freeze_ms,
        )

    def _snapshot(
        self, strategy: Strategy, journal: Journal, run: _Run, state_source: MachineStateSource | None
    ) -> tuple[dict[str, SnapshotRef], bool, float | None, MachineState | None]:
        """Freeze (as configured), snapshot every disk at one instant and capture the machine's state, thaw:
        (refs by disk, quiesced, freeze window in ms, machine state). Firmware variables and TPM state are
        read with the vCPUs paused around the snapshot, so they are of its instant."""
        name = f"backup-{run.backup_id}"
        disks = run.resolved.disks
        # the run state before: between "freezing" and "thawed" the vCPUs may be paused (the state capture
        # below, a strategy's own pause); `recover` resumes a VM this run left paused, not one paused before
        journal.record("freezing", vm_status=self.machine.qmp().status() if self.machine.is_running else None)
        windows: list[float] = []
        with _quiesced(
            self.machine, self.config.quiesce, self.config.freeze_timeout, self._note, windows
        ) as quiesced:
            journal.record("frozen", quiesced=quiesced)
            crash_point("after-freeze")
            journal.record("creating", name=name)
            pause = state_source is not None and state_source.needs_pause
            with paused(self.machine) if pause else contextlib.nullcontext():
                try:
                    refs = list(strategy.create(disks, name=name))
                except VmsnapError:
                    journal.record("create-failed")
                    raise
                journal.record("created", snapshots=[snapshot_to_json(r) for r in refs])
                state = state_source.capture() if state_source is not None else None
                crash_point("while-paused")  # paused, when the machine has state files to capture
            crash_point("after-create")
        journal.record("thawed")
        crash_point("after-thaw")
        by_disk = {r.disk.name: r for r in refs}
        for disk in disks:
            if disk.name not in by_disk:
                raise SnapshotError(f"strategy {strategy.name} returned no snapshot for disk {disk.name}")
        return by_disk, quiesced, windows[0] if windows else None, state

    def _export_all(
        self, strategy: Strategy, refs: Mapping[str, SnapshotRef], journal: Journal, run: _Run
    ) -> dict[str, WrittenDisk]:
        """Export every disk's snapshot into the repository's writer."""
        exported: dict[str, WrittenDisk] = {}
        for index, disk in enumerate(run.resolved.disks):
            journal.record("exporting", disk=disk.name)
            with strategy.export(refs[disk.name]) as served:
                journal.record("serving", disk=disk.name, kind=served.kind, location=served.location)
                # a layout that reads the export itself reads it here: through the SSH tunnel when the VM
                # runs on another host (transports of the qcow2 layout run their commands on the VM's host)
                reach = self.machine.reachable if run.resolved.reads_itself else contextlib.nullcontext
                with reach(served) as source:
                    exported[disk.name] = self._export_one(disk, source, run)
                if index == 0:
                    crash_point("mid-export")
            journal.record("exported", disk=disk.name, bytes_written=exported[disk.name].bytes_written)
        crash_point("after-export")
        return exported

    def _export_one(self, disk: Disk, source: ExportSource, run: _Run) -> WrittenDisk:
        """One disk into the writer: it reads the source itself (chunks), adopts what the strategy wrote
        (push), or has a transport copy it."""
        transport = None
        if not run.resolved.push and not run.resolved.reads_itself:
            transport = self._transport_for(run.resolved.transport, source)
        written = run.writer.write(
            disk,
            source,
            transport=transport,
            progress=lambda done, total: self.progress(disk.name, done, total),
            transfer=lambda figures: self.transfer(disk.name, figures),
        )
        if written.note is not None:
            self._note(written.note)
        return written

    def _transport_for(self, name: str, source: ExportSource) -> Transport:
        """The transport for ``source``: the one named, or ("auto") the first by preference that reads it."""
        candidates = transport_names() if name == "auto" else [name]
        for candidate in candidates:
            transport = transport_class(candidate)(runner=self.machine.runner)
            if transport.accepts(source):
                return transport
        raise UnsupportedError(
            f"transport {name} cannot read a {source.kind} source ({source.location})",
            hint="choose another --transport (copy reads files and devices, nbd reads NBD exports)",
        )

    def _kind(self, run: _Run, exported: Mapping[str, WrittenDisk]) -> Kind:
        """ "incremental" when every disk's content is relative to the parent, "full" when none is."""
        if run.parent is None:
            return "full"
        relative = {e.since == run.parent.backup_id for e in exported.values()}
        if relative == {True}:
            return "incremental"
        if relative == {False}:
            self._note("the strategy took a full backup (see the note above for why)")
            return "full"
        # one manifest kind per backup: a chain must not mix them per disk
        raise SnapshotError(f"strategy {run.strategy_name} returned full and incremental disks in one backup")


def _one_line(err: BaseException) -> str:
    if isinstance(err, VmsnapError):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return f"{type(err).__name__}: {err}"


def _repository_write_error(repo: RepositoryLayout, err: OSError) -> RepositoryError:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    return RepositoryError(
        f"writing into the repository {repo.location} failed: "
        + ("the filesystem is full " if full else "")
        + f"({err.strerror or err})",
        hint="free space there (nothing partial was kept) and run the backup again"
        if full
        else "check the repository's filesystem and permissions",
    )
