"""The soak for one minute (``make soak`` runs it for 20): random operations with ``kill -9`` and S3 restarts
against a real QEMU and SeaweedFS, then recover, verify and every backup restored and compared.

The seed is random unless ``SOAK_SEED`` is set; a failure names it (``SOAK_SEED=N make soak`` repeats the
choices)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.soak.soak import SoakConfig, run

CI_SECONDS = 60.0
"""The whole test's time, set-up and final checks included (the random operations stop early enough)."""


@pytest.mark.timeout(1200)
def test_soak(tmp_path: Path) -> None:
    """(A short name: QEMU's and SeaweedFS's unix sockets live under ``tmp_path``.)"""
    seed = int(os.environ["SOAK_SEED"]) if os.environ.get("SOAK_SEED") else secrets.randbits(32)
    ok, summary = run(SoakConfig(CI_SECONDS, seed, tmp_path, verbose=False, budget=CI_SECONDS))
    print(summary)
    assert ok, f"the soak failed (SOAK_SEED={seed}; logs in {tmp_path}):\n{summary}"
