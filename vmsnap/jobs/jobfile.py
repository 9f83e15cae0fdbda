"""The job file: TOML (stdlib ``tomllib``) parsed into frozen config objects (:mod:`vmsnap.jobs.expand` turns
its ``[[vm]]`` entries into the VMs to back up). Every mistake is one line naming the key and its line.

Reference (every key; relative paths are taken from the job file's directory)::

    repository  = "/backups"              # required: a directory, or "s3://bucket/prefix"
    key_file    = "/etc/vmsnap/key"       # encrypted repositories (the key never goes in this file)
    incremental = true                    # default true: incremental when a usable parent exists, else full
    concurrency = 2                       # default 1: VMs backed up at once (1..64)
    metrics     = "/var/lib/prometheus/node-exporter/vmsnap-nightly.prom"   # or false: none
    on_failure  = ["/usr/local/bin/notify", "--channel", "ops"]             # argv, run when a VM failed
    gc          = true                    # default false: after all VMs, free the chunks no backup names
    ssh_config  = "/etc/vmsnap/ssh_config"   # for host = …: this file instead of ~/.ssh/config (ssh -F)
    verify_boot = "latest"                # boot each VM's new backup (keys: vmsnap.jobs.boot_policy)

    [retention]                           # optional; applied to each VM after its successful backup
    keep_last = 3                         # keys: keep_last keep_hourly keep_daily keep_weekly
    keep_daily = 7                        #       keep_monthly keep_yearly

    [[vm]]                                # bare QEMU
    qmp   = "/run/vm1.qmp"                #   its QMP socket (required for this kind)
    agent = "/run/vm1.qga"                #   optional guest agent socket
    name  = "vm1"                         #   repository name; default: the QMP socket's file stem
    [[vm]]                                # libvirt domains
    domain  = "web-*"                     #   exact name or glob (* ? [..]); "*" is every domain
    exclude = ["web-test*"]               #   globs taken out of what domain matched
    connect = "qemu:///system"            #   libvirt URI (default qemu:///system; with host: qemu+ssh://HOST/system)
    [[vm]]                                # powered off
    image = ["/var/lib/images/db.qcow2"]  #   its images (a string is one image); name as for qmp
    # on every [[vm]]:
    strategy  = "backup"                  # default "auto"
    transport = "nbd"                     # default "auto"
    quiesce   = "auto"                    # auto | on | off
    disks     = ["vda"]                   # only these disks (default: all)
    host      = "root@hv2"                # on another host, over OpenSSH: user@host, host, user@host:port,
                                          # user@[v6addr]:port; socket and image paths are that host's

``metrics`` left out: ``/var/lib/prometheus/node-exporter/vmsnap-<job>.prom`` when that directory exists
(Debian's prometheus-node-exporter textfile directory), else no metrics. ``<job>`` is the job file's stem.

Line numbers: tomllib reports none for valid documents, so :class:`KeyLines` scans the text once (tables,
arrays of tables, dotted keys, inline tables, multi-line strings and arrays) and maps each key to its line.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from vmsnap.errors import UsageError
from vmsnap.jobs.boot_policy import KEYS as BOOT_KEYS
from vmsnap.jobs.boot_policy import BootPolicy, parse_boot_policy
from vmsnap.jobs.toml_lines import KeyLines, TablePath
from vmsnap.model import validate_name
from vmsnap.repo.retention import POLICY_KEYS, RetentionPolicy
from vmsnap.repo.stores import is_url, known_url, url_forms
from vmsnap.vm.hosts import HostSpec

DEFAULT_METRICS_DIR = Path("/var/lib/prometheus/node-exporter")
"""Debian's prometheus-node-exporter ``--collector.textfile.directory``."""

TOP_KEYS = (
    "repository",
    "key_file",
    "incremental",
    "concurrency",
    "metrics",
    "on_failure",
    "gc",
    "ssh_config",
    "retention",
    "vm",
    *BOOT_KEYS,
)
VM_KEYS = (
    "qmp",
    "agent",
    "name",
    "domain",
    "connect",
    "exclude",
    "image",
    "strategy",
    "transport",
    "quiesce",
    "disks",
    "host",
)
MAX_CONCURRENCY = 64

