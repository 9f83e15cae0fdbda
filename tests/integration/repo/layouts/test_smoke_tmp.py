from pathlib import Path
import pytest
from tests.conftest import RunningVm
from tests.integration.cli_helpers import backup, capture, cli, restore_and_compare, write

DISKS = ("disk0", "disk1")

def test_smoke(two_disk_vm: RunningVm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vm = two_disk_vm
    repo = tmp_path / "repo"
    write(vm, "disk0", "write -P 0x11 0 4M", "write -P 0x12 16M 1M")
    write(vm, "disk1", "write -P 0x21 1M 2M")
    e1 = {d: capture(vm, d, tmp_path / f"b1-{d}.qcow2") for d in DISKS}
    first = backup(capsys, vm, repo)
    print(first)
    write(vm, "disk0", "write -P 0x31 2M 64k", "write -z 16M 64k")
    e2 = {d: capture(vm, d, tmp_path / f"b2-{d}.qcow2") for d in DISKS}
    second = backup(capsys, vm, repo, "--incremental")
    print(second)
    restore_and_compare(capsys, repo, first["backup_id"], tmp_path / "r1", e1)
    restore_and_compare(capsys, repo, second["backup_id"], tmp_path / "r2", e2)
    r = cli(capsys, "verify", "--repo", repo, "--json")
    print(r.out, r.err)
    assert r.code == 0
    r = cli(capsys, "list", "--repo", repo, "--json")
    print(r.out)
