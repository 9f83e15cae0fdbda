"""The copy transport: the contract suite, plus reading a running VM's image (force_share)."""

from __future__ import annotations

from tests.integration.transports.contract import TransportContract


class TestCopyContract(TransportContract):
    transport_name = "copy"
