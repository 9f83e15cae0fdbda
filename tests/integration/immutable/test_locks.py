"""A locked repository's life on a real S3 server (SeaweedFS), through the CLI: every object a backup
writes is locked, and every chunk a backup names stays locked at least as long as the backup (checked
object by object with HeadObject), with the chunks' locks extended in one batch about every
``--lock-extend-days`` and not at every backup (requests counted); prune keeps what a lock holds and says
until when; gc deletes only versions that are unlocked and unreferenced — while locked nothing is even
tried (a refusal would fail it) — and frees them once the locks end (short locks here: seconds); leases'
old versions are cleaned by gc; gc stops when a locked backup was deleted or a chunk overwritten behind
vmsnap's back; an unlocked repository in a versioned bucket is read as of a time and collected for good;
verify moves a damaged chunk aside under a delete marker (deleting no locked version) and the next backup
stores it again.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.cli_helpers import cli
from tests.integration.immutable.buckets import BucketMaker, client, split
from tests.integration.s3.hosts import (
    Host,
    base_image,
    clones,
    finish,
    ok_json,
    same_content,
    snapshot,
    write_random,
)
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.processes import CRASH_ENV
from vmsnap.repo.chunks.blob import chunk_key
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.repository import Repository
from vmsnap.repo.stores.history import parse_time
from vmsnap.repo.stores.s3 import PROCESS_REQUESTS

pytestmark = pytest.mark.timeout(900)
DAY = 86400.0


def _versions(s3: Any, bucket: str, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """key → its versions and delete markers (as boto3 lists them)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            found.setdefault(entry["Key"][len(prefix) :], []).append(entry)
    return found


def _check_locked_as_long_as_its_backups(repo_url: str) -> int:
    """Every chunk each backup names is locked at least until the backup's manifest is (HeadObject of each);
    returns how many chunks were checked."""
    repo = Repository.open(repo_url)
    assert isinstance(repo, ChunksRepository)
    store = repo.store
    checked = 0
    for manifest in repo.backups():
        own = store.retention(f"vms/{manifest.vm}/{manifest.backup_id}/manifest.json")
        assert own is not None and manifest.chunk_lock is not None
        assert parse_time(manifest.chunk_lock) >= own.until, manifest.backup_id
        for record in manifest.disks:
            for chunk_id in repo.index(manifest, record.name).referenced():
                lock = store.retention(chunk_key(chunk_id))
                assert lock is not None and lock.until >= parse_time(manifest.chunk_lock), chunk_id.hex()
                checked += 1
    store.close()
    return checked


def _wait_until(moment: dt.datetime) -> None:
    left = (moment - dt.datetime.now(dt.UTC)).total_seconds()
    if left > 0:
        time.sleep(left + 1.0)