VmKind = Literal["qemu", "libvirt", "image"]
ListDomains = Callable[[str | None], Sequence[str]]
"""The libvirt domains (names) at a connection URI (None: the default URI); the runner passes libvirt's
listing, tests pass a list."""


# -- values ----------------------------------------------------------------------------------------------


@attrs.frozen
class VmEntry:
    """One ``[[vm]]`` table as written (a ``domain`` glob is not expanded yet).

    :param index: its position among the ``[[vm]]`` tables (0-based)
    :param line: the line of its selector key (``qmp``, ``domain`` or ``image``)
    """

    index: int
    line: int
    kind: VmKind
    qmp: Path | None = None
    agent: Path | None = None
    name: str | None = None
    domain: str | None = None
    connect: str | None = None
    exclude: tuple[str, ...] = ()
    images: tuple[Path, ...] = ()
    strategy: str = "auto"
    transport: str = "auto"
    quiesce: str = "auto"
    disks: tuple[str, ...] = ()
    host: HostSpec | None = None

    def label(self) -> str:
        """What the entry selects, for messages: ``domain web-*``, ``qmp /run/vm1.qmp on root@hv2``."""
        if self.kind == "qemu":
            what = f"qmp {self.qmp}"
        elif self.kind == "libvirt":
            what = f"domain {self.domain}"
        else:
            what = f"image {', '.join(str(i) for i in self.images)}"
        return f"{what} on {self.host}" if self.host else what


@attrs.frozen
class VmSpec:
    """One VM to back up, with everything its backup needs (the job's settings included).

    :param name: its name in the repository
    :param kind: "qemu" (QMP socket), "libvirt" (domain) or "image" (powered off)
    :param line: the job file line of the ``[[vm]]`` entry that selected it
    :param repository: the job's repository (a path, or ``s3://…``)
    :param key_file: the job's key file
    :param incremental: the job's ``incremental``
    :param connect: for libvirt: the URI (derived from ``host`` when only that is given)
    """

    name: str
    kind: VmKind
    line: int
    repository: str
    key_file: Path | None = None
    incremental: bool = True
    qmp: Path | None = None
    agent: Path | None = None
    domain: str | None = None
    connect: str | None = None
    images: tuple[Path, ...] = ()
    strategy: str = "auto"
    transport: str = "auto"
    quiesce: str = "auto"
    disks: tuple[str, ...] = ()
    host: HostSpec | None = None

    def identity(self) -> tuple[str, ...]:
        """What makes two specs the same VM: where it is and how it is reached."""
        where = str(self.host or "")
        if self.kind == "qemu":
            return ("qemu", where, os.path.normpath(str(self.qmp)))
        if self.kind == "libvirt":
            return ("libvirt", self.connect or "", str(self.domain))
        return ("image", where, *sorted(os.path.normpath(str(i)) for i in self.images))

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON object (reports, ``--dry-run``)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "line": self.line}
        for key in ("qmp", "agent", "domain", "connect"):
            value = getattr(self, key)
            if value is not None:
                out[key] = str(value)
        if self.images:
            out["images"] = [str(i) for i in self.images]
        if self.host is not None:
            out["host"] = str(self.host)
        out.update(strategy=self.strategy, transport=self.transport, quiesce=self.quiesce)
        if self.disks:
            out["disks"] = list(self.disks)
        return out


@attrs.frozen
class EntryFailure:
    """A ``[[vm]]`` entry that could not be expanded (its libvirt could not be listed); the job goes on."""

    line: int
    label: str
    error: str


