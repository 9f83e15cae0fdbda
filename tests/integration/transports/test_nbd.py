"""The nbd transport: the contract suite, plus dirty-bitmap incrementals."""

from __future__ import annotations

from tests.integration.transports.contract import TransportContract


class TestNbdContract(TransportContract):
    transport_name = "nbd"
