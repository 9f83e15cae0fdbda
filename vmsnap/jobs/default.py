"""The job's functions on today's orchestrator: :class:`vmsnap.backup.run.Backup` with ``QemuMachine`` /
``LibvirtMachine`` / ``OfflineMachine``, and retention on today's (qcow2-chain) ``Repository``.

This is the only module of :mod:`vmsnap.jobs` that imports the orchestrator, the machines and the repository;
a new orchestrator plugs in by providing its own :data:`~vmsnap.jobs.run.BackupFn`,
:class:`~vmsnap.jobs.run.RetentionFn` and :data:`~vmsnap.jobs.run.PredictFn`.

VMs on other hosts (``host``) are reached through one :class:`~vmsnap.vm.remote.RemoteHost` per host, opened
on first use and shared by that host's VMs: a QMP (and agent) socket is forwarded while its VM is backed up,
and host-side commands (qemu-img) run there over the same connection. Today's strategies write the backup
image with those commands at the repository's path, so a remote VM needs the repository at the same path on
its host (shared storage), until the data path reads the NBD export through the tunnel
(:meth:`~vmsnap.vm.remote.RemoteHost.forward` is ready for that).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from vmsnap.backup import Backup, BackupConfig
from vmsnap.backup.config import Quiesce
from vmsnap.errors import NotFoundError, RepositoryError, UnsupportedError
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import ListDomains, VmSpec, load_job
from vmsnap.jobs.run import BackupInfo, JobReport, Prediction, VmBackup, apply_retention, run_job
from vmsnap.repo.repository import Repository, RepositoryLayout
from vmsnap.repo.retention import RetentionPlan, RetentionPolicy, backup_time
from vmsnap.runner import Runner
from vmsnap.vm.hosts import HostSpec
from vmsnap.vm.machine import Machine, OfflineMachine, QemuMachine
from vmsnap.vm.remote import RemoteHost

ConnectHost = Callable[[HostSpec], RemoteHost]
LOCK_WAIT = 30.0
"""Seconds retention waits for a VM's repository lock (see :meth:`LegacyJobFunctions.retention`)."""


def connect_with_openssh(spec: HostSpec) -> RemoteHost:
    """A :class:`RemoteHost` with OpenSSH's own keys, known_hosts and config (BatchMode, never a prompt)."""
    return RemoteHost(spec.destination, port=spec.port)


def list_libvirt_domains(uri: str | None) -> Sequence[str]:
    """The names of all domains (running or not) at ``uri`` (None: ``qemu:///system``).

    :raise LibvirtError: libvirtd cannot be reached
    :raise UnsupportedError: libvirt-python is missing
    """
    from vmsnap.vm.libvirt.machine import open_connection

    connection = open_connection(uri)
    try:
        return sorted(str(domain.name()) for domain in connection.listAllDomains())
    finally:
        connection.close()


class HostPool:
    """One open :class:`RemoteHost` per host, opened on first use (thread-safe), all closed by :meth:`close`.

    :param connect: makes the (unopened) RemoteHost for a host spec
    """

    def __init__(self, connect: ConnectHost = connect_with_openssh) -> None:
        self._connect = connect
        self._hosts: dict[HostSpec, RemoteHost] = {}
        self._locks: dict[HostSpec, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, spec: HostSpec) -> RemoteHost:
        """The open connection to ``spec``.

        :raise CommandError: ssh could not connect
        """
        with self._lock:
            host_lock = self._locks.setdefault(spec, threading.Lock())
        with host_lock:
            host = self._hosts.get(spec)
            if host is None:
                host = self._connect(spec).open()
                self._hosts[spec] = host
            return host

    def close(self) -> None:
        """Close every connection (by pid) and remove its sockets."""
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()


