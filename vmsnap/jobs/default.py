"""The job's functions on the backup orchestrator and the repository: :class:`~vmsnap.backup.run.Backup`
of the machine :func:`~vmsnap.vm.select.open_machine` opens, retention through the repository's
``prune`` (borg's rules), gc through its ``gc`` — whatever the repository is: ``chunks`` or ``qcow2``, a
directory or ``s3://``, encrypted (``key_file``) or not.

This is the only module of :mod:`vmsnap.jobs` that imports the orchestrator, the machines and the repository;
another orchestrator plugs in by providing its own :data:`~vmsnap.jobs.run.BackupFn`,
:class:`~vmsnap.jobs.run.RetentionFn`, :data:`~vmsnap.jobs.run.PredictFn` and :data:`~vmsnap.jobs.run.GcFn`.

VMs on other hosts (``host``) are reached through one :class:`~vmsnap.vm.remote.RemoteHost` per host
(:class:`~vmsnap.vm.hosts.HostPool`), opened on first use and shared by that host's VMs: the VM's QMP and
agent sockets are forwarded while it is backed up, its commands run there, and a chunks repository reads
its export through the same tunnel (:mod:`vmsnap.vm.remote_machine`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

from vmsnap.backup import Backup, BackupConfig
from vmsnap.backup.config import Quiesce
from vmsnap.errors import NotFoundError, RepositoryError
from vmsnap.jobs.boot_policy import BootPolicy
from vmsnap.jobs.expand import expand_vms
from vmsnap.jobs.jobfile import JobConfig, ListDomains, VmSpec, load_job
from vmsnap.jobs.report import BootOutcome
from vmsnap.jobs.run import (
    BackupInfo,
    JobReport,
    Prediction,
    VmBackup,
    apply_retention,
    as_prune_result,
    run_job,
)
from vmsnap.repo.reports import GcReport, PruneResult
from vmsnap.repo.repository import Repository, RepositoryLayout
from vmsnap.repo.retention import RetentionPolicy, backup_time
from vmsnap.restore.commands import DEFAULT_RUN_ROOT
from vmsnap.strategies import strategy_class
from vmsnap.verify_boot.result import PREFIX, boot_names
from vmsnap.verify_boot.run import BootConfig, verify_boot
from vmsnap.vm.hosts import ConnectHost, HostPool, connect_with_openssh
from vmsnap.vm.libvirt.domain import is_local_uri
from vmsnap.vm.machine import Machine
from vmsnap.vm.select import MachineSpec, open_machine

GC_WAIT = 600.0
"""Seconds the job's gc waits for backups, prunes and restores that other runs (other jobs, other backup
servers on the same repository) hold leases for, before it gives up."""


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


def machine_spec(spec: VmSpec) -> MachineSpec:
    """The VM selector of one job entry's VM."""
    return MachineSpec(
        qmp=spec.qmp,
        agent=spec.agent,
        name=spec.name,
        domain=spec.domain,
        connect=spec.connect,
        images=spec.images,
        host=spec.host,
    )


def takes_incrementals(spec: VmSpec) -> bool:
    """Whether the job asks for incrementals of this VM and its strategy can take them ("auto" can: it is
    the registered strategy that takes incrementals of the machine in its state).

    :raise UsageError: an unknown strategy (with the names that exist)
    """
    if not spec.incremental:
        return False
    return spec.strategy == "auto" or strategy_class(spec.strategy).capabilities.incremental


