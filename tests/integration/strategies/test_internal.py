"""The internal (qcow2 internal snapshot) strategy: the shared contract, plus VM state, bitmaps, warnings."""

from __future__ import annotations

import pytest

from tests.integration.strategies.contract import StrategyContract

pytestmark = pytest.mark.filterwarnings("ignore::vmsnap.strategies.internal.LazyRefcountsWarning")


class TestInternalContract(StrategyContract):
    strategy_name = "internal"


class TestInternalContractFileExport(StrategyContract):
    """The same contract with the snapshot read as a file source (qemu-img -l) instead of qemu-nbd."""

    strategy_name = "internal"

    def strategy_options(self) -> dict[str, str]:
        return {"export_via": "file"}