def test_prune_and_gc_leave_what_a_lock_holds_and_free_it_once_the_lock_ends(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    place = make_bucket("locked")
    repo = f"s3://{place}/site"
    bucket, prefix = split(place)
    host = Host.make("hv-l", tmp_path, s3_env)
    # a lock of 69 s (every step until the first prune must fit in it), chunks 9 s longer
    assert host.run("init", "--repo", repo, "--lock-days", "0.0008", "--lock-extend-days", "0.0001").code == 0
    image = base_image(tmp_path / "vm-l.qcow2", size="64M", data_mib=8)
    made = []
    for _ in range(3):
        write_random(image, 16, 4)  # each backup's own chunk: garbage once that backup is pruned
        made.append(ok_json(host.run("backup", "--repo", repo, "--image", image, "--json"))["backup_id"])
    expected = snapshot(image, tmp_path / "expected.qcow2")
    write_random(image, 40, 4)
    killed = finish(
        host.start("backup", "--repo", repo, "--image", image, env={CRASH_ENV: "before-manifest"})
    )
    assert killed.code == -9, killed.err  # its chunk and index stay, locked, named by no manifest
    host.die()
    unlocked = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.0009 * DAY)  # every lock set so far has ended
    assert _check_locked_as_long_as_its_backups(repo) >= 4

    planned = ok_json(host.run("prune", "--repo", repo, "--keep-last", "1", "--dry-run", "--json"))
    [plan] = planned["pruned"]
    assert plan["removed"] == [] and sorted(plan["locked"]) == made[:2]
    dry = host.run("prune", "--repo", repo, "--keep-last", "1", "--dry-run")
    assert dry.out.count("removable from") == 2, dry.out
    [kept] = ok_json(host.run("prune", "--repo", repo, "--keep-last", "1", "--json"))["pruned"]
    assert kept["removed"] == [] and len(kept["locked"]) == 2
    assert len(ok_json(host.run("list", "--repo", repo, "--json"))["backups"]) == 3

    s3 = client(s3_env)
    manifest = f"{prefix}/site/vms/vm-l/{made[0]}/manifest.json"
    [version] = _versions(s3, bucket, manifest)[""]
    with pytest.raises(ClientError) as refused:  # the host's credentials cannot delete it
        s3.delete_object(Bucket=bucket, Key=manifest, VersionId=version["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"

    held = ok_json(host.run("gc", "--repo", repo, "--json"))  # a refused delete would fail it: none tried
    assert held["locked_versions"] >= 2 and held["chunks_freed"] == 0, held  # the killed run's, locked
    assert "kept while locked" in host.run("gc", "--repo", repo, "--dry-run").out

    _wait_until(unlocked)
    [pruned] = ok_json(host.run("prune", "--repo", repo, "--keep-last", "1", "--json"))["pruned"]
    assert pruned["removed"] == made[:2] and pruned["locked"] == {}
    freed = ok_json(host.run("gc", "--repo", repo, "--json"))
    assert freed["chunks_freed"] == 3 and freed["bytes_freed"] > 12 << 20, freed  # 2 pruned, 1 killed run's
    assert freed["locked_versions"] == 0 and freed["partial_backups"], freed
    left = _versions(s3, bucket, f"{prefix}/site/")
    assert not [k for k in left if made[0] in k or made[1] in k], "versions of pruned backups stayed"
    assert all(len(v) <= 2 for k, v in left.items() if k.startswith("locks/")), "old lease versions stayed"
    assert all(len(v) == 1 for k, v in left.items() if k.startswith("chunks/"))
    s3.close()
    assert host.run("verify", "--repo", repo).code == 0
    out = tmp_path / "restored"
    ok_json(host.run("restore", "--repo", repo, "--vm", "vm-l", "--to", out, "--json"))
    assert same_content(out / "vm-l.qcow2", expected)


def _counted(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[Any, Counter[tuple[str, str]]]:
    before = PROCESS_REQUESTS.snapshot()
    result = cli(capsys, *argv)
    assert result.code == 0, result.err
    return result.json(), PROCESS_REQUESTS.snapshot() - before


def test_reused_chunks_get_their_locks_extended_in_one_batch_now_and_then_not_at_every_backup(
    make_bucket: BucketMaker,
    s3_env: SeaweedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMSNAP_STATE_DIR", str(tmp_path / "state"))
    repo = f"s3://{make_bucket('locked')}/site"
    # a lock of 43 s; chunks locked 26 s longer, so extended about every 26 s
    assert (
        cli(capsys, "init", "--repo", repo, "--lock-days", "0.0005", "--lock-extend-days", "0.0003").code == 0
    )
    images = clones(base_image(tmp_path / "base.qcow2", size="64M", data_mib=16), ["vm-1", "vm-2"], at_mib=32)

    def backup(vm: str, *extra: str) -> tuple[Any, Counter[tuple[str, str]]]:
        return _counted(
            capsys, "backup", "--repo", repo, "--image", images[vm], "--strategy", "offline-bitmap", *extra,
            "--json",
        )  # fmt: skip

    full, requests = backup("vm-1")
    assert full["disks"][0]["chunks"]["new_chunks"] == 5  # 4 of the template's, 1 of its own
    assert requests[("PutObjectRetention", "chunks")] == 0  # stored with their lock: no extension
    assert requests[("PutObjectRetention", "vmsnap-repo.json")] == 1  # the marker, at every backup
    write_random(images["vm-1"], 36, 1)
    incremental, requests = backup("vm-1", "--incremental")
    assert incremental["kind"] == "incremental"
    assert requests[("PutObjectRetention", "chunks")] == 0  # the parent's chunk_lock covers them
    clone, requests = backup("vm-2")  # a full backup of another VM: 4 of its 5 chunks are vm-1's
    assert clone["disks"][0]["chunks"]["reused_chunks"] == 4
    assert requests[("PutObjectRetention", "chunks")] == 4  # chunks found elsewhere: extended, once
    assert _check_locked_as_long_as_its_backups(repo) == 5 + 6 + 5

    time.sleep(27)  # past the extend period: the parent's chunk_lock no longer reaches a new backup's lock
    write_random(images["vm-1"], 36, 1)
    later, requests = backup("vm-1", "--incremental")
    assert requests[("PutObjectRetention", "chunks")] == 5  # all its chunks but the new one, in one batch
    again, requests = backup("vm-1", "--incremental")
    assert requests[("PutObjectRetention", "chunks")] == 0  # and not again at the next backup
    assert _check_locked_as_long_as_its_backups(repo) == 5 + 6 + 5 + 6 + 6
    assert later["kind"] == again["kind"] == "incremental"


def _write_once_versions(s3: Any, bucket: str, prefix: str) -> dict[str, list[str]]:
    """key → its version ids, of every key but the mutable ones (leases, gc generation)."""
    return {
        key: sorted(str(v["VersionId"]) for v in versions)
        for key, versions in _versions(s3, bucket, prefix).items()
        if not key.startswith("locks/") and key != "gc-generation"
    }


def test_gc_stops_when_a_locked_backup_was_deleted_or_a_chunk_overwritten_behind_its_back(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    bucket, root = split(make_bucket("locked"))
    host = Host.make("hv-t", tmp_path, s3_env)
    image = base_image(tmp_path / "vm-t.qcow2", size="64M", data_mib=8)
    s3 = client(s3_env)
    for name, tamper in (("deleted", "manifest"), ("overwritten", "chunk")):
        prefix = f"{root}/{name}"
        repo = f"s3://{bucket}/{prefix}"
        assert host.run("init", "--repo", repo, "--lock-days", "1").code == 0
        made = ok_json(host.run("backup", "--repo", repo, "--image", image, "--json"))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]]
        if tamper == "manifest":
            s3.delete_object(Bucket=bucket, Key=f"{prefix}/vms/vm-t/{made['backup_id']}/manifest.json")
        else:
            chunk = next(k for k in keys if "/chunks/" in k)
            s3.put_object(Bucket=bucket, Key=chunk, Body=b"not a chunk")
        before = _write_once_versions(s3, bucket, f"{prefix}/")
        stopped = host.run("gc", "--repo", repo)
        assert stopped.code == 1 and "gc stopped before deleting anything" in stopped.error_line, stopped.err
        assert ("deleted at" if tamper == "manifest" else "overwritten at") in stopped.error_line
        assert "--as-of" in stopped.error_line
        assert _write_once_versions(s3, bucket, f"{prefix}/") == before  # nothing deleted
    s3.close()


def test_an_unlocked_repository_in_a_versioned_bucket_is_read_as_of_and_collected_for_good(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    place = make_bucket("versioned")
    repo = f"s3://{place}/site"
    bucket, prefix = split(place)
    host = Host.make("hv-v", tmp_path, s3_env)
    image = base_image(tmp_path / "vm-v.qcow2", size="64M", data_mib=8)
    first = ok_json(host.run("backup", "--repo", repo, "--image", image, "--json"))["backup_id"]
    expected = snapshot(image, tmp_path / "first.qcow2")
    time.sleep(1.1)
    moment = dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)
    write_random(image, 0, 8)  # the first backup's two chunks both change
    ok_json(host.run("backup", "--repo", repo, "--image", image, "--json"))
    assert host.run("prune", "--repo", repo, "--keep-last", "1").code == 0
    # pruned: a delete marker over its manifest; as of before, it is there
    then = ["--repo", repo, "--as-of", moment]
    assert [b["backup_id"] for b in ok_json(host.run("list", *then, "--json"))["backups"]] == [first]
    ok_json(host.run("restore", *then, "--vm", "vm-v", "--to", tmp_path / "then", "--json"))
    assert same_content(tmp_path / "then" / "vm-v.qcow2", expected)
    freed = ok_json(host.run("gc", "--repo", repo, "--json"))
    assert freed["chunks_freed"] == 2 and freed["versions_freed"] > 2 and freed["locked_versions"] == 0, freed
    s3 = client(s3_env)
    assert not [
        k for k in _versions(s3, bucket, f"{prefix}/site/") if first in k
    ]  # no version left: the space is free
    s3.close()
    assert ok_json(host.run("list", *then, "--json"))["backups"] == []  # nothing locked it: gone for good


def test_verify_moves_a_damaged_chunk_aside_under_a_delete_marker_and_the_next_backup_heals_it(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    bucket, prefix = split(make_bucket("locked"))
    repo = f"s3://{bucket}/{prefix}"
    host = Host.make("hv-q", tmp_path, s3_env)
    image = base_image(tmp_path / "vm-q.qcow2", size="64M", data_mib=8)
    assert host.run("init", "--repo", repo, "--lock-days", "1").code == 0
    first = ok_json(host.run("backup", "--repo", repo, "--image", image, "--json"))["backup_id"]
    expected = snapshot(image, tmp_path / "expected.qcow2")
    s3 = client(s3_env)
    chunk = next(k for k in _versions(s3, bucket, f"{prefix}/") if k.startswith("chunks/"))
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{chunk}", Body=b"rot")  # a damaged chunk (over a locked one)
    found = host.run("verify", "--repo", repo)
    assert found.code == 1 and chunk.rsplit("/", 1)[1] in found.err, found.err
    versions = _versions(s3, bucket, f"{prefix}/")[chunk]
    # moved aside: a delete marker over it; no locked version deleted (nor even tried: verify would fail)
    assert [("Size" in v) for v in versions if v["IsLatest"]] == [False]  # the marker is current
    assert sorted(v["Size"] for v in versions if "Size" in v)[0] == 3 and len(versions) == 3
    assert any(k.startswith("quarantine/") for k in _versions(s3, bucket, f"{prefix}/"))
    again = ok_json(host.run("backup", "--repo", repo, "--image", image, "--json"))
    assert again["disks"][0]["chunks"]["new_chunks"] >= 1  # stored again over the delete marker
    assert ok_json(host.run("verify", "--repo", repo, "--json"))["ok"]
    out = tmp_path / "restored"
    ok_json(host.run("restore", "--repo", repo, "--vm", "vm-q", "--backup", first, "--to", out, "--json"))
    assert same_content(out / "vm-q.qcow2", expected)  # the old backup restores again
    swept = ok_json(host.run("gc", "--repo", repo, "--json"))  # no tampering seen: the marker is vmsnap's
    assert swept["locked_versions"] >= 1, swept  # the original, locked, stays
    left = _versions(s3, bucket, f"{prefix}/")
    # the delete marker went (unlocked); the original is locked, and the damaged version (younger than the
    # lock's days) is taken for locked without asking: both stay until a later gc
    assert all("Size" in v for v in left[chunk]) and len(left[chunk]) == 3
    assert [v["Size"] > 3 for v in left[chunk] if v["IsLatest"]] == [True]
    assert not [k for k, vs in left.items() if k.startswith("quarantine/")]  # its record: gone for good
    s3.close()
