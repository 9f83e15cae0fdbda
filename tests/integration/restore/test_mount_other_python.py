"""``vmsnap mount`` of a chunks backup while another Python is first on ``PATH`` (pyenv, conda: common on
admin machines). nbdkit's embedded Python takes its standard library and site directories from the first
``python3`` on ``PATH``; vmsnap gives nbdkit a ``PATH`` that starts with its own interpreter's directory, so
the reader still imports what it needs (Debian's ``python3-cryptography``, in ``dist-packages``).

The other Pythons: a fake installation made here on every machine (a ``bin/python3`` whose ``lib/python3.X``
is the system's standard library, with no ``dist-packages`` — what a pyenv or conda build of the same
version looks like to nbdkit), and every real pyenv or conda Python of nbdkit's version found on this one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.integration.cli_helpers import cli, cli_process
from tests.integration.restore.conftest import BackedUpDisk, daemon_pids, empty_dirs
from tests.integration.restore.images import snapshot
from tests.integration.restore.test_mount import assert_nothing_left, assert_same_tree
from vmsnap.restore.commands import mounts_dir


def nbdkit_python_version() -> str:
    """``3.11``: the Python nbdkit's plugin embeds (``nbdkit python --dump-plugin``)."""
    dump = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True, text=True, check=False)
    match = re.search(r"^python_version=(\d+\.\d+)", dump.stdout, re.MULTILINE)
    assert match, f"nbdkit's python plugin is missing (apt-get install nbdkit-plugin-python): {dump.stderr}"
    return match.group(1)


def installed_pythons(version: str) -> list[Path]:
    """bin directories of other Python installations of ``version`` on this machine (pyenv, conda)."""
    home = Path.home()
    patterns = [
        home / ".pyenv/versions",
        Path("/opt/conda"),
        home / "miniconda3",
        home / "anaconda3",
    ]
    found: list[Path] = []
    for root in patterns:
        candidates = sorted(root.glob(f"{version}.*/bin")) if root.name == "versions" else [root / "bin"]
        for bin_dir in candidates:
            if (bin_dir / "python3").exists() and (bin_dir.parent / f"lib/python{version}/os.py").exists():
                found.append(bin_dir)
    return found


def fake_python(root: Path, version: str) -> Path:
    """A Python installation of ``version`` under ``root`` without Debian's dist-packages: ``bin/python3``
    (a script) and ``lib/pythonX.Y`` (the system's standard library); returns its bin directory."""
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": "/usr", "base": "/usr"})["stdlib"])
    assert (stdlib / "os.py").is_file(), stdlib
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "lib" / f"python{version}").symlink_to(stdlib)
    python = root / "bin" / "python3"
    python.write_text('#!/bin/sh\necho "not this python" >&2\nexit 1\n')
    python.chmod(0o755)
    return root / "bin"


PROBE = """import cryptography

def open(readonly):
    return 1

def get_size(h):
    return 0

def pread(h, buf, offset, flags):
    pass
"""
"""An nbdkit Python plugin that needs Debian's python3-cryptography, as vmsnap's chunk reader does."""

VERSION = nbdkit_python_version() if shutil.which("nbdkit") else "3"
OTHERS = ["fake", *[str(p) for p in installed_pythons(VERSION)]]


@pytest.mark.parametrize("other", OTHERS, ids=[o if o == "fake" else Path(o).parent.name for o in OTHERS])
def test_mount_a_chunks_backup_with_another_python_first_on_path(
    other: str,
    backed_up_disk: BackedUpDisk,
    run_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bin_dir = fake_python(tmp_path / "otherpy", VERSION) if other == "fake" else Path(other)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    # the premise: nbdkit started with this PATH as it is gets the other installation's library
    plugin = tmp_path / "probe.py"
    plugin.write_text(PROBE)
    argv = ["nbdkit", "--unix", "-", "python", str(plugin), "--run", "true"]
    plain = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert plain.returncode == 0, plain.stderr
    probe = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "PATH": path}, check=False
    )
    assert probe.returncode != 0 and "No module named 'cryptography'" in probe.stderr, probe.stderr
    image = tmp_path / "disk0.qcow2"
    shutil.copyfile(backed_up_disk.base, image)
    repo = tmp_path / "repo"
    made = cli_process(
        "backup", "--repo", repo, "--image", image, "--name", "vm1", "--json", env={"PATH": path}
    )
    assert made.code == 0, made.err
    assert (repo / "chunks").is_dir()  # a new directory is a chunks repository: nbdkit serves it
    (target,) = empty_dirs(tmp_path, "m")
    mounted = cli_process("mount", "--repo", repo, "--vm", "vm1", target, "--json", env={"PATH": path})
    assert mounted.code == 0, mounted.err
    assert {p["name"]: p["fstype"] for p in mounted.json()["partitions"]} == {
        "p1": "ext4",
        "p2": "xfs",
        "p3": "btrfs",
    }
    for name, tree in backed_up_disk.v1.items():
        assert_same_tree(snapshot(target / name), tree)
    pids = daemon_pids(run_root)
    unmounted = cli_process("umount", target, env={"PATH": path})
    assert unmounted.code == 0, unmounted.err
    assert_nothing_left(mounts_dir(run_root), [target], pids)
    assert cli(capsys, "mount", "--list", "--json").json() == {"mounts": []}
