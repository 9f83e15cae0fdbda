"""The chunks layout on a real S3 server (SeaweedFS): backup → change → incremental → restore → compare,
verify, prune and gc, through the CLI, encrypted: and nothing stored there names the VM, its disks or its
backups, or holds the data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import RunningVm
from tests.integration.cli_helpers import backup, capture, cli, restore_and_compare, write
from tests.integration.repo.layouts.helpers import SECRET
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.repo.chunks.keys import read_key_file
from vmsnap.repo.chunks.sealed import SealedStore
from vmsnap.repo.repository import Repository
from vmsnap.repo.retention import RetentionPolicy
from vmsnap.repo.stores.s3 import S3Store

DISKS = ("disk0", "disk1")


def test_backups_in_s3_restore_verify_prune_and_gc(
    two_disk_vm: RunningVm,
    s3_env: SeaweedServer,
    s3_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = two_disk_vm
    repo = f"s3://{BUCKET}/{s3_prefix}"
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(tmp_path / "s3.key"))
    Repository.init(repo, encrypt=True)
    write(vm, "disk0", "write -P 0x11 0 4M")
    write(vm, "disk1", "write -P 0x21 1M 2M")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET * 1024)
    write(vm, "disk1", f"write -s {secret} 30M {len(SECRET) * 1024}")
    first_expected = {d: capture(vm, d, tmp_path / f"1-{d}.qcow2") for d in DISKS}
    first = backup(capsys, vm, repo)
    write(vm, "disk0", "write -P 0x31 9M 64k")
    expected = {d: capture(vm, d, tmp_path / f"2-{d}.qcow2") for d in DISKS}
    second = backup(capsys, vm, repo, "--incremental")
    assert second["kind"] == "incremental"
    assert sum(d["chunks"]["new_chunks"] for d in second["disks"]) == 1
    restore_and_compare(capsys, repo, first["backup_id"], tmp_path / "r1", first_expected)
    restore_and_compare(capsys, repo, second["backup_id"], tmp_path / "r2", expected)
    assert cli(capsys, "verify", "--repo", repo).code == 0
    library = Repository.open(repo)
    assert library.prune("testvm", RetentionPolicy(keep_last=1)).removed in ((first["backup_id"],), ())
    library.gc()
    assert library.verify().ok
    restore_and_compare(capsys, repo, second["backup_id"], tmp_path / "r3", expected)
    # (the CLI's --repo is a Path, which makes the URL s3:/…: it still reaches the bucket, not a directory)
    assert not Path("s3:").exists()
    # sealed metadata on S3 too: no key and no object names the VM, a disk or a backup, or holds the data
    store = S3Store.from_url(repo)
    try:
        plain_key = "vms/testvm/" + second["backup_id"] + "/manifest.json"
        assert not store.exists(plain_key)
        assert SealedStore(store, lambda: read_key_file(tmp_path / "s3.key")).exists(plain_key)
        keys = [stored.key for stored in store.list("")]
        stored = b"".join(store.get(key) for key in keys)
    finally:
        store.close()
    words = [
        b"testvm",
        *(d.encode() for d in DISKS),
        first["backup_id"].encode(),
        second["backup_id"].encode(),
    ]
    words.append(SECRET)
    for word in words:
        assert word not in "\n".join(keys).encode() and word not in stored, word
