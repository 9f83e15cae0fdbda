"""Many hosts, one locked repository, on a real S3 server (SeaweedFS), through the CLI: three hosts back up
their VMs (clones of one template: they share chunks) at once, full then incremental, while a fourth runs
gc; one backup is killed half-way and its host's next backup goes through; every chunk stays locked as long
as every backup naming it, gc never tries a locked version, every backup restores. And a lock extension cut
short by a dead server (SIGKILL while a backup extends its chunks' locks) fails that backup in one line and
is done again by the next one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.immutable.buckets import BucketMaker, create
from tests.integration.immutable.test_locks import _check_locked_as_long_as_its_backups
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
from vmsnap.repo.stores.s3 import S3Store

pytestmark = pytest.mark.timeout(900)


def test_hosts_back_up_into_one_locked_repository_at_once_with_gc_and_a_killed_backup(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    repo = f"s3://{make_bucket('locked')}/site"
    vms = ["vm-1", "vm-2", "vm-3"]
    images = clones(base_image(tmp_path / "base.qcow2", size="64M", data_mib=16), vms, at_mib=32)
    short = {"VMSNAP_LEASE_SECONDS": "10"}  # the killed host's lease expires soon for the others
    hosts = {vm: Host.make(f"hv-{vm[-1]}", tmp_path, s3_env, **short) for vm in vms}
    gc_host = Host.make("hv-gc", tmp_path, s3_env, **short)
    assert gc_host.run("init", "--repo", repo, "--lock-days", "1").code == 0
    latest: dict[str, tuple[str, Path]] = {}
    freed_rounds = []
    for round_ in range(3):
        expected = {}
        for vm, image in images.items():
            write_random(image, 40 + 4 * round_, 2)
            expected[vm] = snapshot(image, tmp_path / f"{vm}-{round_}.qcow2")
        extra = ["--incremental"] if round_ else []
        env = {CRASH_ENV: "mid-export"} if round_ == 1 else {}  # round two: vm-3's backup is killed
        running = {
            vm: hosts[vm].start(
                "backup",
                "--repo",
                repo,
                "--image",
                image,
                "--strategy",
                "offline-bitmap",
                *extra,
                "--json",
                env=env if vm == "vm-3" else {},
            )
            for vm, image in images.items()
        }
        gc = gc_host.start("gc", "--repo", repo, "--wait", "300", "--json")
        for vm, process in running.items():
            result = finish(process)
            killed = vm == "vm-3" and round_ == 1
            while result.code == 1 and "collecting garbage" in result.error_line:  # gc had the lock first:
                time.sleep(1)  # refused, never broken; again once it is done
                args = ["--image", images[vm], "--strategy", "offline-bitmap", *extra, "--json"]
                result = hosts[vm].run("backup", "--repo", repo, *args, env=env if killed else {})
            if killed:
                assert result.code == -9, result.err
                hosts[vm].die()
                continue
            made = ok_json(result)
            latest[vm] = (made["backup_id"], expected[vm])
        freed_rounds.append(ok_json(finish(gc)))  # a refused delete of a locked version would fail gc
    assert all(not r["chunks_freed"] for r in freed_rounds)  # nothing unreferenced and unlocked yet
    listed = ok_json(gc_host.run("list", "--repo", repo, "--json"))["backups"]
    assert {b["vm"] for b in listed} == set(vms) and len(listed) == 8  # 3 + 2 + 3: vm-3's killed one is not
    assert _check_locked_as_long_as_its_backups(repo) > 0
    assert ok_json(gc_host.run("verify", "--repo", repo, "--json"))["ok"]
    for vm, (backup_id, expected_image) in latest.items():
        out = tmp_path / f"restored-{vm}"
        ok_json(hosts[vm].run("restore", "--repo", repo, "--vm", vm, "--backup", backup_id, "--to", out,
                              "--json"))  # fmt: skip
        assert same_content(out / f"{vm}.qcow2", expected_image), vm
    assert all(image_is_clean(image) for image in images.values())


def test_a_lock_extension_cut_short_by_a_dead_server_is_done_again_by_the_next_backup(
    own_seaweed: SeaweedServer, tmp_path: Path
) -> None:
    bucket = create(own_seaweed, "locked-cut-short")
    repo = f"s3://{bucket}/site"
    host = Host.make("hv-x", tmp_path, own_seaweed)
    # a lock of 60 s; chunks 9 s longer: a backup 10 s after the first extends every chunk it reuses
    assert host.run("init", "--repo", repo, "--lock-days", "0.0007", "--lock-extend-days", "0.0001").code == 0
    image = base_image(tmp_path / "vm-x.qcow2", size="64M", data_mib=24)
    args = ["backup", "--repo", repo, "--image", image, "--strategy", "offline-bitmap", "--json"]
    first = ok_json(host.run(*args))
    assert first["disks"][0]["chunks"]["new_chunks"] == 6
    time.sleep(10)
    write_random(image, 40, 1)
    cut = host.start(*args, "--incremental", env={CRASH_ENV: "stop:lock-extension-half"})
    wait_stopped(cut)  # three of the six chunks extended, three not
    own_seaweed.kill()
    resume(cut)
    failed = finish(cut)
    assert failed.code == 1 and "S3" in failed.error_line, failed.err
    own_seaweed.restart()
    store = S3Store.from_url(repo)
    manifests = [s.key for s in store.list("vms/") if s.key.endswith("manifest.json")]
    store.close()
    assert manifests == [f"vms/vm-x/{first['backup_id']}/manifest.json"]  # the cut backup is not sealed
    assert image_is_clean(image)
    again = ok_json(host.run(*args, "--incremental"))
    # full: the cut run's cleanup could not reach the server, so this run recovered it and the dirty bitmap
    # could not be trusted; its previous backup is the first all the same, whose chunk_lock is too short
    assert again["disks"][0]["chunks"]["reused_chunks"] == 7  # the cut run's new chunk is there too
    assert _check_locked_as_long_as_its_backups(repo) == 6 + 7
    out = tmp_path / "restored"
    ok_json(host.run("restore", "--repo", repo, "--vm", "vm-x", "--to", out, "--json"))
    assert same_content(out / "vm-x.qcow2", image)
