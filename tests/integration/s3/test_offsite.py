"""Off-site through the CLI, as the README shows it: backups in a local repository, ``copy`` to an encrypted
S3 repository (re-encoded with its key) and back into a new local one, restores from the S3 copy and from the
copy of the copy; ``list``, ``verify``, ``prune`` and ``gc`` on the S3 repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.hosts import Host, base_image, ok_json, same_content, snapshot, write_random
from tests.integration.s3.seaweed import SeaweedServer

pytestmark = pytest.mark.timeout(600)


def test_copy_to_s3_and_back_and_restore_from_both(
    s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path
) -> None:
    host = Host.make("host-o", tmp_path, s3_env)
    local, back = tmp_path / "local", tmp_path / "back"
    offsite = f"s3://{BUCKET}/{s3_prefix}"
    key = host.workdir / "offsite.key"
    image = base_image(tmp_path / "vm-o.qcow2", data_mib=12)
    made, expected = [], []
    for n in range(3):
        write_random(image, 40, 4)  # each backup's own chunk: pruning one leaves garbage
        expected.append(snapshot(image, tmp_path / f"expected-{n}.qcow2"))
        made.append(ok_json(host.run("backup", "--repo", local, "--image", image, "--json"))["backup_id"])

    assert host.run("init", "--repo", offsite, "--encrypt", "--key-file", key).code == 0
    copied = ok_json(host.run("copy", "--from", local, "--to", offsite, "--to-key-file", key, "--json"))
    assert [c["backup_id"] for c in copied["backups"] if c["copied"]] == made
    again = ok_json(host.run("copy", "--from", local, "--to", offsite, "--to-key-file", key, "--json"))
    assert not [c for c in again["backups"] if c["copied"]]  # the target has them all: nothing sent
    listed = ok_json(host.run("list", "--repo", offsite, "--key-file", key, "--json"))["backups"]
    assert [b["backup_id"] for b in listed] == made
    assert host.run("verify", "--repo", offsite, "--key-file", key).code == 0
    out = tmp_path / "from-s3"
    restore = [
        "restore",
        "--repo",
        offsite,
        "--key-file",
        key,
        "--vm",
        "vm-o",
        "--backup",
        made[1],
        "--to",
        out,
    ]
    ok_json(host.run(*restore, "--json"))
    assert same_content(out / "vm-o.qcow2", expected[1])

    ok_json(host.run("copy", "--from", offsite, "--to", back, "--key-file", key, "--json"))  # and back home
    out = tmp_path / "from-back"
    ok_json(host.run("restore", "--repo", back, "--vm", "vm-o", "--to", out, "--json"))
    assert same_content(out / "vm-o.qcow2", expected[2])

    prune = ["prune", "--repo", offsite, "--key-file", key, "--vm", "vm-o", "--keep-last", "1", "--json"]
    assert ok_json(host.run(*prune))["pruned"][0]["removed"] == made[:2]
    freed = ok_json(host.run("gc", "--repo", offsite, "--key-file", key, "--json"))
    assert freed["chunks_freed"] == 2  # the pruned backups' own chunks
    assert host.run("verify", "--repo", offsite, "--key-file", key).code == 0
    out = tmp_path / "after-gc"
    ok_json(host.run("restore", "--repo", offsite, "--key-file", key, "--vm", "vm-o", "--to", out, "--json"))
    assert same_content(out / "vm-o.qcow2", expected[2])
