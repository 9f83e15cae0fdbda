"""Undoing what a backup run left when it failed or died: the run's journal says which steps it had taken;
the guest is thawed, the strategy's snapshots deleted (through the strategy, rebuilt from the journal),
processes the run started stopped, its staging removed, and what the machine's manager (libvirt) keeps
cleaned by the machine itself. ``vmsnap recover`` also cleans this host's leftovers of dead mounts and of
instant restores that no longer need their servers (:mod:`vmsnap.restore.commands`)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmsnap import processes
from vmsnap.backup.config import RecoveryError, RecoveryReport
from vmsnap.errors import AgentError, UsageError, VmsnapError
from vmsnap.repo.journal import Journal
from vmsnap.repo.repository import Repository
from vmsnap.restore.commands import DEFAULT_RUN_ROOT, recover_restores
from vmsnap.strategies import strategy_class
from vmsnap.strategies.base import BackupContext, Checkpoint
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
        tracks_changes = False
        try:
            cls = strategy_class(strategy_name)
            tracks_changes = cls.capabilities.tracks_changes
            strategy = cls.for_backup(machine, journal_context(header))
            refs = journal.snapshots()
            if not journal.has("created"):  # died inside create: ask the strategy what exists
                name = str(journal.data("creating")[-1]["name"])
                # internal/external name snapshots as asked; backup names them after its target directory
                refs = [r for r in strategy.list() if r.name in (name, Path(str(header["staging"])).name)]
            deleted = journal.deleted_disks()
            strategy.abandon([r for r in refs if r.disk.name not in deleted])  # give changes back
            for ref in refs:
                if ref.disk.name in deleted:
                    continue
                strategy.delete(ref)
                actions.append(f"deleted {strategy_name} snapshot {ref.name} of disk {ref.disk.name}")
        except VmsnapError as err:
            failures.append(f"deleting the snapshots failed: {err.message}")
        if tracks_changes:
            repo.require_full(vm, f"backup {header['backup_id']} did not finish")
            actions.append("the next backup will be full (the dirty bitmap moved on without a backup)")
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
            if (
                pattern
                and pattern in command
                and socket_dir.name.startswith("vmsnap-nbd")
                and socket_dir.is_dir()
            ):
                shutil.rmtree(socket_dir, ignore_errors=True)
    return stopped


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


def recover(
    machine: Machine | None, repo_root: Path | None, *, run_root: Path = DEFAULT_RUN_ROOT
) -> RecoveryReport:
    """``vmsnap recover``: undo what a dead backup of ``machine`` left (with its repository's journal), and
    thaw the guest if it is frozen; then, with or without a machine, clean what dead mounts and finished
    instant restores left on this host (:func:`vmsnap.restore.commands.recover_restores`).

    :param machine: the VM whose dead backup to undo; None: only this host's restore leftovers
    :param run_root: where mounts and instant restores keep their state (``$VMSNAP_RUN_DIR``)
    :raise UsageError: ``repo_root`` without a machine
    :raise RepositoryError: the repository is missing or a backup of the VM is running right now
    :raise RecoveryError: something could not be undone (the journal is kept for another try)
    """
    actions: list[str] = []
    if machine is None and repo_root is not None:
        raise UsageError(
            "--repo needs the VM whose dead backup to undo",
            hint="name it (--qmp, --domain, --image or --name)",
        )
    if machine is not None:
        if repo_root is not None:
            repo = Repository.open(repo_root, runner=machine.runner)
            with repo.lock(machine.name):
                actions += recover_leftovers(repo, machine).actions
        actions += machine.recover()
        if machine.is_running:
            agent = machine.agent()
            if agent is not None and agent.is_responding() and agent.fsfreeze_status() == "frozen":
                agent.fsfreeze_thaw()
                actions.append("thawed the guest's filesystems")
    actions += recover_restores(run_root)  # this host's: mounts and servers are always local
    return RecoveryReport(machine.name if machine is not None else "", tuple(actions))
