"""The rsync transport: the contract suite locally and over SSH, plus the delta transfer."""

from __future__ import annotations

from tests.integration.transports.contract import TransportContract


class TestRsyncContract(TransportContract):
    transport_name = "rsync"