@attrs.frozen
class JobConfig:
    """A parsed job file.

    :param name: the job's name (the file's stem): metrics label, systemd unit name
    :param path: the file (None when parsed from text)
    :param metrics: the Prometheus text file to write, or None
    :param on_failure: argv run when a VM failed (empty: nothing)
    :param retention: applied to each VM after its backup, or None
    :param gc: after every VM's backup and retention, collect the repository's garbage once (chunks: the
        chunks no backup names any more; qcow2: nothing to do)
    :param ssh_config: the ssh_config file for VMs on other hosts (None: ``$VMSNAP_SSH_CONFIG``, else
        OpenSSH's own)
    :param verify_boot: boot each VM's newest backup after its backup (None: no boot verification)
    :param lines: where each key is in the file (for messages while expanding)
    """

    name: str
    path: Path | None
    repository: str
    vms: tuple[VmEntry, ...]
    key_file: Path | None = None
    incremental: bool = True
    concurrency: int = 1
    metrics: Path | None = None
    on_failure: tuple[str, ...] = ()
    retention: RetentionPolicy | None = None
    gc: bool = False
    ssh_config: Path | None = None
    verify_boot: BootPolicy | None = None
    lines: KeyLines | None = attrs.field(default=None, eq=False, repr=False)

    def where(self, line: int) -> str:
        """``job file /etc/vmsnap/nightly.toml, line 12`` for messages."""
        return f"{_source(self.path)}, line {line}"

    def to_json(self) -> dict[str, Any]:
        """The settings (not the VMs) as a JSON object."""
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "repository": self.repository,
            "incremental": self.incremental,
            "concurrency": self.concurrency,
            "metrics": str(self.metrics) if self.metrics else None,
            "on_failure": list(self.on_failure),
            "retention": self.retention.to_json() if self.retention else None,
            "gc": self.gc,
            "ssh_config": str(self.ssh_config) if self.ssh_config else None,
            "verify_boot": self.verify_boot.to_json() if self.verify_boot else None,
        }


def _source(path: Path | None) -> str:
    return f"job file {path}" if path is not None else "job file"


