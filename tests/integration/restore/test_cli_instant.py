"""``vmsnap instant-restore`` on bare QEMU end to end: step 1 prepares images on a backup taken by ``vmsnap
backup`` and prints the QEMU options for them, QEMU starts with exactly those, step 2 copies the rest and
stops the servers; the lab guest boots on its backup, is killed mid-copy's vmsnap and resumed; ``recover``
stops the servers no image needs any more; and the bad inputs, one line each."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_helpers import VMSNAP, cli, cli_on_a_terminal, wait_until_qmp_listens
from tests.integration.restore.conftest import BackedUpDisk, daemon_pids
from tests.integration.restore.test_cli_mount import backup_image
from tests.integration.restore.test_instant import alive, identical, kill_mid_copy, qemu_img_info
from vmsnap.lab.guest import LabGuest
from vmsnap.lab.image import LabImage
from vmsnap.lab.qemu import DriveSpec, QemuProcess, qemu_io
from vmsnap.restore.commands import instant_dir
from vmsnap.restore.instant import JOB_PREFIX, STATE
from vmsnap.vm.qmp import QMPMonitor


def prepare(capsys: pytest.CaptureFixture[str], repo: Path, vm: str, to: Path) -> dict[str, Any]:
    result = cli(capsys, "instant-restore", "--repo", repo, "--vm", vm, "--to", to, "--json")
    assert result.code == 0, result.err
    data: dict[str, Any] = result.json()
    assert data["status"] == "prepared" and data["mode"] == "prepare"
    return data


def servers_left(run_root: Path) -> list[str]:
    directory = instant_dir(run_root)
    return [p.name for p in directory.iterdir() if p.name != ".lock"] if directory.is_dir() else []


@pytest.mark.parametrize("layout", ["chunks", "qcow2"])
def test_bare_qemu_in_two_steps_with_the_printed_options(
    backed_up_disk: BackedUpDisk,
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    layout: str,
) -> None:
    image = tmp_path / "disk0.qcow2"
    subprocess.run(["cp", "--sparse=always", str(backed_up_disk.base), str(image)], check=True)
    repo = tmp_path / "repo"
    assert cli(capsys, "init", "--repo", repo, "--layout", layout).code == 0
    made = backup_image(capsys, repo, image, "vm1")
    restored = tmp_path / "restored"  # the backup as `vmsnap restore` writes it: what the copy must end as
    assert cli(capsys, "restore", "--repo", repo, "--vm", "vm1", "--to", restored).code == 0
    backed_up = restored / "disk0.qcow2"
    to = tmp_path / "to"
    human = cli(capsys, "instant-restore", "--repo", repo, "--vm", "vm1", "--to", to)
    assert human.code == 0, human.err
    assert "-blockdev" in human.out and f"vmsnap instant-restore --to {to} --qmp QMP-SOCKET" in human.out
    again = prepare(capsys, repo, "vm1", to)  # step 1 again: the resume, nothing new
    assert again["resumed"] and again["backup_id"] == made["backup_id"]
    [disk] = again["disks"]
    assert (disk["name"], disk["image"], disk["size"]) == (
        "disk0",
        str(to / "disk0.qcow2"),
        made["disks"][0]["virtual_size"],
    )
    [server] = daemon_pids(instant_dir(run_root))

    vm = QemuProcess(tmp_path / "vm", extra_args=again["qemu_args"], name="restored").start()
    try:
        wait_until_qmp_listens(vm.qmp_socket)
        with vm.monitor() as qmp:  # QEMU answers once its disks are open: it runs on the backup
            [block] = [b for b in qmp.query_block() if b.get("inserted")]
            assert block["inserted"]["node-name"] == "restored-disk0"
            assert block["inserted"]["image"]["backing-image"]["filename"].startswith("nbd+unix://")
        result = cli(capsys, "instant-restore", "--to", to, "--qmp", vm.qmp_socket, "--json")
        assert result.code == 0, result.err
        data = result.json()
        assert (data["status"], data["mode"], data["streamed"]) == ("done", "stream", ["disk0"])
        assert not alive(server)
        with QMPMonitor(vm.qmp_socket).connect() as qmp:
            [block] = [b for b in qmp.query_block() if b.get("inserted")]
            assert "backing-image" not in block["inserted"]["image"]
    finally:
        vm.stop()
    assert "backing-filename" not in qemu_img_info(to / "disk0.qcow2")
    assert identical(to / "disk0.qcow2", backed_up)
    assert not (to / STATE).exists() and servers_left(run_root) == []

    # instant restore onto images that exist: refused before anything is served
    for target in (to, tmp_path / "other"):
        target.mkdir(exist_ok=True)
        (target / "disk0.qcow2").touch()
        refused = cli(capsys, "instant-restore", "--repo", repo, "--vm", "vm1", "--to", target)
        assert refused.code == 2 and f"{target / 'disk0.qcow2'} exists already" in refused.error_line
    assert servers_left(run_root) == [] and daemon_pids(instant_dir(run_root)) == []
    for argv, words in [
        (["--to", to], "needs a backup (--repo, --vm) to prepare, or the VM"),
        (["--repo", repo, "--vm", "vm1", "--to", to, "--qmp", vm.qmp_socket], "leave --repo/--vm out"),
        (["--to", to, "--qmp", "q", "--domain", "d"], "needs a backup"),
        (["--repo", repo, "--vm", "vm1", "--to", to, "--speed", "1M"], "--speed applies to the copy"),
        (["--to", to, "--qmp", "q", "--speed", "fast"], "'fast' is not a rate like 52428800 or 50M"),
    ]:
        bad = cli(capsys, "instant-restore", *argv)
        assert bad.code == 2 and words in bad.err, bad.err
    missing = cli(capsys, "instant-restore", "--to", tmp_path / "nothing", "--qmp", vm.qmp_socket)
    assert missing.code == 1 and "holds no instant restore" in missing.error_line


def test_recover_stops_the_servers_no_image_needs(
    backed_up_disk: BackedUpDisk, run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "disk0.qcow2"
    subprocess.run(["cp", "--sparse=always", str(backed_up_disk.base), str(image)], check=True)
    repo = tmp_path / "repo"
    backup_image(capsys, repo, image, "vm1")
    given_up, needed = tmp_path / "given-up", tmp_path / "needed"
    prepare(capsys, repo, "vm1", given_up)
    prepare(capsys, repo, "vm1", needed)
    pids = daemon_pids(instant_dir(run_root))
    assert len(pids) == 2
    subprocess.run(["rm", "-rf", str(given_up)], check=True)  # the user gave that restore up
    result = cli(capsys, "recover", "--json")
    assert result.code == 0, result.err
    [action] = result.json()["actions"]
    assert action.startswith(f"stopped the servers of the instant restore in {given_up}, which is gone")
    assert [pid for pid in pids if alive(pid)] == daemon_pids(instant_dir(run_root)) != []
    assert cli(capsys, "recover").out.strip().endswith("nothing to recover")  # still needed: kept

    # the copy ended while no vmsnap waited for it: the image no longer names its backing file
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "", str(needed / "disk0.qcow2")], check=True)
    result = cli(capsys, "recover", "--json")
    [action] = result.json()["actions"]
    assert action.startswith(
        f"stopped the servers of the instant restore in {needed}: every image is standalone"
    )
    assert not any(alive(pid) for pid in pids)
    assert servers_left(run_root) == [] and not (needed / STATE).exists()


def sha256sums(guest: LabGuest, root: str) -> dict[str, str]:
    out = guest.sh(f"cd {root} && sha256sum big.bin notes.txt").stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def sync_and_free(guest: LabGuest) -> None:
    """sync in the guest, flush QEMU's caches, and free the QMP and agent sockets for the CLI."""
    assert guest.agent.run("sync").exit_code == 0
    for drive in guest.drives:
        qemu_io(guest.machine.qmp(), drive.id, "flush")
    guest.machine.close()


