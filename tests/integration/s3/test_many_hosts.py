"""Many hosts, one S3 repository (SeaweedFS): hosts are ``vmsnap`` processes with host names, working and
state directories of their own (tests/integration/s3/hosts.py). They create the repository and its chunks
racing each other, deduplicate against each other, hold per-VM leases that expire when a host dies (and that
``recover`` on the dead host's own machine clears at once), and a gc racing their backups loses nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.repo.layouts.helpers import held_leases
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.hosts import (
    Host,
    base_image,
    clones,
    finish,
    image_is_clean,
    ok_json,
    resume,
    same_content,
    snapshot,
    wait_stopped,
    write_random,
)
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.chunks.leases import Leases, writer_series
from vmsnap.repo.stores.s3 import S3Store

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def repo_url(s3_env: SeaweedServer, s3_prefix: str) -> str:
    return f"s3://{BUCKET}/{s3_prefix}"


@pytest.fixture
def store(repo_url: str, s3_env: SeaweedServer) -> S3Store:
    return S3Store.from_url(repo_url)


def _image_args(image: Path, vm: str) -> list[str]:
    return ["--image", str(image), "--name", vm]


def test_hosts_race_to_create_the_repository_and_the_same_chunks_and_share_them(
    repo_url: str, store: S3Store, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    """Two hosts' first backups race to create the repository (a fresh prefix) and, stopped after their
    snapshots and let go at once, to store the same 12 chunks: both succeed, with one repository, and every
    chunk is stored once. A third host later stores only its clone's own chunk (< 5 % new bytes)."""
    images = clones(base_image(tmp_path / "base.qcow2", data_mib=48), ["vm-a", "vm-b", "vm-c"])
    hosts = {name: Host.make(f"host-{name[-1]}", tmp_path, s3_env) for name in images}
    racing = [
        hosts[vm].start("backup", "--repo", repo_url, *_image_args(images[vm], vm), "--json",
                        env={CRASH_ENV: "stop:after-thaw"})
        for vm in ("vm-a", "vm-b")
    ]  # fmt: skip
    for process in racing:
        wait_stopped(process)
    for process in racing:
        resume(process)
    made = [ok_json(finish(process)) for process in racing]
    new_chunks = [disk["chunks"]["new_chunks"] for result in made for disk in result["disks"]]
    assert sum(new_chunks) == 12 + 2, new_chunks  # the shared 12 once, and each clone's own chunk
    assert len([o for o in store.list("chunks/")]) == 14
    repo_ids = {tuple(p.name for p in (hosts[vm].state_dir / "repos").iterdir()) for vm in ("vm-a", "vm-b")}
    assert len(repo_ids) == 1 and len(next(iter(repo_ids))) == 1  # both hosts use the one repository

    third = ok_json(
        hosts["vm-c"].run("backup", "--repo", repo_url, *_image_args(images["vm-c"], "vm-c"), "--json")
    )
    disk = third["disks"][0]["chunks"]
    assert disk["new_chunks"] == 1 and disk["new_bytes"] < 0.05 * disk["logical_size"], disk
    assert hosts["vm-c"].run("verify", "--repo", repo_url).code == 0
    out = tmp_path / "restored"
    ok_json(hosts["vm-c"].run("restore", "--repo", repo_url, "--vm", "vm-b", "--to", out, "--json"))
    assert same_content(out / "vm-b.qcow2", images["vm-b"])


