"""What a boot verification found, and how it is kept beside the backup it proves.

Each verification keeps two objects beside its backup (:meth:`~vmsnap.repo.layout.RepositoryLayout.attach`;
encrypted in an encrypted repository, the manifest never rewritten): ``boot-<stamp>.json`` (this module's
:meth:`BootResult.to_json`) and, when the VM had a display, ``boot-<stamp>.png`` (its screen at the verdict).
``<stamp>`` is the UTC time of the verification (``20261207T223501.123456Z``), so names sort by time and the
newest is the verdict ``list`` shows.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Literal

import attrs

from vmsnap.errors import NotFoundError, RepositoryError, UsageError
from vmsnap.model import validate_name
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.manifest import Manifest

PREFIX = "boot-"
FORMAT = 1
OUTPUT_LIMIT = 4096
"""Bytes of a check's output kept (the end of it)."""

Verdict = Literal["passed", "failed"]


def new_stamp(now: dt.datetime | None = None) -> str:
    """The stamp of a verification made now: UTC, sortable."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S.%fZ")


@attrs.frozen
class CheckResult:
    """One ``--check`` run inside the guest.

    :param command: the command as given
    :param exit_code: its exit status; None when it could not be started (``error`` says why)
    :param output: the end of its standard output and error (at most :data:`OUTPUT_LIMIT` bytes)
    :param error: why it could not run (no such command in the guest, a timeout)
    :param seconds: how long it ran
    """

    command: str
    exit_code: int | None
    output: str = ""
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        """One line: what the check did."""
        if self.error is not None:
            return f"check {self.command!r}: {self.error}"
        return f"check {self.command!r} exited {self.exit_code}"


@attrs.frozen
class PortResult:
    """One ``--port`` probed from the host through the copy's restricted NIC.

    :param port: the guest's TCP port
    :param open: the guest was seen to answer on it: the service sent a first byte, or the guest showed the
        connection established (:func:`vmsnap.verify_boot.probe.probe_port`)
    :param detail: what the probe saw (the first bytes the service sent, or why it failed)
    """

    port: int
    open: bool
    detail: str = ""


@attrs.frozen
class BootResult:
    """One boot verification of one backup.

    :param vm: the VM
    :param backup_id: the backup booted
    :param stamp: when (see :func:`new_stamp`); names the kept objects
    :param verdict: "passed" when the agent answered, every check exited 0 and every port answered
    :param reason: why it failed (one line), None when it passed
    :param kind: "qemu" (rebuilt command line) or "libvirt" (saved definition)
    :param seconds_to_agent: from the start of the boot (the backup resolved and this host's boot lock
        held: a verification waiting for another one is not counted) to the agent's first answer (None: it
        never answered)
    :param seconds: from the start of the boot to the verdict (the copy stopped, its console read)
    :param timeout: the seconds the agent was given
    :param osinfo: ``guest-get-osinfo``'s answer
    :param checks: each check's result
    :param ports: each port's probe
    :param screenshot: the name of the kept screenshot object, or None
    :param screenshot_skipped: why there is no screenshot
    :param console_tail: the serial console's last lines, or None
    :param console_skipped: why there is no console tail
    :param accelerator: how the copy ran ("tcg", "kvm", or "" when unknown)
    :param stored_bytes: bytes of the objects this verification kept in the repository
    """

    vm: str
    backup_id: str
    stamp: str
    verdict: Verdict
    reason: str | None
    kind: str
    seconds_to_agent: float | None
    seconds: float
    timeout: float
    osinfo: dict[str, Any] | None = None
    checks: tuple[CheckResult, ...] = ()
    ports: tuple[PortResult, ...] = ()
    screenshot: str | None = None
    screenshot_skipped: str | None = None
    console_tail: tuple[str, ...] | None = None
    console_skipped: str | None = None
    accelerator: str = ""
    stored_bytes: int = 0

    @property
    def name(self) -> str:
        """The kept result's object name."""
        return f"{PREFIX}{self.stamp}.json"

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["format"] = FORMAT
        data["console_tail"] = list(self.console_tail) if self.console_tail is not None else None
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> BootResult:
        """Parse a kept result, checking each field's type, the verdict and the screenshot's name.

        :raise RepositoryError: malformed or of another format
        """
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            if data.get("verdict") not in ("passed", "failed"):
                raise ValueError(f"verdict {data.get('verdict')!r}")
            _typed(data, _FIELDS)
            screenshot = data.get("screenshot")
            if screenshot is not None:
                validate_name(screenshot, "screenshot name")
            fields = {f.name for f in attrs.fields(cls)}
            values = {k: v for k, v in data.items() if k in fields}
            checks = data.get("checks", [])
            ports = data.get("ports", [])
            if not isinstance(checks, (list, tuple)) or not isinstance(ports, (list, tuple)):
                raise ValueError("checks and ports must be lists")
            for check in checks:
                _typed(check, _CHECK_FIELDS)
            for port in ports:
                _typed(port, _PORT_FIELDS)
            values["checks"] = tuple(CheckResult(**c) for c in checks)
            values["ports"] = tuple(PortResult(**p) for p in ports)
            tail = data.get("console_tail")
            if tail is not None and not (
                isinstance(tail, (list, tuple)) and all(isinstance(x, str) for x in tail)
            ):
                raise ValueError("console_tail must be a list of strings")
            values["console_tail"] = tuple(tail) if tail is not None else None
            return cls(**values)
        except (AttributeError, KeyError, TypeError, ValueError, UsageError) as err:
            raise RepositoryError(
                f"boot result {where} is damaged: {err}", hint="verify the boot again"
            ) from err

    def summary(self) -> dict[str, Any]:
        """What ``list --json`` shows as a backup's ``boot`` object."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "verified_at": self.stamp,
            "kind": self.kind,
            "seconds_to_agent": self.seconds_to_agent,
            "seconds": self.seconds,
            "checks": [
                {"command": c.command, "exit_code": c.exit_code, "error": c.error} for c in self.checks
            ],
            "ports": [{"port": p.port, "open": p.open} for p in self.ports],
            "screenshot": self.screenshot,
            "screenshot_skipped": self.screenshot_skipped,
            "console_tail": list(self.console_tail) if self.console_tail is not None else None,
            "console_skipped": self.console_skipped,
            "accelerator": self.accelerator,
        }


_NUMBER = (int, float)
_OPTIONAL_TEXT = (str, type(None))
_FIELDS: dict[str, tuple[type, ...]] = {
    "vm": (str,), "backup_id": (str,), "stamp": (str,), "reason": _OPTIONAL_TEXT, "kind": (str,),
    "seconds_to_agent": (*_NUMBER, type(None)), "seconds": _NUMBER, "timeout": _NUMBER,
    "osinfo": (dict, type(None)), "screenshot": _OPTIONAL_TEXT, "screenshot_skipped": _OPTIONAL_TEXT,
    "console_skipped": _OPTIONAL_TEXT, "accelerator": (str,), "stored_bytes": (int,),
}  # fmt: skip
_CHECK_FIELDS: dict[str, tuple[type, ...]] = {
    "command": (str,), "exit_code": (int, type(None)), "output": (str,), "error": _OPTIONAL_TEXT,
    "seconds": _NUMBER,
}  # fmt: skip
_PORT_FIELDS: dict[str, tuple[type, ...]] = {"port": (int,), "open": (bool,), "detail": (str,)}


def _typed(data: Any, fields: dict[str, tuple[type, ...]]) -> None:
    """:raise ValueError: ``data`` is no object, or a field of it present has another type (a bool is no
    number)."""
    if not isinstance(data, dict):
        raise ValueError(f"{data!r} is no object")
    for name, types in fields.items():
        if name in data:
            value = data[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"{name} {value!r} is no {' or '.join(t.__name__ for t in types)}")


def boot_names(names: list[str]) -> list[str]:
    """The kept boot results among an attachment listing, oldest first."""
    return sorted(n for n in names if n.startswith(PREFIX) and n.endswith(".json"))


def latest_boot(repo: RepositoryLayout, manifest: Manifest) -> BootResult | None:
    """The newest boot verification of a backup, or None.

    :raise RepositoryError: it is damaged
    """
    names = boot_names(repo.attachments(manifest))
    if not names:
        return None
    try:
        raw = repo.attachment(manifest, names[-1])
    except NotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise RepositoryError(f"boot result {names[-1]} is damaged: {err}") from err
    return BootResult.from_json(data, where=f"{manifest.vm}/{manifest.backup_id}/{names[-1]}")
