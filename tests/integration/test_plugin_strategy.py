"""A strategy from another distribution (tests/plugin, installed into the test venv as vmsnap-test-plugin)
gets full and incremental backups through the CLI, only because its capabilities say it can: the
orchestrator never names a strategy."""

from __future__ import annotations

import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli
from vmsnap.strategies import strategy_class

PLUGIN = "offline-bitmap"


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], check=False).returncode == 0


def test_the_plugin_is_registered_by_its_own_distribution() -> None:
    (found,) = [ep for ep in entry_points(group="vmsnap.strategies") if ep.name == PLUGIN]
    assert found.dist is not None and found.dist.name == "vmsnap-test-plugin"
    capabilities = strategy_class(PLUGIN).capabilities
    assert capabilities.incremental and not capabilities.online


def test_full_and_incremental_backups_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "disk0.qcow2", "64M")
    qemu_io(image, "write -P 0xa1 0 6M")
    repo = tmp_path / "repo"
    argv = ["backup", "--repo", repo, "--image", image, "--strategy", PLUGIN, "--json"]
    first = cli(capsys, *argv)
    assert first.code == 0, first.err
    full = first.json()
    assert full["kind"] == "full" and full["strategy"] == PLUGIN
    at_full = tmp_path / "at-full.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(at_full)], check=True)

    qemu_io(image, "write -P 0xb2 40M 3M")  # the persistent bitmap records these writes
    second = cli(capsys, *argv, "--incremental")
    assert second.code == 0, second.err
    incremental = second.json()
    assert incremental["kind"] == "incremental", second.err
    assert incremental["transport"] == "nbd"  # "auto": the first transport that reads a dirty-bitmap source
    (disk,) = incremental["disks"]
    assert disk["bytes_written"] < 8 << 20  # the 3 MiB that changed (plus qcow2 metadata), not 64 MiB

    for backup_id, expected in ((full["backup_id"], at_full), (incremental["backup_id"], image)):
        out = tmp_path / f"restore-{backup_id}"
        restored = cli(capsys, "restore", "--repo", repo, "--vm", "disk0", "--backup", backup_id, "--to", out)
        assert restored.code == 0, restored.err
        assert same(out / "disk0.qcow2", expected)
    assert not same(at_full, image)  # the two moments differ: the comparison above can fail
    assert cli(capsys, "verify", "--repo", repo).code == 0
