"""LibvirtMachine: a libvirt domain as a vmsnap Machine (QMP and agent through libvirt's passthrough).

Kept out of :mod:`vmsnap.machine` so that importing vmsnap never needs libvirt-python.
"""

from __future__ import annotations

from vmsnap.errors import UnsupportedError


class LibvirtMachine:
    """Placeholder until libvirt support lands (issue: libvirt domains)."""

    def __init__(self, domain: str, *, uri: str | None = None) -> None:
        raise UnsupportedError(f"libvirt domains are not supported yet (asked for {domain!r})")
