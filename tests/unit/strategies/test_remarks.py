"""A strategy's remarks (fallbacks, slow settings) reach the backup they belong to through
BackupContext.note — never process-wide warnings, which a job's concurrent backups would mix up — and
still warn when a strategy is used on its own."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest

from vmsnap.strategies.base import BackupContext, IncrementalFallbackWarning, StrategyBase
from vmsnap.strategies.blockdev_backup.strategy import BlockdevBackupStrategy
from vmsnap.vm.machine import OfflineMachine


class Remarking(StrategyBase):
    def say(self, message: str) -> None:
        self.remark(message, IncrementalFallbackWarning)


def machine(tmp_path: Path) -> OfflineMachine:
    return OfflineMachine([tmp_path / "disk0.qcow2"])


def test_remarks_of_a_strategy_made_for_a_backup_go_to_its_context(tmp_path: Path) -> None:
    notes: list[str] = []
    strategy = Remarking.for_backup(machine(tmp_path), BackupContext(tmp_path, note=notes.append))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        strategy.say("taking a full backup")
    assert notes == ["taking a full backup"]
    blockdev = BlockdevBackupStrategy.for_backup(
        machine(tmp_path), BackupContext(tmp_path, note=notes.append)
    )
    blockdev._warn_fallback("disk0: no bitmap")
    assert notes[-1].startswith("incremental backup not possible (disk0: no bitmap)")


def test_a_strategy_on_its_own_still_warns(tmp_path: Path) -> None:
    with pytest.warns(IncrementalFallbackWarning, match="taking a full backup"):
        Remarking(machine(tmp_path)).say("taking a full backup")
    with pytest.warns(IncrementalFallbackWarning):
        Remarking.for_backup(machine(tmp_path), BackupContext(tmp_path)).say("no note: a warning")


def test_concurrent_backups_keep_their_own_remarks(tmp_path: Path) -> None:
    notes: dict[int, list[str]] = {i: [] for i in range(8)}
    start = threading.Barrier(8, timeout=30)

    def backup(index: int) -> None:
        context = BackupContext(tmp_path, note=notes[index].append)
        strategy = Remarking.for_backup(machine(tmp_path), context)
        start.wait()
        for round_ in range(50):
            strategy.say(f"vm{index} remark {round_}")

    threads = [threading.Thread(target=backup, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert notes == {i: [f"vm{i} remark {r}" for r in range(50)] for i in range(8)}