class JobFunctions:
    """:data:`BackupFn`, :class:`RetentionFn`, :data:`PredictFn`, :data:`GcFn` and :class:`BootFn` of one job.

    Use as a context manager (remote connections are closed at its end)::

        with JobFunctions(job) as functions:
            report = run_job(job, specs, backup=functions.backup, retention=functions.retention,
                             predict=functions.predict, gc=functions.gc)

    :param job: the job (its repository and key file)
    :param hosts: the SSH connections to other hosts
    """

    def __init__(self, job: JobConfig, hosts: HostPool | None = None) -> None:
        self.job = job
        self.hosts = hosts if hosts is not None else HostPool()
        self._created = False
        self._create_lock = threading.Lock()

    def __enter__(self) -> JobFunctions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.hosts.close()

    def repository(self, *, create: bool = False) -> RepositoryLayout:
        """The job's repository, opened (with ``create``: made when it is a new or empty directory).

        :raise RepositoryError: there is none (without ``create``), or it cannot be read
        :raise KeyFileError: an encrypted repository and a key file that is not its key
        :raise StoreError: the store cannot be reached
        """
        return Repository.open(self.job.repository, create=create, key_file=self.job.key_file)

    def _ensure_repository(self) -> None:
        # the first backups of a job run at once: only one of them may make the repository
        with self._create_lock:
            if not self._created:
                self.repository(create=True)
                self._created = True

    # -- backup --------------------------------------------------------------------------------------

    def backup(self, spec: VmSpec) -> VmBackup:
        """Back up one VM with :class:`~vmsnap.backup.run.Backup`.

        :raise VmsnapError: anything that stops the backup (its message names what and what to do)
        """
        self._ensure_repository()
        incremental = takes_incrementals(spec)
        notes: list[str] = []
        if spec.incremental and not incremental:
            notes.append(f"full backup: strategy {spec.strategy} takes no incrementals")
        config = BackupConfig(
            repo=spec.repository,
            strategy=spec.strategy,
            transport=spec.transport,
            incremental=incremental,
            quiesce=cast(Quiesce, spec.quiesce),
            disks=spec.disks,
            key_file=spec.key_file,
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
        with contextlib.closing(open_machine(machine_spec(spec), hosts=self.hosts)) as machine:
            yield machine

    # -- retention and gc ----------------------------------------------------------------------------

    def retention(self, spec: VmSpec, policy: RetentionPolicy, *, dry_run: bool) -> PruneResult:
        """Prune the VM's backups by ``policy`` with the repository's ``prune`` (a dry run plans only, with
        the backup this run would take counted in).

        :raise RepositoryError: the repository cannot be read, or another run holds the VM's lock
        """
        if not dry_run:
            return self.repository().prune(spec.name, policy)
        try:
            repo = self.repository()
        except RepositoryError:
            repo = None  # a dry run before the first backup: nothing to prune yet
        backups = _infos(repo, spec.name) if repo is not None else []
        chains = repo.chains if repo is not None else False
        retention = apply_retention(backups, policy, None, upcoming=dt.datetime.now(dt.UTC), chains=chains)
        return as_prune_result(spec.name, retention)

    def gc(self) -> GcReport:
        """The repository's gc, once after every VM (waiting up to :data:`GC_WAIT` for other runs).

        :raise LeaseError: other runs kept their leases longer than that
        """
        return self.repository().gc(wait=GC_WAIT)

    # -- boot verification ---------------------------------------------------------------------------

    def boot(self, spec: VmSpec, policy: BootPolicy) -> BootOutcome:
        """Boot-verify the VM's newest backup (``vmsnap verify --boot``), unless its last verification is
        more recent than ``policy.every``, or the VM cannot be booted from here (backed up from images, on
        another host, or under a libvirt URI of another host).

        :raise VmsnapError: the verification could not run (the copy did not start, …)
        """
        if spec.kind == "image":
            return BootOutcome("skipped", "backed up from images: no definition to boot it from")
        if spec.host is not None:
            return BootOutcome("skipped", f"it runs on {spec.host}: boot verifications run on its own host")
        if not is_local_uri(spec.connect):
            return BootOutcome(
                "skipped",
                f"its libvirt URI {spec.connect} is another host's: the copy would be defined there on this "
                "host's overlays (boot verifications run on its own host)",
            )
        repo = self.repository()
        latest = repo.latest(spec.name)
        if latest is None:
            return BootOutcome("skipped", "no backup to boot")
        if policy.every is not None:
            last = last_verified(repo, spec.name)
            if last is not None and time.time() - last < policy.every:
                when = dt.datetime.fromtimestamp(last, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
                return BootOutcome("skipped", f"last verified {when}, within verify_boot_every")
        config = BootConfig(
            repo=self.job.repository,
            vm=spec.name,
            backup_id=latest.backup_id,
            key_file=self.job.key_file,
            checks=policy.checks,
            ports=policy.ports,
            timeout=policy.timeout,
            connect=spec.connect,
            run_root=Path(os.environ.get("VMSNAP_RUN_DIR") or DEFAULT_RUN_ROOT),
        )
        result = verify_boot(config)
        return BootOutcome(
            result.verdict,
            result.reason,
            result.backup_id,
            result.seconds_to_agent,
            result.seconds,
            finished=time.time(),
        )

    # -- dry run -------------------------------------------------------------------------------------

    def predict(self, spec: VmSpec) -> Prediction:
        """Full or incremental, from the repository alone; checks that a local VM's sockets and images exist.

        :raise NotFoundError: a local QMP socket or image is missing
        :raise UsageError: an unknown strategy
        """
        if spec.host is None:
            for path in (spec.qmp, spec.agent, *spec.images):
                if path is not None and not os.path.exists(path):
                    raise NotFoundError(
                        f"{path} does not exist", hint="is the VM running, is the path right?"
                    )
        if not takes_incrementals(spec):
            return Prediction("full", "incremental is off for this VM" if spec.incremental else "")
        try:
            repo = self.repository()
        except RepositoryError:
            return Prediction("full", "no repository yet")
        latest = repo.latest(spec.name)
        if latest is None:
            return Prediction("full", "no earlier backup")
        forced = repo.full_required(spec.name)
        if forced is not None:
            return Prediction("full", forced)
        return Prediction("incremental", f"after {latest.backup_id} (full if the dirty bitmap was lost)")


def run_job_file(
    path: Path,
    *,
    dry_run: bool = False,
    list_domains: ListDomains = list_libvirt_domains,
    connect_host: ConnectHost | None = None,
    lock_dir: Path | None = None,
) -> JobReport:
    """``vmsnap run JOBFILE [--dry-run]``: load, expand and run a job file.

    :param connect_host: makes the connection to another host (default: OpenSSH with the job's
        ``ssh_config``, else ``$VMSNAP_SSH_CONFIG``, else OpenSSH's own configuration)
    :raise UsageError: the job file is wrong (one line naming the key and its line): exit status 2
    :raise VmsnapError: another run of the job holds its lock
    """
    job = load_job(path)
    specs, failures = expand_vms(job, list_domains)
    connect = connect_host or functools.partial(connect_with_openssh, config=job.ssh_config)
    with JobFunctions(job, HostPool(connect)) as functions:
        return run_job(
            job,
            specs,
            backup=functions.backup,
            retention=functions.retention,
            predict=functions.predict,
            gc=functions.gc,
            boot=functions.boot,
            entry_failures=failures,
            dry_run=dry_run,
            lock_dir=lock_dir,
        )


def _infos(repo: RepositoryLayout, vm: str) -> list[BackupInfo]:
    return [BackupInfo(m.backup_id, backup_time(m.backup_id), m.parent) for m in repo.backups(vm)]


def last_verified(repo: RepositoryLayout, vm: str) -> float | None:
    """Unix time of the newest boot verification of any backup of ``vm``, or None."""
    stamps = [
        names[-1][len(PREFIX) : -len(".json")]
        for m in repo.backups(vm)
        if (names := boot_names(repo.attachments(m)))
    ]
    if not stamps:
        return None
    return dt.datetime.strptime(max(stamps), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


if not typing.TYPE_CHECKING:
    from vmsnap.moved import old_names

    __getattr__ = old_names(__name__)  # names an older vmsnap had here: vmsnap.moved, docs/api.md
