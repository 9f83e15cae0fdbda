"""The repository's upkeep through the CLI, on powered-off images: init (encrypted, key 0600), list --json
with what each backup stored, verify --fast, prune by --keep-* rules, gc freeing what no backup uses, copy to
a qcow2 repository and a restore from it; bad keys and bad rules are one line each."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.integration.cli_helpers import cli


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], check=False).returncode == 0


def test_init_list_verify_prune_gc_and_copy(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(tmp_path / "vm1.qcow2", "64M")
    repo, key = tmp_path / "repo", tmp_path / "key"
    made = cli(capsys, "init", "--repo", repo, "--encrypt", "--key-file", key, "--json")
    assert made.code == 0, made.err
    assert made.json() == {"repo": str(repo), "layout": "chunks", "encrypted": True, "key_file": str(key)}
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    keyed = ["--key-file", key]
    ids = []
    qemu_io(image, "write -P 0x55 32M 4M")  # the same in every backup: stored once
    for pattern in (0x11, 0x22, 0x33):  # three fulls, each rewriting the first 4 MiB
        qemu_io(image, f"write -P {pattern} 0 4M")
        done = cli(capsys, "backup", "--repo", repo, "--image", image, *keyed, "--json")
        assert done.code == 0, done.err
        ids.append(done.json()["backup_id"])
    at_last = tmp_path / "at-last.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(at_last)], check=True)

    listing = cli(capsys, "list", "--repo", repo, *keyed, "--json")
    assert listing.code == 0, listing.err
    backups = listing.json()["backups"]
    assert [b["backup_id"] for b in backups] == ids
    assert all(b["logical_size"] > 0 for b in backups)
    assert backups[0]["reused_chunks"] == 0 and backups[2]["reused_chunks"] >= 1  # deduplicated
    assert backups[2]["new_bytes"] < backups[0]["new_bytes"]  # the unchanged chunk is not stored again
    assert cli(capsys, "verify", "--repo", repo, *keyed, "--fast").code == 0

    wrong = tmp_path / "wrong-key"
    assert cli(capsys, "init", "--repo", tmp_path / "other", "--encrypt", "--key-file", wrong).code == 0
    refused = cli(capsys, "list", "--repo", repo, "--key-file", wrong)
    assert refused.code == 1 and "key" in refused.error_line
    missing = cli(capsys, "list", "--repo", repo)
    assert missing.code == 1 and "key" in missing.error_line

    nothing = cli(capsys, "prune", "--repo", repo, *keyed, "--keep-last", "0")
    assert nothing.code == 2 and "keep at least one" in nothing.error_line
    assert cli(capsys, "prune", "--repo", repo, *keyed).code == 2  # no rule at all
    dry = cli(capsys, "prune", "--repo", repo, *keyed, "--keep-last", "1", "--dry-run", "--json")
    assert dry.code == 0 and dry.json()["pruned"][0]["removed"] == ids[:2]
    assert len(cli(capsys, "list", "--repo", repo, *keyed, "--json").json()["backups"]) == 3
    pruned = cli(capsys, "prune", "--repo", repo, *keyed, "--keep-last", "1", "--json")
    assert pruned.code == 0 and pruned.json()["pruned"][0]["kept"] == [ids[2]]
    freed = cli(capsys, "gc", "--repo", repo, *keyed, "--json")
    assert freed.code == 0, freed.err
    assert freed.json()["chunks_freed"] == 2 and freed.json()["bytes_freed"] > 0  # the two rewritten chunks
    assert cli(capsys, "verify", "--repo", repo, *keyed).code == 0

    offsite = tmp_path / "offsite"
    assert cli(capsys, "init", "--repo", offsite, "--layout", "qcow2").code == 0
    copied = cli(capsys, "copy", "--from", repo, "--to", offsite, *keyed, "--json")
    assert copied.code == 0, copied.err
    assert [b["backup_id"] for b in copied.json()["backups"] if b["copied"]] == [ids[2]]
    out = tmp_path / "restored"
    restored = cli(capsys, "restore", "--repo", offsite, "--vm", "vm1", "--to", out, "--json")
    assert restored.code == 0, restored.err
    assert same(out / "vm1.qcow2", at_last)
    again = cli(capsys, "copy", "--from", repo, "--to", offsite, *keyed, "--json")
    assert again.code == 0 and again.json()["chunks_sent"] == 0  # nothing the target lacks
