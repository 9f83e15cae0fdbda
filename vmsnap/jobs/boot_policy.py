"""A job's boot verification: ``verify_boot = "latest"`` in the job file boots each VM's newest backup
after its backup and retention (``vmsnap verify --boot``), one boot at a time per host.

Keys (top level of the job file)::

    verify_boot         = "latest"            # the backup to boot: the one this run took (its VM's newest)
    verify_boot_every   = "7d"                # optional: only when the VM's last boot verification is older
                                              # (a number with s, m, h, d or w)
    verify_boot_checks  = ["cat /etc/hostname"]   # commands that must exit 0 in the guest
    verify_boot_ports   = [22]                # guest TCP ports that must accept a connection
    verify_boot_timeout = 300                 # seconds the guest agent has to answer
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from vmsnap.errors import UsageError

KEYS = ("verify_boot", "verify_boot_every", "verify_boot_checks", "verify_boot_ports", "verify_boot_timeout")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@attrs.frozen
class BootPolicy:
    """What a job's boot verification does.

    :param every: seconds between verifications of one VM (None: after every backup)
    """

    backup: str = "latest"
    every: float | None = None
    checks: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    timeout: float = 300.0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``90m``, ``3600s``, ``2w`` in seconds.

    :raise UsageError: anything else
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match is None:
        raise UsageError(f"{text!r} is no duration", hint="write a number with s, m, h, d or w, e.g. 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_boot_policy(data: Mapping[str, Any], fail: Callable[[str, str], UsageError]) -> BootPolicy | None:
    """The job file's boot verification (None when ``verify_boot`` is not set).

    :param fail: makes the one-line error naming a key and its line: ``fail(key, message)``
    :raise UsageError: a key of the wrong type or value, or a ``verify_boot_*`` key without ``verify_boot``
    """
    which = data.get("verify_boot")
    if which is None:
        extra = [k for k in KEYS[1:] if k in data]
        if extra:
            raise fail(extra[0], f'{extra[0]} needs verify_boot = "latest"')
        return None
    if which != "latest":
        raise fail("verify_boot", f'verify_boot must be "latest", not {which!r}')
    every = data.get("verify_boot_every")
    if every is not None:
        if not isinstance(every, str):
            raise fail("verify_boot_every", f'verify_boot_every must be a string like "7d", not {every!r}')
        try:
            every_seconds: float | None = parse_duration(every)
        except UsageError as err:
            raise fail("verify_boot_every", err.message) from err
    else:
        every_seconds = None
    checks = data.get("verify_boot_checks", [])
    if not isinstance(checks, list) or not all(isinstance(c, str) and c.strip() for c in checks):
        raise fail("verify_boot_checks", "verify_boot_checks must be a list of commands (strings)")
    ports = data.get("verify_boot_ports", [])
    if not isinstance(ports, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports
    ):
        raise fail("verify_boot_ports", "verify_boot_ports must be a list of TCP ports (1 to 65535)")
    timeout = data.get("verify_boot_timeout", 300)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise fail("verify_boot_timeout", f"verify_boot_timeout must be seconds above 0, not {timeout!r}")
    return BootPolicy("latest", every_seconds, tuple(checks), tuple(ports), float(timeout))
