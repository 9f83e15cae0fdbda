"""Faults of a chunks repository on a real S3 server (SeaweedFS), through the CLI: the server killed in the
middle of a backup and of a gc, a chunk deleted behind vmsnap's back, refused credentials. Each failure is
one line without a secret; nothing half-done is visible; the next run finishes the job."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

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
from tests.integration.s3.seaweed import WRONG_SECRET_PROFILE, SeaweedServer
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.chunks.blob import chunk_key
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.repository import Repository

pytestmark = pytest.mark.timeout(600)


def _no_secret(text: str, server: SeaweedServer) -> None:
    for secret in server.secret_keys():
        assert secret not in text, "a secret key leaked"


def _two_disks(tmp_path: Path) -> tuple[list[str], dict[str, Path]]:
    """A powered-off VM ``vm-k`` with two disks of random data."""
    disks = {
        "disk0": base_image(tmp_path / "disk0.qcow2", data_mib=12),
        "disk1": base_image(tmp_path / "disk1.qcow2", data_mib=12),
    }
    return ["--image", str(disks["disk0"]), "--image", str(disks["disk1"]), "--name", "vm-k"], disks


def test_the_server_killed_mid_backup(own_seaweed: SeaweedServer, tmp_path: Path) -> None:
    """SIGKILL of the S3 server after the first disk's chunks and index are stored: the backup fails with
    one line, the images are left clean, no backup is visible; after a restart the next backup (which
    recovers the dead one's leftovers) succeeds, and verify passes."""
    url = f"s3://{BUCKET}/killed"
    host = Host.make("host-k", tmp_path, own_seaweed)
    vm, disks = _two_disks(tmp_path)
    first = ok_json(host.run("backup", "--repo", url, *vm, "--json"))
    for image in disks.values():
        write_random(image, 100, 4)
    running = host.start("backup", "--repo", url, *vm, env={CRASH_ENV: "stop:mid-export"})
    wait_stopped(running)
    own_seaweed.kill()
    resume(running)
    failed = finish(running)
    assert failed.code == 1, failed.err
    assert "cannot reach the S3 endpoint" in failed.error_line, failed.err
    _no_secret(failed.err, own_seaweed)
    assert failed.err.startswith("vmsnap: error:"), failed.err  # no other line
    assert all(image_is_clean(image) for image in disks.values())  # the bitmaps' bits given back

    own_seaweed.restart()
    listed = ok_json(host.run("list", "--repo", url, "--json"))["backups"]
    assert [b["backup_id"] for b in listed] == [first["backup_id"]]  # nothing half-visible
    expected = {name: snapshot(image, tmp_path / f"expected-{name}.qcow2") for name, image in disks.items()}
    again = host.run("backup", "--repo", url, *vm, "--json")
    made = ok_json(again)
    assert "recovered a dead run" in again.err, again.err
    assert host.run("verify", "--repo", url).code == 0
    out = tmp_path / "restored"
    ok_json(
        host.run(
            "restore", "--repo", url, "--vm", "vm-k", "--backup", made["backup_id"], "--to", out, "--json"
        )
    )
    assert all(same_content(out / f"{name}.qcow2", expected[name]) for name in disks)
    leftovers = ok_json(host.run("gc", "--repo", url, "--json"))
    assert leftovers["partial_backups"] == []  # the next backup had removed the dead one's objects


def test_the_server_killed_during_gc(own_seaweed: SeaweedServer, tmp_path: Path) -> None:
    """SIGKILL of the S3 server while gc sweeps (its generation replaced, nothing deleted yet): gc fails in
    one line (at the check of its lock before its first delete); after a restart every kept backup verifies
    and restores, and a second gc finishes the job."""
    url = f"s3://{BUCKET}/gc-killed"
    host = Host.make("host-g", tmp_path, own_seaweed)
    vm, disks = _two_disks(tmp_path)
    for _ in range(3):
        for image in disks.values():
            write_random(image, 100, 8)  # two new chunks per disk each time; the old ones become garbage
        ok_json(host.run("backup", "--repo", url, *vm, "--json"))
    expected = {name: snapshot(image, tmp_path / f"expected-{name}.qcow2") for name, image in disks.items()}
    assert host.run("prune", "--repo", url, "--vm", "vm-k", "--keep-last", "1").code == 0
    gc = host.start("gc", "--repo", url, "--json", env={CRASH_ENV: "stop:gc-mid-sweep"})
    wait_stopped(gc)
    own_seaweed.kill()
    resume(gc)
    failed = finish(gc)
    assert failed.code == 1 and "cannot reach the S3 endpoint" in failed.error_line, failed.err
    # where it stopped: before the check of its lock that comes before each group of deletes
    assert "for list of 'locks/collector/'" in failed.error_line, failed.error_line
    _no_secret(failed.err, own_seaweed)

    own_seaweed.restart()
    assert host.run("verify", "--repo", url).code == 0  # nothing a kept backup needs is gone
    out = tmp_path / "restored"
    ok_json(host.run("restore", "--repo", url, "--vm", "vm-k", "--to", out, "--json"))
    assert all(same_content(out / f"{name}.qcow2", expected[name]) for name in disks)
    second = ok_json(host.run("gc", "--repo", url, "--json"))  # takes the dead gc's lock over at once
    assert second["chunks_freed"] == 8  # two rounds' four chunks each, which the first gc had not deleted
    assert ok_json(host.run("gc", "--repo", url, "--json"))["chunks_freed"] == 0
    assert host.run("verify", "--repo", url).code == 0


def test_a_chunk_deleted_behind_vmsnaps_back(s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path) -> None:
    """verify names the missing chunk and every backup that uses it (of both VMs sharing it), and records it
    set aside so that every host forgets it: the next incremental of the first VM reads that place again and
    stores the chunk, after which the old backups of both are whole again too."""
    url = f"s3://{BUCKET}/{s3_prefix}"
    images = clones(base_image(tmp_path / "base.qcow2", data_mib=8), ["vm-a", "vm-b"])
    host = Host.make("host-v", tmp_path, s3_env)
    plugin = ["--strategy", "offline-bitmap"]
    made = {
        vm: ok_json(host.run("backup", "--repo", url, "--image", image, *plugin, "--json"))
        for vm, image in images.items()
    }
    index = ok_json(host.run("list", "--repo", url, "--json"))
    assert len(index["backups"]) == 2
    shared = _first_chunk_id(url, "vm-a", made["vm-a"]["backup_id"])
    client = boto3.session.Session().client("s3")
    try:
        client.delete_object(Bucket=BUCKET, Key=f"{s3_prefix}/{chunk_key(shared)}")
    finally:
        client.close()

    for fast in ([], ["--fast"]):
        result = host.run("verify", "--repo", url, *fast, "--json")
        assert result.code == 1, result.err
        problems = result.json()["problems"]
        assert {(p["vm"], p["backup_id"]) for p in problems} == {
            (vm, m["backup_id"]) for vm, m in made.items()
        }
        assert all(f"chunk {shared.hex()} is missing" in p["message"] for p in problems), problems
        assert shared.hex() in result.error_line
    expected = {vm: snapshot(image, tmp_path / f"expected-{vm}.qcow2") for vm, image in images.items()}
    stored = []
    for image in images.values():  # an incremental reads again the place whose chunk was set aside
        argv = ["backup", "--repo", url, "--image", image, *plugin, "--incremental", "--json"]
        again = ok_json(host.run(*argv))
        assert again["kind"] == "incremental"
        stored.append(again["disks"][0]["chunks"]["new_chunks"])
    assert stored == [1, 0]  # the first stores it again; the second finds it back
    assert host.run("verify", "--repo", url).code == 0  # the chunk is back: the old backups are whole again
    for vm, manifest in made.items():
        out = tmp_path / f"restored-{vm}"
        ok_json(
            host.run(
                "restore", "--repo", url, "--vm", vm, "--backup", manifest["backup_id"], "--to", out, "--json"
            )
        )
        assert same_content(out / f"{vm}.qcow2", expected[vm])
    later = host.run("backup", "--repo", url, "--image", images["vm-a"], *plugin, "--incremental", "--json")
    assert ok_json(later)["disks"][0]["chunks"]["bytes_read"] == 0  # nothing is set aside: nothing is read


def _first_chunk_id(url: str, vm: str, backup_id: str) -> bytes:
    repo = Repository.open(url)
    assert isinstance(repo, ChunksRepository)
    manifest = repo.get(vm, backup_id)
    index = repo.index(manifest, manifest.disks[0].name)
    return next(chunk_id for _, chunk_id in index.data_chunks())


def test_refused_credentials_fail_every_command_in_one_line(
    s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path
) -> None:
    """(The store's tests cover each way of refusing: a wrong secret, an unknown key, no permission.)"""
    url = f"s3://{BUCKET}/{s3_prefix}"
    host = Host.make("host-r", tmp_path, s3_env)
    image = base_image(tmp_path / "vm-r.qcow2", data_mib=4)
    ok_json(host.run("backup", "--repo", url, "--image", image, "--json"))
    before = snapshot(image, tmp_path / "before.qcow2")
    refused = Host.make("host-r", tmp_path, s3_env, AWS_PROFILE=WRONG_SECRET_PROFILE)
    for argv in (
        ["backup", "--repo", url, "--image", str(image)],
        ["list", "--repo", url],
        ["verify", "--repo", url],
        ["gc", "--repo", url],
        ["init", "--repo", f"{url}-new"],
    ):
        result = refused.run(*argv)
        assert result.code == 1, (argv, result.err)
        assert "S3 refused the credentials" in result.error_line, result.err
        _no_secret(result.err + result.out, s3_env)
    assert image_is_clean(image) and same_content(image, before)
