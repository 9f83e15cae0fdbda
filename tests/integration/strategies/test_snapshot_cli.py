"""``vmsnap snapshot create|list|delete|rollback`` and ``vmsnap strategies`` through ``cli.main``, on real
images and a real QEMU, checking the bytes the commands leave behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.strategies.contract import MiB, compare_images, run
from vmsnap.cli import main
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.strategies.external import overlay_path
from vmsnap.vm.qmp import QMPMonitor


def vmsnap(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def write(image: Path, pattern: int, offset: int = 0, length: int = MiB) -> None:
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(image)])


def copy(image: Path, dest: Path) -> Path:
    run(["qemu-img", "convert", "-f", "qcow2", str(image), "-O", "qcow2", str(dest)])
    return dest


def test_strategies_table_has_the_internal_and_external_rows(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = vmsnap(capsys, "strategies", "--json")
    assert code == 0
    table = json.loads(out)["strategies"]
    assert table["internal"]["snapshot_is"] == "entries in the qcow2 image"
    assert "overlay" in table["external"]["snapshot_is"]
    code, out, _ = vmsnap(capsys, "strategies")
    assert "| internal " in out and "| external " in out


@pytest.mark.parametrize("strategy", ["internal", "external"])
def test_offline_create_list_rollback_delete(
    strategy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "disk0.qcow2")
    write(image, 0x11)
    at_create = copy(image, tmp_path / "at-create.qcow2")
    vm = ["--image", str(image), "--strategy", strategy]
    code, out, _ = vmsnap(capsys, "snapshot", "create", *vm, "--snapshot", "before", "--json")
    assert code == 0
    created = json.loads(out)
    assert [s["name"] for s in created["snapshots"]] == ["before"]
    assert "paused_ms" not in created  # no VM runs: nothing was paused
    write(image, 0x22, 512 * 1024)
    code, out, _ = vmsnap(capsys, "snapshot", "list", *vm, "--json")
    assert [(s["disk"], s["name"]) for s in json.loads(out)["snapshots"]] == [("disk0", "before")]
    code, out, _ = vmsnap(capsys, "snapshot", "rollback", *vm, "--snapshot", "before")
    assert code == 0 and "rolled back" in out
    compare_images(copy(image, tmp_path / "now.qcow2"), at_create)
    if strategy == "internal":  # an internal snapshot survives its rollback; delete it
        code, _, _ = vmsnap(capsys, "snapshot", "delete", *vm, "--snapshot", "before")
        assert code == 0
    code, out, _ = vmsnap(capsys, "snapshot", "list", *vm)
    assert out.strip() == "no snapshots"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at-create.qcow2", "disk0.qcow2", "now.qcow2"]


def test_online_external_create_and_delete_over_qmp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "disk0.qcow2")
    process = QemuProcess(tmp_path, [DriveSpec(image, "disk0")], name="clivm").start()
    try:
        vm = ["--qmp", str(process.qmp_socket), "--strategy", "external"]
        code, out, err = vmsnap(capsys, "snapshot", "create", *vm, "--snapshot", "s1", "--json")
        assert code == 0, err
        assert json.loads(out)["snapshots"][0]["location"] == str(overlay_path(image, "s1"))
        code, out, err = vmsnap(capsys, "snapshot", "rollback", *vm, "--snapshot", "s1")
        assert code == 1 and "shut the VM down" in err and "\n" not in err.strip()
        code, out, err = vmsnap(capsys, "snapshot", "delete", *vm, "--snapshot", "s1", "--merge", "commit")
        assert code == 0, err
        with QMPMonitor(process.qmp_socket).connect() as qmp:
            assert [d.file for d in qmp.disks()] == [image]
        assert not overlay_path(image, "s1").exists()
    finally:
        process.stop()
        process.kill()


def test_usage_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "disk0.qcow2")
    vm = ["--image", str(image)]
    cases = [
        ([*vm, "--strategy", "internal", "--merge", "commit"], "does not take --merge"),
        ([*vm, "--strategy", "internal", "--snapshot", "../x"], "invalid snapshot name"),
        (["--strategy", "internal"], "name exactly one VM"),
    ]
    for argv, message in cases:
        code, _, err = vmsnap(capsys, "snapshot", "create", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = vmsnap(capsys, "snapshot", "delete", *vm, "--strategy", "internal")
    assert code == 2 and "--snapshot" in err
    code, _, err = vmsnap(capsys, "snapshot", "delete", *vm, "--strategy", "internal", "--snapshot", "nope")
    assert code == 1 and "no internal snapshot 'nope'" in err
    code, _, err = vmsnap(capsys, "snapshot", "list", *vm, "--strategy", "interna")
    assert code == 1 and "did you mean 'internal'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk0.qcow2"]


def test_lazy_refcounts_warning_reaches_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_image(tmp_path / "disk0.qcow2")
    code, out, err = vmsnap(
        capsys,
        "snapshot",
        "create",
        "--image",
        str(image),
        "--strategy",
        "internal",
        "--snapshot",
        "s",
        "--json",
    )
    assert code == 0
    assert "lazy_refcounts" in err
    assert "lazy_refcounts" in json.loads(out)["warnings"][0]


def test_online_internal_with_vm_state_rolls_back_both_disks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [make_image(tmp_path / "disk0.qcow2"), make_image(tmp_path / "disk1.qcow2")]
    drives = [DriveSpec(images[0], "disk0"), DriveSpec(images[1], "disk1", bus="scsi")]
    process = QemuProcess(tmp_path, drives, name="clivm").start()
    try:
        vm = ["--qmp", str(process.qmp_socket), "--strategy", "internal"]
        code, out, err = vmsnap(
            capsys, "snapshot", "create", *vm, "--snapshot", "ram", "--vm-state", "--json"
        )
        assert code == 0, err
        # the VM was stopped while its RAM and both disks were saved: a pause of milliseconds at least
        assert json.loads(out)["paused_ms"] > 0
        with QMPMonitor(process.qmp_socket).connect() as qmp:
            for disk in ("disk0", "disk1"):
                qemu_io(qmp, disk, "write -P 0x5a 0 1M")
        code, out, err = vmsnap(capsys, "snapshot", "rollback", *vm, "--snapshot", "ram")
        assert code == 0, err
        with QMPMonitor(process.qmp_socket).connect() as qmp:
            assert qmp.status() == "running"
            for disk in ("disk0", "disk1"):  # both disks read zeros again
                assert "Pattern verification failed" not in qemu_io(qmp, disk, "read -P 0 0 1M")
    finally:
        process.stop()
        process.kill()