# -- parsing ---------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, path: Path | None, base: Path) -> None:
        self.text = text
        self.path = path
        self.base = base
        self.lines = KeyLines(text)

    def fail(self, table: TablePath, key: str | None, message: str, hint: str = "") -> UsageError:
        line = self.lines.line(table, key)
        return UsageError(f"{_source(self.path)}, line {line}: {message}", hint=hint or None)

    def unknown(self, table: TablePath, data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                raise self.fail(table, key, f"unknown key {key!r} in {where}", hint)

    def string(self, table: TablePath, data: Mapping[str, Any], key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value or "\0" in value or "\n" in value:
            raise self.fail(table, key, f"{key} must be a non-empty one-line string, not {_show(value)}")
        return value

    def strings(
        self, table: TablePath, data: Mapping[str, Any], key: str, *, allow_one: bool
    ) -> tuple[str, ...]:
        value = data.get(key)
        if value is None:
            return ()
        if allow_one and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v and "\0" not in v and "\n" not in v for v in value
        ):
            raise self.fail(table, key, f"{key} must be a list of non-empty strings, not {_show(value)}")
        return tuple(value)

    def local_path(self, table: TablePath, key: str, value: str) -> Path:
        path = Path(value).expanduser() if value.startswith("~") else Path(value)
        return path if path.is_absolute() else self.base / path

    def host_path(self, table: TablePath, key: str, value: str, host: HostSpec | None) -> Path:
        if host is None:
            return self.local_path(table, key, value)
        if not value.startswith("/"):
            raise self.fail(table, key, f"{key} {value!r} must be an absolute path on {host}")
        return Path(value)

    def parse(self, default_metrics_dir: Path | None, name: str) -> JobConfig:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(
                f"{_source(self.path)}: not valid TOML: {err}", hint="see the job file reference"
            ) from err
        top: TablePath = ()
        self.unknown(top, data, TOP_KEYS, "the job file")
        repository = self.string(top, data, "repository")
        if repository is None:
            raise UsageError(
                f"{_source(self.path)}, line 1: repository is missing",
                hint='add repository = "/backups" (or "s3://bucket/prefix") at the top',
            )
        if is_url(repository):
            if not known_url(repository):
                raise self.fail(
                    top,
                    "repository",
                    f"unsupported repository URL {repository!r}",
                    f"use a path or {url_forms()}",
                )
        else:
            repository = str(self.local_path(top, "repository", repository))
        key_file = self.string(top, data, "key_file")
        incremental = data.get("incremental", True)
        if not isinstance(incremental, bool):
            raise self.fail(
                top, "incremental", f"incremental must be true or false, not {_show(incremental)}"
            )
        concurrency = data.get("concurrency", 1)
        if (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= MAX_CONCURRENCY
        ):
            raise self.fail(
                top,
                "concurrency",
                f"concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {_show(concurrency)}",
            )
        metrics = self.metrics(data, default_metrics_dir, name)
        on_failure = self.strings(top, data, "on_failure", allow_one=False)
        gc = data.get("gc", False)
        if not isinstance(gc, bool):
            raise self.fail(top, "gc", f"gc must be true or false, not {_show(gc)}")
        ssh_config = self.string(top, data, "ssh_config")
        retention = self.retention(data.get("retention"))
        vms = data.get("vm")
        if vms is None:
            raise UsageError(
                f"{_source(self.path)}, line 1: the job names no VM", hint="add a [[vm]] table for each VM"
            )
        if not isinstance(vms, list) or not all(isinstance(v, dict) for v in vms):
            raise self.fail(top, "vm", "vm must be an array of tables: write [[vm]] before each VM's keys")
        entries = tuple(self.vm(index, vm) for index, vm in enumerate(vms))
        return JobConfig(
            name=name,
            path=self.path,
            repository=repository,
            key_file=self.local_path(top, "key_file", key_file) if key_file else None,
            incremental=incremental,
            concurrency=concurrency,
            metrics=metrics,
            on_failure=on_failure,
            retention=retention,
            gc=gc,
            ssh_config=self.local_path(top, "ssh_config", ssh_config) if ssh_config else None,
            vms=entries,
            verify_boot=parse_boot_policy(data, lambda key, message: self.fail(top, key, message)),
            lines=self.lines,
        )

    def metrics(self, data: Mapping[str, Any], default_dir: Path | None, name: str) -> Path | None:
        value = data.get("metrics")
        if value is None or value is True:
            if value is None and default_dir is None:
                return None
            return (default_dir or DEFAULT_METRICS_DIR) / f"vmsnap-{name}.prom"
        if value is False:
            return None
        text = self.string((), data, "metrics")
        assert text is not None
        if not text.endswith(".prom"):
            raise self.fail(
                (),
                "metrics",
                f"metrics {text!r} must end in .prom",
                "node_exporter's textfile collector reads *.prom",
            )
        return self.local_path((), "metrics", text)

    def retention(self, value: Any) -> RetentionPolicy | None:
        table: TablePath = ("retention",)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(
                (), "retention", "retention must be a table: write [retention] and keep_… = N below"
            )
        self.unknown(table, value, POLICY_KEYS, "[retention]")
        for key, count in value.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise self.fail(
                    table, key, f"{key} must be a whole number of backups (0 or more), not {_show(count)}"
                )
        try:
            return RetentionPolicy.from_mapping(value)
        except UsageError as err:
            raise self.fail(table, None, f"[retention]: {err.message}", err.hint) from err

    def host(self, table: TablePath, data: Mapping[str, Any]) -> HostSpec | None:
        """The entry's ``host = "user@host[:port]"``, or None."""
        host_text = data.get("host")
        if host_text is None:
            return None
        if not isinstance(host_text, str):
            raise self.fail(table, "host", f'host must be a string like "root@hv2", not {_show(host_text)}')
        try:
            return HostSpec.parse(host_text)
        except UsageError as err:
            raise self.fail(table, "host", err.message, err.hint) from err

    def backup_options(self, table: TablePath, data: Mapping[str, Any]) -> dict[str, Any]:
        """The entry's strategy, transport, quiesce, disks and name, checked."""
        quiesce = self.string(table, data, "quiesce") or "auto"
        if quiesce not in ("auto", "on", "off"):
            raise self.fail(table, "quiesce", f"quiesce must be auto, on or off, not {quiesce!r}")
        strategy = self.string(table, data, "strategy") or "auto"
        transport = self.string(table, data, "transport") or "auto"
        for key, value in (("strategy", strategy), ("transport", transport)):
            if not re.match(r"^[a-z][a-z0-9_-]{0,63}$", value):
                raise self.fail(
                    table, key, f"invalid {key} name {value!r}", f"vmsnap strategies lists the {key} names"
                )
        disks = self.strings(table, data, "disks", allow_one=False)
        name = self.string(table, data, "name")
        for key, values in (("disks", disks), ("name", (name,) if name else ())):
            for value in values:
                try:
                    validate_name(value, "disk name" if key == "disks" else "VM name")
                except UsageError as err:
                    raise self.fail(table, key, err.message, err.hint) from err
        return {
            "strategy": strategy,
            "transport": transport,
            "quiesce": quiesce,
            "disks": disks,
            "name": name,
        }

    def vm(self, index: int, data: Mapping[str, Any]) -> VmEntry:
        table: TablePath = ("vm", index)
        self.unknown(table, data, VM_KEYS, "[[vm]]")
        selectors = [k for k in ("qmp", "domain", "image") if k in data]
        if len(selectors) != 1:
            what = "none" if not selectors else " and ".join(selectors)
            raise self.fail(
                table,
                selectors[1] if len(selectors) > 1 else None,
                f"[[vm]] needs exactly one of qmp, domain, image (found {what})",
                'e.g. qmp = "/run/vm1.qmp", domain = "web-*" or image = ["/images/db.qcow2"]',
            )
        selector = selectors[0]
        kind = _KINDS[selector]
        allowed = {"qemu": {"agent", "name"}, "libvirt": {"connect", "exclude"}, "image": {"name"}}[kind]
        for key in ("agent", "name", "connect", "exclude"):
            if key in data and key not in allowed:
                raise self.fail(table, key, f"{key} does not go with {selector}", _MISPLACED[key])
        host = self.host(table, data)
        if kind == "libvirt" and host is not None and "connect" in data:
            raise self.fail(
                table,
                "connect",
                "give either connect or host for a libvirt domain, not both",
                'host = "root@hv2" means connect = "qemu+ssh://root@hv2/system"',
            )
        common: dict[str, Any] = {
            "index": index,
            "line": self.lines.line(table, selector),
            "kind": kind,
            "host": host,
            **self.backup_options(table, data),
        }
        if kind == "qemu":
            qmp = self.string(table, data, "qmp")
            agent = self.string(table, data, "agent")
            assert qmp is not None
            return VmEntry(
                **common,
                qmp=self.host_path(table, "qmp", qmp, host),
                agent=self.host_path(table, "agent", agent, host) if agent else None,
            )
        if kind == "image":
            images = self.strings(table, data, "image", allow_one=True)
            if not images:
                raise self.fail(table, "image", "image must name at least one image file")
            return VmEntry(**common, images=tuple(self.host_path(table, "image", i, host) for i in images))
        domain = self.string(table, data, "domain")
        assert domain is not None
        return VmEntry(
            **common,
            domain=domain,
            connect=self.string(table, data, "connect") or (host.libvirt_uri() if host else None),
            exclude=self.strings(table, data, "exclude", allow_one=True),
        )


_KINDS: dict[str, VmKind] = {"qmp": "qemu", "domain": "libvirt", "image": "image"}
_MISPLACED = {
    "agent": "agent is the guest agent socket of a qmp VM (libvirt finds a domain's agent itself)",
    "name": "a libvirt VM is named after its domain; name is for qmp and image VMs",
    "connect": "connect is the libvirt URI of a domain",
    "exclude": "exclude takes globs out of what domain matched",
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_job(
    text: str,
    *,
    path: Path | None = None,
    name: str | None = None,
    default_metrics_dir: Path | None = None,
) -> JobConfig:
    """Parse a job file's text (nothing is read or contacted).

    :param path: the file it came from: names it in messages; relative paths are taken from its directory
    :param name: the job's name (default: the file's stem, else "job")
    :param default_metrics_dir: where metrics go when the file does not say (None: no metrics then)
    :raise UsageError: invalid TOML, an unknown key, a wrong type or value, a missing repository or VM — one
        line naming the key and its line
    """
    job_name = name or (path.stem if path is not None else "job")
    try:
        validate_name(job_name, "job name")
    except UsageError as err:
        raise UsageError(f"{_source(path)}: {err.message}", hint="rename the job file") from err
    base = path.parent if path is not None else Path.cwd()
    return _Parser(text, path, base).parse(default_metrics_dir, job_name)


def load_job(path: Path, *, name: str | None = None) -> JobConfig:
    """Read and parse a job file; metrics default to :data:`DEFAULT_METRICS_DIR` when it exists.

    :raise UsageError: the file cannot be read, or :func:`parse_job` refuses it
    """
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(
            f"cannot read job file {path}: {err}", hint="check the path and its permissions"
        ) from err
    default_dir = DEFAULT_METRICS_DIR if DEFAULT_METRICS_DIR.is_dir() else None
    return parse_job(text, path=path, name=name, default_metrics_dir=default_dir)
