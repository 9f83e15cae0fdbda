"""The backup orchestrator: resolve disks → quiesce → snapshot all disks at once → thaw → export and transfer
→ delete the snapshots → chunk digests (an incremental reads only its own clusters) → manifest last; and
:func:`recover`, which undoes what a dead run left.

Every step is recorded in the VM's journal (:mod:`vmsnap.repo.journal`) before it starts, under the VM's
repository lock, so a ``kill -9`` at any point is undone by ``vmsnap recover`` or by the next backup.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap import processes
from vmsnap.errors import (
    AgentError,
    RepositoryError,
    SnapshotError,
    UnsupportedError,
    UsageError,
    VmsnapError,
)
from vmsnap.files import fsync_file
from vmsnap.model import Disk, validate_name
from vmsnap.registry import strategy_class, transport_class
from vmsnap.repo.journal import Journal, snapshot_to_json
from vmsnap.repo.repository import (
    DiskProgress,
    DiskRecord,
    Kind,
    Manifest,
    Repository,
    utc_now_iso,
)
from vmsnap.vm.freeze import frozen
from vmsnap.vm.machine import Machine, find_disk

Quiesce = Literal["auto", "on", "off"]
CRASH_ENV = "VMSNAP_TEST_CRASH_AT"
"""Test-only: a step name at which the backup process SIGKILLs itself (see :func:`crash_point`)."""

CRASH_POINTS = (
    "after-start",
    "after-freeze",
    "after-create",
    "after-thaw",
    "mid-export",
    "after-export",
    "after-delete",
    "before-manifest",
)
PUSH = "none"
"""The transport name recorded when QEMU wrote the backup itself (strategy backup, push mode)."""


def crash_point(name: str) -> None:
    """TEST ONLY: kill this process with SIGKILL when ``$VMSNAP_TEST_CRASH_AT`` is ``name`` (SIGTERM when it
    is ``term:name``).

    The crash-recovery tests use it to stop a ``vmsnap backup`` at an exact step; nothing else sets it.
    """
    wanted = os.environ.get(CRASH_ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"term:{name}":
        os.kill(os.getpid(), signal.SIGTERM)


@attrs.frozen
class BackupConfig:
    """What to back up and how (the CLI builds it from its options).

    :param repo: the repository directory (created when missing or empty)
    :param strategy: a strategy name, or "auto" (backup: QEMU's backup job, or qemu-img for images)
    :param transport: a transport name, or "auto" (copy when it accepts the source, else nbd); with strategy
        backup "auto"/"none" means QEMU writes the backup itself (push) and "nbd" means pull mode
    :param incremental: only what changed since the VM's latest backup (strategy backup); falls back to full
        (and says why) when there is no usable parent
    :param quiesce: "auto" freezes when a guest agent answers, "on" requires it, "off" never freezes
    :param disks: back up only these disks (default: all)
    :param bitmap: the persistent dirty bitmap incremental backups track changes with
    :param freeze_timeout: seconds the guest agent gets to freeze
    """

    repo: Path
    strategy: str = "auto"
    transport: str = "auto"
    incremental: bool = False
    quiesce: Quiesce = "auto"
    disks: tuple[str, ...] = ()
    bitmap: str = "vmsnap"
    freeze_timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.quiesce not in ("auto", "on", "off"):
            raise UsageError(f"--quiesce {self.quiesce!r}", hint="use auto, on or off")
        for disk in self.disks:
            validate_name(disk, "disk name")
        validate_name(self.bitmap, "bitmap name")


@attrs.frozen
class BackupResult:
    """What a backup made (the CLI prints it; ``--json`` as in DESIGN.md)."""

    vm: str
    backup_id: str
    kind: Kind
    parent: str | None
    strategy: str
    transport: str
    quiesced: bool
    disks: tuple[DiskRecord, ...]
    seconds: float
    path: Path
    notes: tuple[str, ...] = ()
    freeze_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vmsnap backup``."""
        return {
            "vm": self.vm,
            "backup_id": self.backup_id,
            "kind": self.kind,
            "strategy": self.strategy,
            "transport": self.transport,
            "disks": [d.to_json() for d in self.disks],
            "seconds": round(self.seconds, 3),
            "freeze_ms": None if self.freeze_ms is None else round(self.freeze_ms, 1),
        }


@attrs.frozen
class RecoveryReport:
    """What :func:`recover` undid (each action one line), and whether there was anything to do."""

    vm: str
    actions: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not self.actions


class RecoveryError(VmsnapError):
    """Undoing a dead run failed part-way; the journal is kept so that ``vmsnap recover`` can try again."""


def _no_disk_progress(disk: str, done: int, total: int) -> None:
    pass


def _no_note(message: str) -> None:
    pass


# -- strategy construction (also from a journal) ------------------------------------------------------------


def _strategy_options(
    name: str, *, staging: Path, incremental: bool, parents: Mapping[str, Path], bitmap: str, mode: str
) -> dict[str, Any]:
    if name != "backup":
        return {}
    return {
        "target_dir": staging,
        "incremental": incremental,
        "parents": dict(parents) if parents else None,
        "bitmap": bitmap,
        "mode": mode,
        # create returns once the jobs run, so the guest is thawed at once; export waits for the copy
        "wait": False,
    }


def _options_to_json(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Path):
            out[key] = {"path": str(value)}
        elif isinstance(value, Mapping):
            out[key] = {"paths": {k: str(v) for k, v in value.items()}}
        else:
            out[key] = value
    return out


def _options_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and set(value) == {"path"}:
            out[key] = Path(value["path"])
        elif isinstance(value, dict) and set(value) == {"paths"}:
            out[key] = {k: Path(v) for k, v in value["paths"].items()}
        else:
            out[key] = value
    return out


def _make_strategy(name: str, machine: Machine, options: Mapping[str, Any]) -> Any:
    cls = strategy_class(name)
    return cls(machine, **options)


# -- quiescing ----------------------------------------------------------------------------------------------


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


# -- the orchestrator ---------------------------------------------------------------------------------------


@attrs.frozen
class _RunPlan:
    """What one run does, decided before its first step (the journal's header records the same)."""

    vm: str
    backup_id: str
    staging: Path
    strategy: str
    transport: str
    options: Mapping[str, Any]
    disks: tuple[Disk, ...]
    parent: Manifest | None


class Backup:
    """Runs one backup of ``machine`` into a repository, as :class:`BackupConfig` says.

    :param machine: the VM (running or not)
    :param config: what and how
    :param progress: called with (disk, bytes done, bytes total) while disks are copied
    :param note: called with one-line remarks (fallbacks, recovered leftovers); the CLI prints them
    """

    def __init__(
        self,
        machine: Machine,
        config: BackupConfig,
        *,
        progress: DiskProgress = _no_disk_progress,
        note: Callable[[str], None] = _no_note,
    ) -> None:
        self.machine = machine
        self.config = config
        self.progress = progress
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
        self._resolve()  # bad options and unreadable disks fail here, before anything is written
        repo = Repository.open(self.config.repo, create=True, runner=self.machine.runner)
        with repo.lock(vm), warnings.catch_warnings(record=True) as caught:
            # strategies warn (fallbacks, slow settings): pass the warnings on as notes
            warnings.simplefilter("always")
            try:
                report = recover_leftovers(repo, self.machine)
                for action in report.actions:
                    self._note(f"recovered a dead run: {action}")
                return self._run_locked(repo, vm, started)
            finally:
                for warning in caught:
                    self._note(str(warning.message))

    def _resolve(self) -> tuple[str, str, str, list[Disk]]:
        """(strategy, transport, mode, disks) after "auto" choices and checks."""
        config = self.config
        disks = self.machine.disks()
        if config.disks:
            disks = [find_disk(disks, name) for name in config.disks]
        for disk in disks:
            validate_name(disk.name, "disk name")
        if not disks:
            raise UsageError(f"{self.machine.name} has no disks to back up")
        strategy = config.strategy
        if strategy == "auto":
            strategy = "backup"  # running: QEMU's backup job; powered off: qemu-img convert (raw too)
        transport = config.transport
        mode = "push"
        if strategy == "backup":
            if transport in ("auto", PUSH):
                transport = PUSH
            elif transport == "nbd":
                mode = "pull"
            else:
                raise UsageError(
                    f"strategy backup cannot use transport {transport!r}",
                    hint="leave --transport out (QEMU writes the backup) or use --transport nbd (pull mode)",
                )
        elif transport == PUSH:
            raise UsageError(f"transport {PUSH!r} exists only for strategy backup")
        if config.incremental and strategy != "backup":
            raise UsageError(
                f"--incremental needs --strategy backup (strategy {strategy} takes full backups only)"
            )
        return strategy, transport, mode, disks

    def _parent(self, repo: Repository, vm: str, disks: Sequence[Disk]) -> tuple[Manifest | None, str | None]:
        """The parent of an incremental backup, or (None, why the backup must be full)."""
        try:
            latest = repo.latest(vm)
        except RepositoryError as err:
            return None, f"the latest backup cannot be used as a parent ({err.message})"
        if latest is None:
            return None, f"no earlier backup of {vm} in this repository"
        forced = repo.full_required(vm)
        if forced is not None:
            return None, f"the dirty bitmap cannot be trusted ({forced})"
        if latest.strategy != "backup" or latest.bitmap != self.config.bitmap:
            return (
                None,
                f"the latest backup {latest.backup_id} was not taken with bitmap {self.config.bitmap}",
            )
        try:
            repo.chain(latest)
        except VmsnapError as err:
            return None, f"the chain of {latest.backup_id} is broken ({err.message})"
        recorded = {d.name: d for d in latest.disks}
        for disk in disks:
            record = recorded.get(disk.name)
            if record is None or record.virtual_size != disk.virtual_size:
                return None, f"disk {disk.name} is new or was resized since {latest.backup_id}"
        return latest, None

    def _run_locked(self, repo: Repository, vm: str, started: float) -> BackupResult:
        config = self.config
        strategy_name, transport_name, mode, disks = self._resolve()
        parent: Manifest | None = None
        if config.incremental:
            parent, reason = self._parent(repo, vm, disks)
            if reason is not None:
                self._note(f"taking a full backup: {reason}")
        parents = (
            {d.name: repo.backup_dir(vm, parent.backup_id) / f"{d.name}.qcow2" for d in disks}
            if parent
            else {}
        )
        backup_id = repo.new_backup_id(vm)
        staging = repo.stage(vm, backup_id)
        options = _strategy_options(
            strategy_name,
            staging=staging,
            incremental=parent is not None,
            parents=parents,
            bitmap=config.bitmap,
            mode=mode,
        )
        journal = Journal.start(
            repo.journal_path(vm),
            vm=vm,
            backup_id=backup_id,
            repo=str(repo.root),
            staging=str(staging),
            strategy=strategy_name,
            strategy_options=_options_to_json(options),
            transport=transport_name,
            machine=repr(self.machine),
        )
        plan = _RunPlan(vm, backup_id, staging, strategy_name, transport_name, options, tuple(disks), parent)
        try:
            crash_point("after-start")
            return self._take(repo, journal, plan, started)
        except BaseException as err:
            try:
                undo_run(repo, self.machine, journal)
            except VmsnapError as undo_err:
                raise RecoveryError(
                    f"{_one_line(err)}; undoing the run failed too: {undo_err.message}",
                    hint=f"fix that, then run `vmsnap recover --repo {repo.root}` for {vm}",
                ) from err
            if isinstance(err, OSError):  # e.g. the journal could not be written: QEMU filled the disk
                full = err.errno in (errno.ENOSPC, errno.EDQUOT)
                raise RepositoryError(
                    f"writing into the repository {repo.root} failed: "
                    + ("the filesystem is full " if full else "")
                    + f"({err.strerror or err})",
                    hint="free space there (nothing partial was kept) and run the backup again"
                    if full
                    else "check the repository's filesystem and permissions",
                ) from err
            raise

    def _take(self, repo: Repository, journal: Journal, plan: _RunPlan, started: float) -> BackupResult:
        vm, backup_id, staging, parent = plan.vm, plan.backup_id, plan.staging, plan.parent
        strategy_name, transport_name, options, disks = (
            plan.strategy,
            plan.transport,
            plan.options,
            plan.disks,
        )
        strategy = _make_strategy(strategy_name, self.machine, options)
        for disk in disks:
            if not strategy.probe(disk):
                raise UnsupportedError(
                    f"strategy {strategy_name} cannot snapshot disk {disk.name} ({disk.file}, {disk.format})",
                    hint="`vmsnap strategies` shows what each one needs; choose another with --strategy",
                )
        snapshot_name = f"backup-{backup_id}"
        journal.record("freezing")
        windows: list[float] = []
        with _quiesced(
            self.machine, self.config.quiesce, self.config.freeze_timeout, self._note, windows
        ) as quiesced:
            journal.record("frozen", quiesced=quiesced)
            crash_point("after-freeze")
            journal.record("creating", name=snapshot_name)
            try:
                refs = list(strategy.create(disks, name=snapshot_name))
            except VmsnapError:
                journal.record("create-failed")
                raise
            journal.record("created", snapshots=[snapshot_to_json(r) for r in refs])
            crash_point("after-create")
        journal.record("thawed")
        crash_point("after-thaw")
        by_disk = {r.disk.name: r for r in refs}
        written: dict[str, int] = {}
        transports_used: set[str] = set()
        for index, disk in enumerate(disks):
            ref = by_disk.get(disk.name)
            if ref is None:
                raise SnapshotError(f"strategy {strategy_name} returned no snapshot for disk {disk.name}")
            target = staging / f"{disk.name}.qcow2"
            journal.record("exporting", disk=disk.name)
            with strategy.export(ref) as source:
                journal.record("serving", disk=disk.name, kind=source.kind, location=source.location)
                if transport_name == PUSH:  # QEMU wrote the backup; export waited for its job
                    written[disk.name] = self._adopt_push_target(source.location, target)
                    transports_used.add(PUSH)
                else:
                    transport, used = self._transport_for(transport_name, source)
                    extra: dict[str, Any] = {}
                    if source.dirty_bitmap and ref.details.get("kind") == "incremental":
                        extra["backing"] = Path(ref.details["parent"])  # pull: only the dirty extents
                        # the strategy names the NBD context (model.py), the nbd transport wants the bitmap
                        bitmap = source.dirty_bitmap.removeprefix("qemu:dirty-bitmap:")
                        source = attrs.evolve(source, dirty_bitmap=bitmap)
                    stats = transport.send(
                        source,
                        target,
                        progress=lambda done, total, d=disk.name: self.progress(d, done, total),
                        **extra,
                    )
                    written[disk.name] = int(stats.bytes_written)
                    transports_used.add(used)
                if index == 0:
                    crash_point("mid-export")
            journal.record("exported", disk=disk.name, bytes_written=written[disk.name])
        crash_point("after-export")
        for disk in disks:
            journal.record("deleting", disk=disk.name)
            strategy.delete(by_disk[disk.name])
            journal.record("deleted", disk=disk.name)
        crash_point("after-delete")
        kind: Kind = "full"
        if parent is not None:
            kinds = {r.details.get("kind", "incremental") for r in refs}
            if kinds == {"incremental"}:
                kind = "incremental"
            elif kinds == {"full"}:
                fallback = next((r.details.get("fallback") for r in refs if r.details.get("fallback")), None)
                self._note(f"the strategy took a full backup: {fallback or 'no reason given'}")
            else:  # one manifest kind per backup: a chain must not mix them per disk
                raise SnapshotError(
                    f"strategy {strategy_name} returned full and incremental disks in one backup"
                )
        records = []
        for disk in disks:
            target = staging / f"{disk.name}.qcow2"
            os.chmod(target, 0o600)
            fsync_file(target)
            digest = repo.digest_staged(
                staging, disk.name, disk.virtual_size, parent=parent if kind == "incremental" else None
            )
            records.append(DiskRecord(disk.name, target.name, disk.virtual_size, written[disk.name], digest))
        transport_used = ",".join(sorted(transports_used))
        manifest = Manifest(
            vm=vm,
            backup_id=backup_id,
            kind=kind,
            parent=parent.backup_id if kind == "incremental" and parent is not None else None,
            strategy=strategy_name,
            transport=transport_used,
            created=utc_now_iso(),
            quiesced=bool(journal.data("frozen")[0].get("quiesced")),
            bitmap=self.config.bitmap if strategy_name == "backup" else None,
            disks=tuple(records),
        )
        _save_domain_definition(self.machine, staging)
        journal.record("sealing")
        crash_point("before-manifest")
        final = repo.commit(staging, manifest)
        journal.record("committed", path=str(final))
        if strategy_name == "backup" and kind == "full":
            repo.clear_full_required(vm)
        journal.remove()
        return BackupResult(
            vm=vm,
            backup_id=backup_id,
            kind=kind,
            parent=manifest.parent,
            strategy=strategy_name,
            transport=transport_used,
            quiesced=manifest.quiesced,
            disks=tuple(records),
            seconds=time.monotonic() - started,
            path=final,
            notes=tuple(self.notes),
            freeze_ms=windows[0] if windows else None,
        )

    def _transport_for(self, name: str, source: Any) -> tuple[Any, str]:
        """The transport instance for ``source`` and its name ("auto": copy if it accepts, else nbd)."""
        candidates = ["copy", "nbd"] if name == "auto" else [name]
        for candidate in candidates:
            transport = transport_class(candidate)(runner=self.machine.runner)
            if transport.accepts(source):
                return transport, candidate
        raise UnsupportedError(
            f"transport {name} cannot read a {source.kind} source ({source.location})",
            hint="choose another --transport (copy reads files and devices, nbd reads NBD exports)",
        )

    @staticmethod
    def _adopt_push_target(location: str, target: Path) -> int:
        """Strategy backup (push) wrote the image itself: check it is where the repository expects it."""
        if not target.is_file() or Path(location).resolve() != target.resolve():
            raise SnapshotError(f"strategy backup wrote {location}, not the staged image {target}")
        return target.stat().st_blocks * 512


def _one_line(err: BaseException) -> str:
    if isinstance(err, VmsnapError):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return f"{type(err).__name__}: {err}"


# -- recovery -----------------------------------------------------------------------------------------------


def undo_run(repo: Repository, machine: Machine, journal: Journal) -> list[str]:
    """Undo what the run in ``journal`` did: thaw the guest, delete its snapshots (through the strategy),
    remove its staging directory; then delete the journal. Returns one line per action taken.

    :raise RecoveryError: a step failed; the journal is kept so that it can be tried again
    """
    actions: list[str] = []
    header = journal.header
    vm = str(header["vm"])
    failures: list[str] = []
    if machine.runner.host == "local":
        actions += stop_orphans(_orphan_patterns(journal))
    if journal.has("freezing") and not journal.has("thawed"):
        agent = machine.agent() if machine.is_running else None
        if agent is not None:
            try:
                if agent.fsfreeze_status() == "frozen":
                    agent.fsfreeze_thaw()
                    actions.append("thawed the guest's filesystems")
            except AgentError as err:
                failures.append(f"thawing the guest failed: {err.message}")
    if journal.has("creating") and not journal.has("committed") and not journal.has("create-failed"):
        strategy_name = str(header["strategy"])
        try:
            strategy = _make_strategy(strategy_name, machine, _options_from_json(header["strategy_options"]))
            refs = journal.snapshots()
            if not journal.has("created"):  # died inside create: ask the strategy what exists
                name = str(journal.data("creating")[-1]["name"])
                # internal/external name snapshots as asked; backup names them after its target directory
                refs = [r for r in strategy.list() if r.name in (name, Path(str(header["staging"])).name)]
            deleted = journal.deleted_disks()
            abandon = getattr(strategy, "abandon", None)
            if abandon is not None:  # strategy backup: give the bits back to the dirty bitmap
                abandon([r for r in refs if r.disk.name not in deleted])
            for ref in refs:
                if ref.disk.name in deleted:
                    continue
                strategy.delete(ref)
                actions.append(f"deleted {strategy_name} snapshot {ref.name} of disk {ref.disk.name}")
        except VmsnapError as err:
            failures.append(f"deleting the snapshots failed: {err.message}")
        if strategy_name == "backup":
            repo.require_full(vm, f"backup {header['backup_id']} did not finish")
            actions.append("the next backup will be full (the dirty bitmap moved on without a backup)")
    if machine.is_running and machine.runner.host == "local":
        try:
            actions += _stop_dead_runs_nbd_server(machine, journal)
        except VmsnapError as err:
            failures.append(f"stopping QEMU's NBD server failed: {err.message}")
    staging = Path(str(header["staging"]))
    if staging.exists() and not journal.has("committed"):
        repo.discard(staging)
        actions.append(f"removed staging directory {staging.name}")
    if failures:
        raise RecoveryError(
            f"recovering the dead run of {vm}: {'; '.join(failures)}",
            hint="fix that, then run `vmsnap recover` again (the journal is kept)",
        )
    journal.remove()
    return actions


ORPHAN_PROGRAMS = frozenset({"qemu-nbd", "qemu-img", "nbdcopy", "nbdkit", "rsync", "cp"})
"""Programs a dead run may have left running (servers it forked, copies it started)."""


def _orphan_patterns(journal: Journal) -> list[str]:
    """Strings only the dead run's own processes have on their command lines: its staging directory, its
    snapshot name, the sockets of its exports."""
    patterns = [str(journal.header["staging"])]
    patterns += [f"snapshot.name={d['name']}" for d in journal.data("creating")]
    for data in journal.data("serving"):
        location = str(data.get("location", ""))
        if "socket=" in location:
            patterns.append(location.split("socket=", 1)[1])
    return patterns


def stop_orphans(patterns: Sequence[str], *, timeout: float = 10.0) -> list[str]:
    """Stop this host's processes left by a dead run: a program of :data:`ORPHAN_PROGRAMS` whose command line
    contains one of ``patterns`` (SIGTERM, then SIGKILL). Returns one line per process stopped."""
    stopped: list[str] = []
    for pid, argv in processes.find(ORPHAN_PROGRAMS, patterns):
        processes.terminate(pid, timeout=timeout)
        stopped.append(f"stopped {Path(argv[0]).name} (pid {pid}) left by the dead run")
        command = " ".join(argv)
        for pattern in patterns:  # a private socket directory of a server we stopped
            socket_dir = Path(pattern).parent
            if pattern and pattern in command and socket_dir.name.startswith("vmsnap-nbd") and socket_dir.is_dir():
                shutil.rmtree(socket_dir, ignore_errors=True)
    return stopped


def _stop_dead_runs_nbd_server(machine: Machine, journal: Journal) -> list[str]:
    """Stop QEMU's NBD server when it still listens on a socket the dead run exported through (pull mode).

    QEMU runs one NBD server; something listening on the dead run's own private socket can only be it
    (the run's qemu-nbd processes were stopped before this).
    """
    actions: list[str] = []
    for data in journal.data("serving"):
        location = str(data.get("location", ""))
        if data.get("kind") != "nbd" or "socket=" not in location:
            continue
        path = Path(location.split("socket=", 1)[1])
        if not path.parent.name.startswith("vmsnap-nbd") or not _listening(path):
            continue
        machine.qmp().execute("nbd-server-stop")
        shutil.rmtree(path.parent, ignore_errors=True)
        actions.append(f"stopped QEMU's NBD server on {path}")
    return actions


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


DOMAIN_XML = "domain.xml"
"""Beside a backup of a libvirt domain: its persistent definition, for ``vmsnap restore --define``."""


def _save_domain_definition(machine: Machine, staging: Path) -> None:
    """Keep a libvirt domain's definition with its backup (0600), so a restore can redefine the domain."""
    if type(machine).__name__ != "LibvirtMachine":  # no libvirt import for everybody else
        return
    from vmsnap.vm.libvirt.definition import saved_domain_xml
    from vmsnap.vm.libvirt.machine import LibvirtMachine

    assert isinstance(machine, LibvirtMachine)
    path = staging / DOMAIN_XML
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(saved_domain_xml(machine))
        out.flush()
        os.fsync(out.fileno())


def _libvirt_leftovers(machine: Machine) -> list[str]:
    """For a libvirt domain: abort a backup job and commit external snapshots a dead run left in libvirt."""
    if type(machine).__name__ != "LibvirtMachine":
        return []
    from vmsnap.vm.libvirt.backups import recover as libvirt_recover
    from vmsnap.vm.libvirt.machine import LibvirtMachine

    assert isinstance(machine, LibvirtMachine)
    return libvirt_recover(machine)


def recover_leftovers(repo: Repository, machine: Machine) -> RecoveryReport:
    """Undo what dead runs left for ``machine`` in ``repo`` (caller holds the VM's lock): the journal's run,
    then any staging or half-pruned directory."""
    vm = machine.name
    actions: list[str] = []
    journal = Journal.load(repo.journal_path(vm))
    if journal is not None:
        actions += undo_run(repo, machine, journal)
    for leftover in repo.leftovers(vm):
        repo.discard(leftover)
        actions.append(f"removed leftover {leftover.name}")
    return RecoveryReport(vm, tuple(actions))


def recover(machine: Machine, repo_root: Path | None) -> RecoveryReport:
    """``vmsnap recover``: undo what a dead backup of ``machine`` left (with its repository's journal), and
    thaw the guest if it is frozen.

    :raise RepositoryError: the repository is missing or a backup of the VM is running right now
    :raise RecoveryError: something could not be undone (the journal is kept for another try)
    """
    actions: list[str] = []
    if repo_root is not None:
        repo = Repository.open(repo_root, runner=machine.runner)
        with repo.lock(machine.name):
            actions += recover_leftovers(repo, machine).actions
    actions += _libvirt_leftovers(machine)
    if machine.is_running:
        agent = machine.agent()
        if agent is not None and agent.is_responding() and agent.fsfreeze_status() == "frozen":
            agent.fsfreeze_thaw()
            actions.append("thawed the guest's filesystems")
    return RecoveryReport(machine.name, tuple(actions))
