"""The ransomware drill, on a real S3 server (SeaweedFS) through the CLI: two hosts back up a VM each into
one locked, encrypted repository (a full backup and two incrementals each). Then, with the hosts' own
credentials, an attacker deletes every key under the prefix (batch deletes), tries to delete every version
(refused for each locked one), and overwrites the manifests and chunks with garbage. ``vmsnap list`` shows
the damage in one line (and a backup into the emptied prefix is refused); ``--as-of`` a time before the
attack lists, verifies and restores every backup byte-exact, mounts one, and ``copy --as-of`` rescues the
whole repository into a fresh locked bucket, where every backup verifies and restores again.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.immutable.buckets import BucketMaker, client, split
from tests.integration.restore.conftest import BackedUpDisk, empty_dirs
from tests.integration.restore.images import snapshot as tree_of
from tests.integration.restore.test_mount import assert_same_tree
from tests.integration.s3.hosts import Host, base_image, clones, ok_json, same_content, snapshot, write_random
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.repo.stores.s3 import S3Store

pytestmark = pytest.mark.timeout(900)


def attack(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """What ransomware with the host's credentials does: every key deleted in batches, every version it can
    find deleted (refusals counted), then garbage over every manifest and chunk. Returns counts."""
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    for start in range(0, len(keys), 1000):
        s3.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
        )
    versions = [
        {"Key": v["Key"], "VersionId": v["VersionId"]}
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
        for v in page.get("Versions", [])
    ]
    refused: list[dict[str, str]] = []
    for start in range(0, len(versions), 1000):
        answer = s3.delete_objects(
            Bucket=bucket,
            Delete={"Objects": versions[start : start + 1000], "Quiet": True},
            BypassGovernanceRetention=True,
        )
        refused += answer.get("Errors", [])
    overwritten = 0
    for key in keys:
        if key.endswith("/manifest.json") or "/chunks/" in key:
            s3.put_object(Bucket=bucket, Key=key, Body=b"encrypted by ransomware")
            overwritten += 1
    return {
        "keys": len(keys),
        "versions": len(versions),
        "refused": len(refused),
        "access_denied": sum(1 for e in refused if e.get("Code") == "AccessDenied"),
        "overwritten": overwritten,
        "refused_chunks": sum(1 for e in refused if "/chunks/" in e.get("Key", "")),
        "refused_manifests": sum(1 for e in refused if e.get("Key", "").endswith("/manifest.json")),
    }


def moment_before_attack() -> str:
    """A time after everything written so far and before anything written next (servers list seconds)."""
    time.sleep(1.1)
    moment = dt.datetime.now(dt.UTC).replace(microsecond=0)
    time.sleep(1.1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_ransomware_drill_everything_comes_back_as_of_before_the_attack(
    make_bucket: BucketMaker, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    place = make_bucket("locked")
    repo = f"s3://{place}/site"
    bucket, prefix = split(place)
    images = clones(base_image(tmp_path / "base.qcow2", size="64M", data_mib=12), ["vm-a", "vm-b"], at_mib=48)
    hosts = {vm: Host.make(f"hv-{vm[-1]}", tmp_path, s3_env) for vm in images}
    key = tmp_path / "repo.key"
    init = hosts["vm-a"].run(
        "init", "--repo", repo, "--lock-days", "1", "--encrypt", "--key-file", key, "--json"
    )
    assert ok_json(init)["lock"] == {"mode": "compliance", "days": 1.0, "extend_days": 1.0}
    made: list[tuple[str, str, Path]] = []
    for round_ in range(3):
        for vm, image in images.items():
            write_random(image, 20 + 4 * round_, 4)
            expected = snapshot(image, tmp_path / f"{vm}-{round_}.qcow2")
            extra = ["--incremental"] if round_ else []
            result = ok_json(
                hosts[vm].run(
                    "backup", "--repo", repo, "--key-file", key, "--image", image, "--name", vm,
                    "--strategy", "offline-bitmap", *extra, "--json",
                )
            )  # fmt: skip
            assert result["kind"] == ("incremental" if round_ else "full"), result
            made.append((vm, result["backup_id"], expected))
    before = moment_before_attack()

    s3 = client(s3_env)
    done = attack(s3, bucket, f"{prefix}/site/")
    s3.close()
    assert done["refused_chunks"] > 0 and done["refused_manifests"] == len(made), done
    assert done["access_denied"] == done["refused"], done  # refused because locked, nothing else

    damaged = hosts["vm-a"].run("list", "--repo", repo, "--key-file", key)
    assert damaged.code == 1
    assert "was deleted at" in damaged.error_line and "--as-of" in damaged.error_line, damaged.err
    gc = hosts["vm-a"].run("gc", "--repo", repo, "--key-file", key)
    assert gc.code == 1 and "was deleted at" in gc.error_line  # nothing can be collected: it does not open
    refused = hosts["vm-a"].run(
        "backup", "--repo", repo, "--key-file", key, "--image", images["vm-a"], "--name", "vm-a"
    )  # the emptied prefix is not taken for a new, empty place
    assert refused.code == 1 and "was deleted at" in refused.error_line, refused.err

    then = ["--repo", repo, "--key-file", key, "--as-of", before]
    listed = ok_json(hosts["vm-b"].run("list", *then, "--json"))
    assert sorted(b["backup_id"] for b in listed["backups"]) == sorted(b for _, b, _ in made)
    assert listed["damaged"] == []
    verified = ok_json(hosts["vm-b"].run("verify", *then, "--json"))
    assert verified["ok"] and len(verified["checked"]) == len(made)
    for vm, backup_id, expected in made:
        out = tmp_path / f"restored-{backup_id}"
        ok_json(hosts[vm].run("restore", *then, "--vm", vm, "--backup", backup_id, "--to", out, "--json"))
        assert same_content(out / f"{vm}.qcow2", expected), f"{vm}/{backup_id} did not come back"

    fresh = f"s3://{make_bucket('rescue')}/rescued"
    rescue = hosts["vm-a"]
    assert rescue.run("init", "--repo", fresh, "--lock-days", "2", "--lock-mode", "governance", "--encrypt",
                      "--key-file", key).code == 0  # fmt: skip
    copied = ok_json(rescue.run("copy", "--from", repo, "--as-of", before, "--to", fresh, "--key-file", key,
                                "--json"))  # fmt: skip
    assert sorted(b["backup_id"] for b in copied["backups"] if b["copied"]) == sorted(b for _, b, _ in made)
    assert ok_json(rescue.run("verify", "--repo", fresh, "--key-file", key, "--json"))["ok"]
    vm, backup_id, expected = made[-1]
    out = tmp_path / "from-the-rescue"
    ok_json(rescue.run("restore", "--repo", fresh, "--key-file", key, "--vm", vm, "--backup", backup_id,
                       "--to", out, "--json"))  # fmt: skip
    assert same_content(out / f"{vm}.qcow2", expected)
    listed = ok_json(rescue.run("list", "--repo", fresh, "--key-file", key, "--json"))["backups"]
    assert all(b["chunk_lock"] > before for b in listed)  # locked by the target's own policy
    store = S3Store.from_url(fresh)
    lock = store.retention(f"vms/{vm}/{backup_id}/manifest.json")
    store.close()
    assert lock is not None and lock.mode == "governance"


def test_mount_as_of_before_the_repository_was_emptied(
    backed_up_disk: BackedUpDisk,
    run_root: Path,
    make_bucket: BucketMaker,
    s3_env: SeaweedServer,
    tmp_path: Path,
) -> None:
    place = make_bucket("locked")
    repo = f"s3://{place}/site"
    host = Host.make("hv-m", tmp_path, s3_env, VMSNAP_RUN_DIR=str(run_root))
    image = tmp_path / "disk0.qcow2"
    image.write_bytes(backed_up_disk.base.read_bytes())
    assert host.run("init", "--repo", repo, "--lock-days", "1").code == 0
    made = ok_json(host.run("backup", "--repo", repo, "--image", image, "--name", "vm1", "--json"))
    before = moment_before_attack()
    s3 = client(s3_env)
    bucket, prefix = split(place)
    attack(s3, bucket, f"{prefix}/site/")
    s3.close()
    (target,) = empty_dirs(tmp_path, "mnt")
    mounted = host.run("mount", "--repo", repo, "--as-of", before, "--vm", "vm1", target, "--json")
    try:
        data = ok_json(mounted)
        assert data["backup_id"] == made["backup_id"]
        for name, tree in backed_up_disk.v1.items():
            assert_same_tree(tree_of(target / name), tree)
    finally:
        assert host.run("umount", target).code == 0
