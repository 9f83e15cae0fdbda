"""The external (overlay) strategy: the shared contract, plus merge modes, orphans and failure handling."""

from __future__ import annotations

from tests.integration.strategies.contract import StrategyContract


class TestExternalContract(StrategyContract):
    strategy_name = "external"