class LegacyJobFunctions:
    """:data:`BackupFn`, :class:`RetentionFn` and :data:`PredictFn` on today's Backup and Repository.

    Use as a context manager (remote connections are closed at its end)::

        with LegacyJobFunctions() as functions:
            report = run_job(job, specs, backup=functions.backup, retention=functions.retention,
                             predict=functions.predict)

    :param hosts: the SSH connections to other hosts
    """

    def __init__(self, hosts: HostPool | None = None) -> None:
        self.hosts = hosts if hosts is not None else HostPool()
        self._repo_lock = threading.Lock()

    def __enter__(self) -> LegacyJobFunctions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.hosts.close()

    # -- backup --------------------------------------------------------------------------------------

    def _repository_root(self, spec: VmSpec) -> Path:
        if "://" in spec.repository:
            raise UnsupportedError(
                f"repository {spec.repository}: this build writes backups to a directory only",
                hint="use a repository path (object stores come with the chunks layout)",
            )
        if spec.key_file is not None:
            raise UnsupportedError(
                "key_file: this build's repositories are not encrypted",
                hint="remove key_file from the job file (encryption comes with the chunks layout)",
            )
        return Path(spec.repository)

    def backup(self, spec: VmSpec) -> VmBackup:
        """Back up one VM with today's :class:`~vmsnap.backup.run.Backup`.

        :raise VmsnapError: anything that stops the backup (its message names what and what to do)
        """
        root = self._repository_root(spec)
        with self._repo_lock:  # two first backups must not both create the repository
            Repository.open(root, create=True)
        incremental = spec.incremental and spec.kind != "image" and spec.strategy in ("auto", "backup")
        notes: list[str] = []
        if spec.incremental and not incremental:
            why = "a powered-off VM" if spec.kind == "image" else f"strategy {spec.strategy}"
            notes.append(f"full backup: incrementals need a running VM and strategy backup ({why})")
        config = BackupConfig(
            repo=root,
            strategy=spec.strategy,
            transport=spec.transport,
            incremental=incremental,
            quiesce=cast(Quiesce, spec.quiesce),
            disks=spec.disks,
        )
        with self.machine(spec) as machine:
            result = Backup(machine, config).run()
        return VmBackup(
            backup_id=result.backup_id,
            kind=result.kind,
            bytes_written=sum(d.bytes_written for d in result.disks),
            seconds=result.seconds,
            freeze_ms=result.freeze_ms,
            notes=(*notes, *result.notes),
        )

    @contextlib.contextmanager
    def machine(self, spec: VmSpec) -> Iterator[Machine]:
        """The machine of ``spec`` for the body (remote sockets forwarded meanwhile), closed afterwards.

        :raise VmsnapError: it cannot be reached
        """
        remote = self.hosts.get(spec.host) if spec.host is not None else None
        runner: Runner | None = remote.runner if remote is not None else None
        with contextlib.ExitStack() as stack:
            machine: Any
            if spec.kind == "qemu":
                assert spec.qmp is not None
                qmp, agent = spec.qmp, spec.agent
                if remote is not None:
                    qmp = stack.enter_context(remote.forwarded(spec.qmp))
                    agent = stack.enter_context(remote.forwarded(spec.agent)) if spec.agent else None
                machine = QemuMachine(qmp, agent, name=spec.name, runner=runner)
            elif spec.kind == "image":
                machine = OfflineMachine(list(spec.images), name=spec.name, runner=runner)
            else:
                from vmsnap.vm.libvirt.machine import LibvirtMachine

                assert spec.domain is not None
                machine = LibvirtMachine(spec.domain, uri=spec.connect, runner=runner)
            stack.callback(machine.close)
            yield cast(Machine, machine)

    # -- retention -----------------------------------------------------------------------------------

    def retention(self, spec: VmSpec, policy: RetentionPolicy, *, dry_run: bool) -> RetentionPlan:
        """Apply ``policy`` to the VM's backups under its repository lock (a dry run plans only, with the
        backup this run would take counted in).

        :raise RepositoryError: the repository cannot be read, or another run holds the VM's lock
        """
        root = self._repository_root(spec)
        try:
            repo = Repository.open(root)
        except RepositoryError:
            if not dry_run:
                raise
            repo = None  # a dry run before the first backup: nothing to prune yet
        if dry_run:
            backups = _infos(repo, spec.name) if repo is not None else []
            chains = repo.chains if repo is not None else True
            return apply_retention(backups, policy, None, upcoming=dt.datetime.now(dt.UTC), chains=chains)
        assert repo is not None
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            acquired = False
            try:
                with repo.lock(spec.name):
                    acquired = True
                    return apply_retention(
                        _infos(repo, spec.name),
                        policy,
                        lambda backup_id: _remove(repo, spec.name, backup_id),
                        chains=repo.chains,
                    )
            except RepositoryError:
                # the VM's lock is an flock on an fd that a child forked by another worker thread holds until
                # it execs: right after this VM's own backup released it, wait a moment instead of failing
                if acquired or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- dry run -------------------------------------------------------------------------------------

    def predict(self, spec: VmSpec) -> Prediction:
        """Full or incremental, from the repository alone; checks that a local VM's sockets and images exist.

        :raise NotFoundError: a local QMP socket or image is missing
        """
        root = self._repository_root(spec)
        if spec.host is None:
            for path in (spec.qmp, spec.agent, *spec.images):
                if path is not None and not os.path.exists(path):
                    raise NotFoundError(
                        f"{path} does not exist", hint="is the VM running, is the path right?"
                    )
        incremental = spec.incremental and spec.kind != "image" and spec.strategy in ("auto", "backup")
        if not incremental:
            return Prediction("full", "incremental is off for this VM" if spec.incremental else "")
        try:
            repo = Repository.open(root)
        except RepositoryError:
            return Prediction("full", "no repository yet")
        latest = repo.latest(spec.name)
        if latest is None:
            return Prediction("full", "no earlier backup")
        forced = repo.full_required(spec.name)
        if forced is not None:
            return Prediction("full", forced)
        return Prediction("incremental", f"after {latest.backup_id} (full if QEMU lost its dirty bitmap)")


def run_job_file(
    path: Path,
    *,
    dry_run: bool = False,
    list_domains: ListDomains = list_libvirt_domains,
    connect_host: ConnectHost = connect_with_openssh,
    lock_dir: Path | None = None,
) -> JobReport:
    """``vmsnap run JOBFILE [--dry-run]``: load, expand and run a job file on today's orchestrator.

    :raise UsageError: the job file is wrong (one line naming the key and its line): exit status 2
    :raise VmsnapError: another run of the job holds its lock
    """
    job = load_job(path)
    specs, failures = expand_vms(job, list_domains)
    with LegacyJobFunctions(HostPool(connect_host)) as functions:
        return run_job(
            job,
            specs,
            backup=functions.backup,
            retention=functions.retention,
            predict=functions.predict,
            entry_failures=failures,
            dry_run=dry_run,
            lock_dir=lock_dir,
        )


def _infos(repo: RepositoryLayout, vm: str) -> list[BackupInfo]:
    return [BackupInfo(m.backup_id, backup_time(m.backup_id), m.parent) for m in repo.backups(vm)]


def _remove(repo: RepositoryLayout, vm: str, backup_id: str) -> None:
    """Remove one backup as the repository's prune does (never listed half removed)."""
    repo.delete_backup(vm, backup_id)
