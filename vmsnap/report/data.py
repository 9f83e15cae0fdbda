"""What ``vmsnap report`` shows, read from a repository (and a job's metrics file): per VM its backups with
what each cost and its latest boot verification, and the repository's growth.

Figures per backup, from its manifest (the ``chunks`` layout records them; the ``qcow2`` layout records only
the bytes written, so its dedup and compression columns stay empty):

- **logical**: the bytes of its disks that are not holes (what a full copy would read);
- **stored**: the bytes this backup added to the repository (compressed, encrypted chunks it stored first);
- **dedup**: the share of its data chunks the repository had already (reused) among those it named;
- **compression**: stored bytes per byte of the chunks it stored first, those counted at the chunk size
  (4 MiB; a disk's last chunk may be shorter, so this slightly understates the ratio).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import attrs

from vmsnap.image.geometry import CHUNK_SIZE
from vmsnap.jobs.metrics import Series, read_series
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import Manifest
from vmsnap.repo.retention import backup_time
from vmsnap.repo.verify_records import VerifyRecord, latest_verification
from vmsnap.verify_boot.result import BootResult, latest_boot


@attrs.frozen
class BackupRow:
    """One backup as the report shows it.

    :param new_chunk_bytes: the chunks stored first, counted at the chunk size (None: not recorded)
    :param screenshot: the PNG of its latest boot verification, when it had one
    :param verified: its latest ``vmsnap verify`` record, when one was kept
    """

    vm: str
    backup_id: str
    time: dt.datetime
    kind: str
    virtual_size: int
    logical: int | None
    stored: int
    reused_chunks: int | None
    new_chunks: int | None
    boot: BootResult | None = None
    screenshot: bytes | None = None
    verified: VerifyRecord | None = None

    @property
    def dedup(self) -> float | None:
        """The share of its data chunks that were stored already (0..1), None when not recorded."""
        if self.reused_chunks is None or self.new_chunks is None:
            return None
        named = self.reused_chunks + self.new_chunks
        return self.reused_chunks / named if named else None

    @property
    def compression(self) -> float | None:
        """Stored bytes per byte of the chunks it stored first (below 1: compression helped)."""
        if not self.new_chunks:
            return None
        return self.stored / (self.new_chunks * CHUNK_SIZE)


@attrs.frozen
class VmReport:
    """A VM's backups, oldest first."""

    vm: str
    backups: tuple[BackupRow, ...]


@attrs.frozen
class ReportData:
    """Everything the page shows.

    :param metrics: the job metrics file's series (empty without ``--metrics``)
    """

    location: str
    layout: str
    generated: dt.datetime
    vms: tuple[VmReport, ...]
    metrics: Series = attrs.field(factory=dict)

    def growth(self) -> list[tuple[dt.datetime, int]]:
        """(time, bytes stored by every backup up to it) over all VMs, in time order (backups pruned since
        are not counted: this is the growth of what the repository still holds)."""
        rows = sorted((b.time, b.stored) for vm in self.vms for b in vm.backups)
        total = 0
        out = []
        for when, stored in rows:
            total += stored
            out.append((when, total))
        return out


def _row(repo: RepositoryLayout, manifest: Manifest) -> BackupRow:
    stats = [d.chunks for d in manifest.disks if d.chunks is not None]
    summary = manifest.summary()
    boot = latest_boot(repo, manifest)
    screenshot = None
    if boot is not None and boot.screenshot is not None and boot.screenshot in repo.attachments(manifest):
        screenshot = repo.attachment(manifest, boot.screenshot)
    return BackupRow(
        vm=manifest.vm,
        backup_id=manifest.backup_id,
        time=backup_time(manifest.backup_id),
        kind=manifest.kind,
        virtual_size=int(summary["virtual_size"] or 0),
        logical=summary["logical_size"],
        stored=manifest.size,
        reused_chunks=sum(s.reused_chunks for s in stats) if stats else None,
        new_chunks=sum(s.new_chunks for s in stats) if stats else None,
        boot=boot,
        screenshot=screenshot,
        verified=latest_verification(repo, manifest),
    )


def collect(repo: RepositoryLayout, *, metrics: Path | None = None, vms: Sequence[str] = ()) -> ReportData:
    """Read what the report shows.

    :param vms: only these VMs (default: every VM with a backup)
    :raise RepositoryError: a manifest or a kept boot result is damaged
    """
    reports = []
    for vm in vms or repo.vms():
        backups = repo.backups(vm)
        if backups:
            reports.append(VmReport(vm, tuple(_row(repo, m) for m in backups)))
    series = read_series(metrics) if metrics is not None else {}
    return ReportData(repo.location, repo.name, dt.datetime.now(dt.UTC), tuple(reports), series)
