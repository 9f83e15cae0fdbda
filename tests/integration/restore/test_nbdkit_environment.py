"""nbdkit serving a backup from an encrypted S3 repository (SeaweedFS) whose credentials are only in vmsnap's
environment: nbdkit gets them through a 0600 file in its private directory, never in its environment, and
``PATH`` starts with vmsnap's interpreter's directory (see :mod:`vmsnap.image.nbdkit`); read back from
``/proc/<pid>/environ`` of the real nbdkit and qemu-storage-daemon."""

from __future__ import annotations

import configparser
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.cli_helpers import cli
from tests.integration.restore.conftest import BackedUpDisk, daemon_pids, empty_dirs
from tests.integration.restore.images import snapshot
from tests.integration.restore.test_mount import assert_nothing_left, assert_same_tree
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import PROFILE, SeaweedServer
from tests.integration.test_child_environment import environ
from vmsnap.image.nbdkit import python_home_bin
from vmsnap.restore.commands import mounts_dir
from vmsnap.runner import SECRET_VARIABLES


def test_nbdkit_serving_an_s3_repository_gets_credentials_through_a_private_file(
    backed_up_disk: BackedUpDisk,
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    s3_env: SeaweedServer,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The credentials in the environment only (as on many hosts): vmsnap reads the backup, nbdkit serves
    it, and neither nbdkit's environment nor the storage daemon's has them."""
    profiles = configparser.ConfigParser()
    profiles.read(s3_env.credentials_file)
    key_id = profiles[PROFILE]["aws_access_key_id"]
    secret = profiles[PROFILE]["aws_secret_access_key"]
    empty = tmp_path / "no-credentials"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))  # the environment is the only source
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    key = tmp_path / "repo.key"
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(key))
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)
    repo = f"s3://{BUCKET}/{s3_prefix}"
    assert cli(capsys, "init", "--repo", repo, "--encrypt").code == 0
    made = cli(capsys, "backup", "--repo", repo, "--image", image, "--name", "vm1", "--json")
    assert made.code == 0, made.err
    (target,) = empty_dirs(tmp_path, "m")
    mounted = cli(capsys, "mount", "--repo", repo, "--vm", "vm1", target, "--json")
    assert mounted.code == 0, mounted.err
    pids = daemon_pids(run_root)
    try:
        for name, tree in backed_up_disk.v1.items():  # read through nbdkit's reader, from the bucket
            assert_same_tree(snapshot(target / name), tree)
        programs = {pid: Path(Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]).name for pid in pids}
        assert sorted(programs.values()) == ["nbdkit", "qemu-storage-daemon"], programs
        for pid, program in programs.items():
            env = environ(pid)
            assert not set(env) & set(SECRET_VARIABLES), (program, sorted(env))
            assert secret not in "\0".join(env.values()), program
            if program != "nbdkit":
                continue
            assert env["PATH"].split(os.pathsep)[0] == str(python_home_bin())
            credentials = Path(env["AWS_SHARED_CREDENTIALS_FILE"])
            assert credentials.stat().st_mode & 0o777 == 0o600
            assert credentials.parent.stat().st_mode & 0o777 == 0o700
            written = configparser.ConfigParser()
            written.read(credentials)
            assert dict(written[PROFILE]) == {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
            assert secret not in " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
    finally:
        assert cli(capsys, "umount", target).code == 0
    assert_nothing_left(mounts_dir(run_root), [target], pids)
    assert not list(run_root.rglob("aws-credentials"))
    assert json.loads(mounted.out)["vm"] == "vm1"
