"""Proof that a backup boots: ``vmsnap verify --boot`` (:func:`~vmsnap.verify_boot.run.verify_boot`) boots a
backup on throwaway overlays, asks its guest agent, runs checks and probes ports, takes a screenshot, and
keeps the result beside the backup (:mod:`~vmsnap.verify_boot.result`)."""

from __future__ import annotations

from vmsnap.verify_boot.result import BootResult, CheckResult, PortResult, boot_results, latest_boot
from vmsnap.verify_boot.run import BootConfig, NotBootableError, verify_boot
from vmsnap.verify_boot.session import recover

__all__ = [
    "BootConfig",
    "BootResult",
    "CheckResult",
    "NotBootableError",
    "PortResult",
    "boot_results",
    "latest_boot",
    "recover",
    "verify_boot",
]
