"""Undoing what a backup run left when it failed or died: the run's journal says which steps it had taken;
the strategy's snapshots are deleted (through the strategy, rebuilt from the journal), processes the run
started stopped, its staging removed, and what the machine's manager (libvirt) keeps cleaned by the machine
itself; a VM the run left paused (it died with the vCPUs stopped to snapshot) is resumed first. ``vmsnap
recover`` also thaws the guest, once: it stands down the thaw guard of a dead run (which would thaw it too)
and then thaws with one checked thaw — whatever state the repository is in, a missing one included."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmsnap import processes
from vmsnap.backup.config import RecoveryError, RecoveryReport
from vmsnap.errors import AgentError, FreezeError, NotFoundError, VmsnapError
from vmsnap.repo.journal import JOURNAL_FORMAT, Journal
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.repository import Repository
from vmsnap.strategies import strategy_class
from vmsnap.strategies.base import BackupContext, Checkpoint
from vmsnap.vm.agent import GuestAgent
from vmsnap.vm.guards import stand_down_leftovers
from vmsnap.vm.machine import Machine


def journal_context(header: Mapping[str, Any]) -> BackupContext:
    """The :class:`BackupContext` a run journalled (journals of vmsnap 0.1 kept strategy options instead)."""
    if "context" in header:
        return BackupContext.from_json(header["context"])
    options = header.get("strategy_options") or {}
    workdir = Path(str((options.get("target_dir") or {}).get("path") or header["staging"]))
    parents = (options.get("parents") or {}).get("paths") or {}
    since = Checkpoint("", {k: Path(v) for k, v in parents.items()}) if options.get("incremental") else None
    push = options.get("mode", "push") == "push" and bool(options)
    return BackupContext(workdir, str(options.get("bitmap", "vmsnap")), since, push)


def undo_run(repo: RepositoryLayout, machine: Machine, journal: Journal) -> list[str]:
    """Undo what the run in ``journal`` did: delete its snapshots (through the strategy), remove its
    unfinished backup from the repository; then delete the journal. Returns one line per action taken.

    The guest is not thawed here: a run that fails thaws in :func:`~vmsnap.vm.freeze.frozen` (or hands the
    thaw to its guard), a run that died is thawed by its guard, and :func:`recover` by :func:`thaw_guest`.

    :raise RecoveryError: a step failed; the journal is kept so that it can be tried again
    """
    actions: list[str] = []
    header = journal.header
    vm = str(header["vm"])
    failures: list[str] = []
    try:
        actions += resume_paused(machine, journal)
    except VmsnapError as err:
        failures.append(f"resuming the VM failed: {err.message}")
    if machine.runner.host == "local":
        actions += stop_orphans(_orphan_patterns(journal))
    backup_id = str(header["backup_id"])
    sealed = unknown = False
    if journal.has("sealing") and not journal.has("committed"):
        # died between its manifest put and journalling it: the backup is complete (its snapshots are gone
        # and the dirty bitmap moved on with it), so it is kept, not discarded
        try:
            sealed = _sealed(repo, vm, backup_id)
        except VmsnapError as err:
            unknown = True
            failures.append(f"reading the manifest of backup {backup_id} failed: {err.message}")
    if sealed:
        actions.append(f"kept backup {backup_id}: it was sealed before the run died")
    elif journal.has("creating") and not journal.has("committed") and not journal.has("create-failed"):
        strategy_name = str(header["strategy"])
        tracks_changes = False
        try:
            cls = strategy_class(strategy_name)
            tracks_changes = cls.capabilities.tracks_changes
            strategy = cls.for_backup(machine, journal_context(header))
            refs = journal.snapshots()
            if not journal.has("created"):  # died inside create: ask the strategy what it left
                refs = list(strategy.find(str(journal.data("creating")[-1]["name"])))
            deleted = journal.deleted_disks()
            # a disk whose deletion began but is not journalled as done: the snapshot may be gone already
            interrupted = {str(d["disk"]) for d in journal.data("deleting")} - deleted
            strategy.abandon([r for r in refs if r.disk.name not in deleted])  # give changes back
            for ref in refs:
                if ref.disk.name in deleted:
                    continue
                _journal_quietly(journal, "deleting", disk=ref.disk.name)
                try:
                    strategy.delete(ref)
                    actions.append(f"deleted {strategy_name} snapshot {ref.name} of disk {ref.disk.name}")
                except NotFoundError:
                    if ref.disk.name not in interrupted:
                        raise
                    actions.append(
                        f"{strategy_name} snapshot {ref.name} of disk {ref.disk.name} was deleted already "
                        "(the run died deleting it)"
                    )
                # an undo that fails later (the repository unreachable) is tried again: not this part
                _journal_quietly(journal, "deleted", disk=ref.disk.name)
        except VmsnapError as err:
            failures.append(f"deleting the snapshots failed: {err.message}")
        if tracks_changes:
            repo.require_full(vm, f"backup {backup_id} did not finish")
            actions.append("the next backup will be full (the dirty bitmap moved on without a backup)")
    if not journal.has("committed") and not sealed and not unknown:
        try:
            if repo.discard_backup(vm, backup_id):
                actions.append(f"removed the unfinished backup {backup_id}")
        except VmsnapError as err:
            failures.append(f"removing the unfinished backup failed: {err.message}")
    if failures:
        raise RecoveryError(
            f"recovering the dead run of {vm}: {'; '.join(failures)}",
            hint="fix that, then run `vmsnap recover` again (the journal is kept)",
        )
    journal.remove()
    return actions


def resume_paused(machine: Machine, journal: Journal | None) -> list[str]:
    """``cont`` a VM the run in ``journal`` left paused: it died between "freezing" and "thawed" (where the
    vCPUs are paused to snapshot: the machine's state capture, a strategy's own pause), the VM ran before
    that run ("freezing" recorded its run state), and QMP says "paused" now. A guest whose vCPUs are stopped
    runs no agent, so this comes before any thaw. Returns one line when it resumed.

    :raise VmsnapError: QMP could not be asked or refused ``cont``
    """
    if journal is None or not journal.has("freezing") or journal.has("thawed"):
        return []
    if journal.data("freezing")[-1].get("vm_status") != "running" or not machine.is_running:
        return []  # paused (or saved, or migrating) before the run: not ours to resume
    qmp = machine.qmp()
    if qmp.status() != "paused":
        return []
    qmp.cont()
    return ["resumed the VM's vCPUs (the dead run had paused them to snapshot)"]


def _journal_quietly(journal: Journal, step: str, **data: Any) -> None:
    """Record an undo step; a journal that cannot be written (its disk full) costs only a repeat later, and
    one of format 1 (one JSON document, written by an older vmsnap) is left as it is (a line appended would
    damage it)."""
    if journal.header.get("format") != JOURNAL_FORMAT:
        return
    with contextlib.suppress(OSError):
        journal.record(step, **data)


def _sealed(repo: RepositoryLayout, vm: str, backup_id: str) -> bool:
    """Whether ``backup_id`` has its manifest (a dead run's seal landed although its journal does not say so).

    :raise RepositoryError: its manifest is there but damaged
    """
    try:
        repo.get(vm, backup_id)
    except NotFoundError:
        return False
    return True


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
            if (
                pattern
                and pattern in command
                and socket_dir.name.startswith("vmsnap-nbd")
                and socket_dir.is_dir()
            ):
                shutil.rmtree(socket_dir, ignore_errors=True)
    return stopped


def recover_leftovers(repo: RepositoryLayout, machine: Machine) -> RecoveryReport:
    """Undo what dead runs left for ``machine`` in ``repo`` (caller holds the VM's lock): the journal's run,
    then whatever else the repository holds of dead runs (staging directories, partial backups, dead
    leases)."""
    vm = machine.name
    actions: list[str] = []
    journal = Journal.load(repo.journal_path(vm))
    if journal is not None:
        actions += undo_run(repo, machine, journal)
    actions += repo.recover_leftovers(vm)
    return RecoveryReport(vm, tuple(actions))


def thaw_guest(machine: Machine) -> tuple[list[str], list[str]]:
    """Leave the guest thawed, with one checked thaw: stand down the thaw guard of a dead run first (it would
    thaw too), then thaw if the agent says "frozen" — holding the guest's guard lock (the guard program's
    ``thaw``), so that a run into another repository (not kept out by this repository's lock) cannot start
    a guard and freeze between the look and the thaw. A freeze held by a vmsnap run that still runs (its
    guard and its process live) is left alone.

    :return: (one line per action, one line per thing found that needed nothing)
    :raise RecoveryError: the guest stays frozen
    """
    if not machine.is_running:
        return [], []
    agent = machine.agent()
    if agent is None:
        return [], ["the machine has no guest agent channel: nothing can have frozen it"]
    plan = machine.guard_plan()  # (another host without python3 gives a plan for a guard here)
    if plan is None:
        return _thaw_here(machine, agent)
    actions, holder = stand_down_leftovers(plan)
    if holder is not None and holder.pid == 0:
        return actions, ["a vmsnap run is starting a freeze of the guest right now: left alone"]
    if holder is not None:
        where = "" if holder.where == "local" else f" on {holder.where}"
        return actions, [
            f"a vmsnap run (pid {holder.parent_pid} on {holder.parent_host or 'another host'}) holds a "
            f"freeze of the guest right now, watched by its thaw guard (pid {holder.pid}{where}): "
            "left alone"
        ]
    answer = plan.site.thaw(plan.target)
    if "busy" in answer:
        return actions, ["a vmsnap run started a freeze of the guest just now: left alone"]
    if "gone" in answer:
        return actions, ["the guest agent's socket is gone (the VM stopped): nothing is frozen"]
    if "unreachable" in answer:
        return actions, ["the guest agent does not answer: whether the guest is frozen cannot be told"]
    if "status" in answer:
        return actions, [f"the guest's filesystems are {answer['status']}"]
    if "thawed" not in answer:
        raise RecoveryError(
            f"the guest of {machine.name} may be frozen and cannot be thawed: {answer.get('frozen', answer)}",
            hint="check that qemu-ga runs in the guest, then run `vmsnap recover` again",
        )
    hook_error = answer.get("hook_error")
    line = f"thawed the guest's filesystems ({answer['thawed']})"
    return [*actions, line + (f"; a thaw hook failed: {hook_error}" if hook_error else "")], []


def _thaw_here(machine: Machine, agent: GuestAgent) -> tuple[list[str], list[str]]:
    """Thaw through vmsnap's own agent connection (a machine with no guard, so no guard lock either)."""
    if not agent.is_responding():
        return [], ["the guest agent does not answer: whether the guest is frozen cannot be told"]
    try:
        status = agent.fsfreeze_status()
        if status != "frozen":
            return [], [f"the guest's filesystems are {status}"]
        thawed, hook_error = agent.thaw_and_check()
    except (AgentError, FreezeError) as err:
        raise RecoveryError(
            f"the guest of {machine.name} may be frozen and cannot be thawed: {err.message}",
            hint="check that qemu-ga runs in the guest, then run `vmsnap recover` again",
        ) from err
    line = f"thawed the guest's filesystems ({thawed})"
    return [line + (f"; a thaw hook failed: {hook_error}" if hook_error else "")], []


def recover(
    machine: Machine, repo_root: Path | str | None, *, key_file: Path | None = None
) -> RecoveryReport:
    """``vmsnap recover``: thaw the guest if a dead run left it frozen (:func:`thaw_guest`), undo what a dead
    backup of ``machine`` left (with its repository's journal) and what the machine's manager keeps. The
    VM's writer lock (chunks: its lease, taken over from the dead run) is released at the end, so nothing
    of the dead run stays. A repository that does not exist (a first backup died before making it) has
    nothing to undo: that is said, and the machine is cleaned all the same.

    :raise RepositoryError: the location holds something that is not a repository, or a backup of the VM is
        running right now (then nothing is touched)
    :raise RecoveryError: something could not be undone (the journal is kept for another try)
    """
    actions: list[str] = []
    found: list[str] = []
    if repo_root is not None:
        actions += Repository.clear_unmade(repo_root)
        absent = Repository.missing(repo_root)
        if absent is None:
            repo = Repository.open(repo_root, runner=machine.runner, key_file=key_file)
            with repo.lock(machine.name):
                actions += resume_paused(machine, Journal.load(repo.journal_path(machine.name)))
                thawed, seen = thaw_guest(machine)
                actions += [*thawed, *recover_leftovers(repo, machine).actions, *machine.recover()]
                return RecoveryReport(machine.name, tuple(actions), tuple(seen))
        found.append(absent)
    thawed, seen = thaw_guest(machine)
    actions += thawed + machine.recover()
    return RecoveryReport(machine.name, tuple(actions), tuple(found + seen))