@pytest.mark.guest
def test_the_lab_guest_boots_on_its_backup_and_a_killed_copy_resumes(
    lab_guest: LabGuest,
    lab_image: LabImage,
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = lab_guest  # shared by the session: its files go into a directory of their own, removed after
    try:
        source.sh(
            "mkdir -p /mnt/data/ir && dd if=/dev/urandom of=/mnt/data/ir/big.bin bs=1M count=8 2>/dev/null"
        )
        source.write_file("/mnt/data/ir/notes.txt", b"at backup time\n")
        want = sha256sums(source, "/mnt/data/ir")
        sync_and_free(source)
        repo = tmp_path / "repo"
        assert cli(capsys, "init", "--repo", repo, "--layout", "qcow2").code == 0  # compared with its images
        selector = ["--qmp", source.qmp_socket, "--agent", source.agent_socket]
        made = cli(capsys, "backup", "--repo", repo, *selector, "--json")
        assert made.code == 0, made.err
        vm, backup_id = made.json()["vm"], made.json()["backup_id"]
        source.write_file("/mnt/data/ir/notes.txt", b"after the backup\n")  # must not come back
    finally:
        source.sh("rm -rf /mnt/data/ir")
    to = tmp_path / "to"
    [disk] = prepare(capsys, repo, vm, to)["disks"]
    [server] = daemon_pids(instant_dir(run_root))
    drive = DriveSpec(Path(disk["image"]), "restored", serial="restored")  # not "data*": left unmounted
    with LabGuest(tmp_path / "restored", image=lab_image, data_disk_size=None, extra_drives=[drive]) as guest:
        argv = [VMSNAP, "instant-restore", "--to", str(to), "--qmp", str(guest.qmp_socket), "--speed", "1M"]
        child = subprocess.Popen(argv, stderr=subprocess.PIPE, env=dict(os.environ))
        kill_mid_copy(child, to, guest.qmp_socket, disk["name"])
        assert guest.agent.is_responding()
        guest.sh("mkdir -p /mnt/r && mount -o ro,noload /dev/disk/by-id/virtio-restored /mnt/r")
        assert sha256sums(guest, "/mnt/r/ir") == want  # the backed-up files, read while the copy runs
        assert guest.read_file("/mnt/r/ir/notes.txt") == b"at backup time\n"
        with QMPMonitor(guest.qmp_socket).connect() as qmp:
            job = qmp.job(JOB_PREFIX + disk["name"])
            assert job is not None and job.status == "running"  # the reads above happened mid-copy
        resumed = cli_on_a_terminal("instant-restore", "--to", to, "--qmp", guest.qmp_socket, "--speed", "8M")
        assert resumed.code == 0, resumed.err
        assert "MiB/s" in resumed.err and disk["name"] in resumed.err  # rich's bar on the terminal
        assert "on standalone images" in resumed.out
        assert not alive(server)
        assert sha256sums(guest, "/mnt/r/ir") == want
        guest.sh("umount /mnt/r")
    image = Path(disk["image"])
    assert "backing-filename" not in qemu_img_info(image)
    assert identical(image, repo / vm / backup_id / f"{disk['name']}.qcow2")
    assert not (to / STATE).exists() and servers_left(run_root) == []
