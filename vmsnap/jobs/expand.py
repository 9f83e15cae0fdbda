"""The VMs a job backs up: its ``[[vm]]`` entries with ``domain`` globs matched against libvirt's listing
(taken through an injected function, so this stays pure), ``exclude`` applied, and duplicates refused.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from vmsnap.errors import LibvirtError, UsageError, VmsnapError
from vmsnap.jobs.jobfile import EntryFailure, JobConfig, ListDomains, VmEntry, VmSpec
from vmsnap.model import validate_name


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_vms(
    job: JobConfig, list_domains: ListDomains
) -> tuple[tuple[VmSpec, ...], tuple[EntryFailure, ...]]:
    """The VMs a job backs up: ``domain`` globs matched against ``list_domains``, ``exclude`` applied.

    A libvirt that cannot be listed makes that entry an :class:`EntryFailure` (the others go on); every
    other problem is the job file's and stops it.

    :raise UsageError: a pattern (or exact domain) that matches nothing, a VM selected twice, two VMs with
        the same repository name, a domain name that cannot be a repository name
    """
    specs: list[VmSpec] = []
    failures: list[EntryFailure] = []
    listings: dict[str | None, Sequence[str]] = {}
    unreachable: dict[str | None, str] = {}
    base: dict[str, Any] = {
        "repository": job.repository,
        "key_file": job.key_file,
        "incremental": job.incremental,
    }
    for entry in job.vms:
        common: dict[str, Any] = {
            **base,
            "line": entry.line,
            "kind": entry.kind,
            "strategy": entry.strategy,
            "transport": entry.transport,
            "quiesce": entry.quiesce,
            "disks": entry.disks,
            "host": entry.host,
        }
        if entry.kind == "qemu":
            assert entry.qmp is not None
            name = entry.name or entry.qmp.stem
            specs.append(VmSpec(name=_vm_name(job, entry, name), qmp=entry.qmp, agent=entry.agent, **common))
            continue
        if entry.kind == "image":
            name = entry.name or entry.images[0].stem
            specs.append(VmSpec(name=_vm_name(job, entry, name), images=entry.images, **common))
            continue
        assert entry.domain is not None
        if entry.connect not in listings and entry.connect not in unreachable:
            try:
                listings[entry.connect] = tuple(list_domains(entry.connect))
            except VmsnapError as err:
                unreachable[entry.connect] = str(
                    LibvirtError(
                        f"listing the libvirt domains at {entry.connect or 'qemu:///system'} failed: "
                        f"{err.message}",
                        hint=err.hint,
                    )
                )
        if entry.connect in unreachable:
            failures.append(EntryFailure(entry.line, entry.label(), unreachable[entry.connect]))
            continue
        domains = listings[entry.connect]
        matched = [d for d in domains if fnmatch.fnmatchcase(d, entry.domain)]
        kept = [d for d in matched if not any(fnmatch.fnmatchcase(d, x) for x in entry.exclude)]
        if not kept:
            if matched:
                what = f"only domains that exclude takes out ({', '.join(matched[:5])})"
            else:
                what = "no libvirt domain" if not _has_magic(entry.domain) else "nothing"
            raise UsageError(
                f"{job.where(entry.line)}: domain {entry.domain!r} matches {what} at "
                f"{entry.connect or 'qemu:///system'}",
                hint=f"domains there: {', '.join(sorted(domains)[:10]) or 'none'}",
            )
        for domain in kept:
            specs.append(
                VmSpec(name=_vm_name(job, entry, domain), domain=domain, connect=entry.connect, **common)
            )
    _refuse_duplicates(job, specs)
    return tuple(specs), tuple(failures)


def _vm_name(job: JobConfig, entry: VmEntry, name: str) -> str:
    try:
        return validate_name(name, "VM name")
    except UsageError as err:
        raise UsageError(
            f"{job.where(entry.line)}: {entry.label()} gives the VM name {name!r}, which is not valid",
            hint=f'set name = "..." ({err.hint})' if entry.kind != "libvirt" else err.hint,
        ) from err


def _refuse_duplicates(job: JobConfig, specs: Sequence[VmSpec]) -> None:
    by_identity: dict[tuple[str, ...], VmSpec] = {}
    by_name: dict[str, VmSpec] = {}
    for spec in specs:
        first = by_identity.get(spec.identity())
        if first is not None:
            raise UsageError(
                f"{job.where(spec.line)}: VM {spec.name} is selected again (already by line {first.line})",
                hint="narrow the domain pattern or add it to exclude",
            )
        by_identity[spec.identity()] = spec
        other = by_name.get(spec.name)
        if other is not None:
            raise UsageError(
                f"{job.where(spec.line)}: two VMs would be called {spec.name!r} in the repository "
                f"(the other at line {other.line})",
                hint='give one of them name = "..."',
            )
        by_name[spec.name] = spec