def test_racing_inits_make_exactly_one_repository(
    repo_url: str, store: S3Store, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    hosts = [Host.make(f"host-{n}", tmp_path, s3_env) for n in range(4)]
    processes = [
        host.start("init", "--repo", repo_url, "--encrypt", "--key-file", host.workdir / "repo.key")
        for host in hosts
    ]
    results = [finish(process) for process in processes]
    winners = [n for n, result in enumerate(results) if result.code == 0]
    assert len(winners) == 1, [r.err for r in results]
    for n, result in enumerate(results):
        if n not in winners:
            assert result.code == 1 and "is a vmsnap repository already" in result.error_line, result.err
    keys = [host.workdir / "repo.key" for host in hosts]
    assert [k.exists() for k in keys] == [n in winners for n in range(4)]  # the losers' keys are gone
    assert [o.key for o in store.list("")] == ["vmsnap-repo.json"]
    winner = hosts[winners[0]]
    assert winner.run("list", "--repo", repo_url, "--key-file", keys[winners[0]], "--json").code == 0


def test_a_dead_hosts_lease_expires_and_recover_on_that_host_clears_it_at_once(
    repo_url: str, store: S3Store, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    image = base_image(tmp_path / "vm-x.qcow2", data_mib=16)
    args = ["--repo", repo_url, *_image_args(image, "vm-x")]
    # long enough that host B's refused attempt meets the lease alive: between A's lease and B's check lie
    # A's run up to its death and a vmsnap start, 19 s once on a machine with ten runnable processes per
    # core (4 s and 15 s leases expired first there); the test waits for the expiry afterwards
    host_a = Host.make("host-a", tmp_path, s3_env, VMSNAP_LEASE_SECONDS="30")
    host_b = Host.make("host-b", tmp_path, s3_env)
    ok_json(host_b.run("backup", *args, "--json"))

    # host A dies (SIGKILL) in the middle of a backup, holding the VM's lease
    dead = host_a.run("backup", *args, env={CRASH_ENV: "mid-export"})
    assert dead.code == -9, dead.err
    host_a.die()  # and the qemu-nbd serving the image with it, as when a host dies
    lease = Leases(store).holder(writer_series("vm-x"))
    assert lease is not None and lease.host == "host-a"
    refused = host_b.run("backup", *args)
    assert refused.code == 1 and "on host host-a" in refused.error_line, refused.err
    while time.time() <= lease.expires:  # another host may take it over only once it has expired
        time.sleep(0.2)
    taken = host_b.run("backup", *args, "--json")
    assert "recovered a dead run: removed partial backup" in taken.err, taken.err
    ok_json(taken)
    assert ok_json(host_a.run("recover", *args, "--json"))["clean"] is False  # A's journal: undone
    assert not list(host_a.state_dir.rglob("journal.json"))

    # again, with a lease that would live two minutes: recover on host A clears it at once
    dead = host_a.run("backup", *args, env={CRASH_ENV: "mid-export", "VMSNAP_LEASE_SECONDS": "120"})
    assert dead.code == -9, dead.err
    assert host_b.run("backup", *args).code == 1
    recovered = ok_json(host_a.run("recover", *args, "--json"))
    assert not recovered["clean"]
    assert held_leases(store) == [] and not list(host_a.state_dir.rglob("journal.json"))
    assert image_is_clean(image)
    expected = snapshot(image, tmp_path / "expected.qcow2")
    last = ok_json(host_b.run("backup", *args, "--json"))
    out = tmp_path / "restored"
    ok_json(
        host_a.run(
            "restore",
            "--repo",
            repo_url,
            "--vm",
            "vm-x",
            "--backup",
            last["backup_id"],
            "--to",
            out,
            "--json",
        )
    )
    assert same_content(out / "vm-x.qcow2", expected)
    assert host_a.run("verify", "--repo", repo_url).code == 0


def _backup_round(
    hosts: dict[str, Host], images: dict[str, Path], repo_url: str, gc_host: Host, mode: str, tmp_path: Path
) -> tuple[dict[str, tuple[str, Path]], int]:
    """Both hosts back their VM up while a third host runs gc (started with them, or while they are
    stopped holding their leases); returns vm → (backup id, expected content) of the backups made, and the
    chunks gc freed."""
    number = len(list(tmp_path.glob("round-*")))
    (tmp_path / f"round-{number}").mkdir()  # each round's expected content apart: two rounds share a mode
    expected = {
        vm: snapshot(image, tmp_path / f"round-{number}" / f"{vm}-{mode}.qcow2")
        for vm, image in images.items()
    }
    env = {CRASH_ENV: "stop:after-thaw"} if mode == "held" else {}
    extra = {"vm-a": ["--strategy", "offline-bitmap", "--incremental"], "vm-b": []}
    running = {
        vm: hosts[vm].start(
            "backup", "--repo", repo_url, *_image_args(image, vm), *extra[vm], "--json", env=env
        )
        for vm, image in images.items()
    }
    if mode == "held":
        for process in running.values():
            wait_stopped(process)
    gc = gc_host.start("gc", "--repo", repo_url, "--wait", "120", "--json")
    if mode == "held":
        time.sleep(1.0)  # gc is in: it sees their leases and waits
        for process in running.values():
            resume(process)
    made = {}
    for vm, process in running.items():
        result = finish(process)
        if result.code == 0:
            made[vm] = (result.json()["backup_id"], expected[vm])
        else:  # gc had the lock first: refused, never broken
            assert "collecting garbage" in result.error_line, result.err
    gc_result = finish(gc)
    assert gc_result.code == 0, gc_result.err
    return made, int(gc_result.json()["chunks_freed"])


def test_gc_racing_backups_of_several_hosts_loses_nothing(
    repo_url: str, store: S3Store, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    images = clones(base_image(tmp_path / "base.qcow2", data_mib=24), ["vm-a", "vm-b"])
    hosts = {vm: Host.make(f"host-{vm[-1]}", tmp_path, s3_env) for vm in images}
    gc_host = Host.make("host-gc", tmp_path, s3_env)
    for vm, image in images.items():
        # a chunk of the first backup's own, garbage once that backup is pruned (before the rounds), so
        # every round's gc has something to free while the backups run, whichever backups it refuses
        write_random(image, 64, 2)
        ok_json(hosts[vm].run("backup", "--repo", repo_url, *_image_args(image, vm), "--json"))
        write_random(image, 64, 2)
        ok_json(hosts[vm].run("backup", "--repo", repo_url, *_image_args(image, vm), "--json"))
        assert gc_host.run("prune", "--repo", repo_url, "--vm", vm, "--keep-last", "1").code == 0
    made: list[tuple[str, str, Path]] = []
    freed = 0
    for mode in ("at-once", "held", "at-once"):
        for image in images.values():
            write_random(image, 64, 2)  # new data in every round: the old chunk is garbage once pruned
        round_made, round_freed = _backup_round(hosts, images, repo_url, gc_host, mode, tmp_path)
        freed += round_freed
        made += [(vm, backup_id, expected) for vm, (backup_id, expected) in round_made.items()]
        for vm in images:  # prune from the gc host: what the pruned backups alone used is garbage now
            assert gc_host.run("prune", "--repo", repo_url, "--vm", vm, "--keep-last", "2").code == 0
    assert {vm for vm, _, _ in made} == set(images), "no backup of a VM got through in three rounds"
    assert freed > 0, "no gc of the rounds deleted anything: it raced nothing"
    assert gc_host.run("verify", "--repo", repo_url).code == 0
    kept = {b["backup_id"] for b in ok_json(gc_host.run("list", "--repo", repo_url, "--json"))["backups"]}
    checked = 0
    for vm, backup_id, expected in made:
        if backup_id not in kept:
            continue
        out = tmp_path / f"restored-{backup_id}"
        ok_json(hosts[vm].run("restore", "--repo", repo_url, "--vm", vm, "--backup", backup_id, "--to", out,
                              "--json"))  # fmt: skip
        assert same_content(out / f"{vm}.qcow2", expected), f"{vm}/{backup_id} lost data"
        checked += 1
    assert checked >= len(images)
    assert all(image_is_clean(image) for image in images.values())
