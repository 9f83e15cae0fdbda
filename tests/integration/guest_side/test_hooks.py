"""The database lock through the whole hook chain, run on the host the way qemu-ga runs it in a guest.

``vmsnap guest install-hooks`` writes the dispatcher and the 50-vmsnap-dblock hook into a root tree; the
dispatcher is then run with ``freeze`` / ``thaw`` under dash (never qemu-ga or fsfreeze on this host).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tests.integration.guest_side.conftest import MariaDb, write_option_file
from tests.integration.guest_side.test_dblock import BlockedWriter, assert_not_locked, wait_until
from vmsnap.cli import main as vmsnap_main
from vmsnap.errors import UsageError
from vmsnap.guest.install import install_hooks
from vmsnap.processes import alive

DASH = shutil.which("dash") or "/bin/sh"


@pytest.fixture
def guest_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    install_hooks(root)
    return root


def hook_env(root: Path, option_file: Path, run_dir: Path, log: Path) -> dict[str, str]:
    """The dispatcher's and the hook's settings (paths only: no credentials in the environment)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "VMSNAP_HOOK_DIR": str(root / "etc/qemu/fsfreeze-hook.d"),
        "VMSNAP_HOOK_LOG": str(log),
        "VMSNAP_DBLOCK_CONFIG": str(option_file),
        "VMSNAP_DBLOCK_RUN_DIR": str(run_dir),
        "VMSNAP_DBLOCK": str(Path(sys.executable).parent / "vmsnap-dblock"),
    }


def dispatch(root: Path, action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DASH, str(root / "etc/qemu/fsfreeze-hook"), action],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_dispatcher_freeze_holds_the_lock_until_dispatcher_thaw(
    guest_root: Path, mariadb: MariaDb, option_file: Path, run_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "hook.log"
    env = hook_env(guest_root, option_file, run_dir, log)

    frozen = dispatch(guest_root, "freeze", env)
    assert frozen.returncode == 0, frozen.stderr + log.read_text()
    pid = int((run_dir / "holder.pid").read_text())
    writer = BlockedWriter(mariadb, "shop.orders", 1)
    wait_until(lambda: "lock" in writer.state(mariadb).lower(), "the writer to wait for the read lock")

    thawed = dispatch(guest_root, "thaw", env)
    assert thawed.returncode == 0, thawed.stderr + log.read_text()
    writer.finish()
    wait_until(lambda: not alive(pid), "the holder to exit")
    text = log.read_text()
    assert "global read lock held" in text
    assert "50-vmsnap-dblock: ok" in text
    assert "lock released after" in text


def test_dispatcher_freeze_fails_when_the_lock_cannot_be_taken(
    guest_root: Path, mariadb: MariaDb, run_dir: Path, tmp_path: Path
) -> None:
    option_file = write_option_file(tmp_path / "dblock.cnf", mariadb, password="Wr0ng-Pa55-7731")
    log = tmp_path / "hook.log"

    frozen = dispatch(guest_root, "freeze", hook_env(guest_root, option_file, run_dir, log))

    assert frozen.returncode != 0
    assert "50-vmsnap-dblock failed on freeze" in frozen.stderr
    assert "refused user vmsnap_backup" in log.read_text()
    assert "Wr0ng-Pa55-7731" not in log.read_text() + frozen.stderr  # a password is never logged
    assert_not_locked(mariadb, 1)


def test_a_later_hook_failing_on_freeze_releases_the_lock(
    guest_root: Path, mariadb: MariaDb, option_file: Path, run_dir: Path, tmp_path: Path
) -> None:
    """The dispatcher thaws the hooks already run when a later one fails: the lock must not linger."""
    failing = guest_root / "etc/qemu/fsfreeze-hook.d/90-fails"
    failing.write_text('#!/bin/sh\n[ "$1" = freeze ] && exit 3\nexit 0\n')
    failing.chmod(0o755)
    log = tmp_path / "hook.log"

    frozen = dispatch(guest_root, "freeze", hook_env(guest_root, option_file, run_dir, log))

    assert frozen.returncode != 0
    assert "90-fails failed on freeze" in frozen.stderr
    text = log.read_text()
    assert "global read lock held" in text and "lock released after" in text
    assert not (run_dir / "holder.sock").exists()
    assert_not_locked(mariadb, 1)


def test_hook_does_nothing_without_its_option_file(
    guest_root: Path, mariadb: MariaDb, run_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "hook.log"
    env = hook_env(guest_root, tmp_path / "absent.cnf", run_dir / "never", log)
    assert dispatch(guest_root, "freeze", env).returncode == 0
    assert "no database to lock" in log.read_text()
    assert not (run_dir / "never").exists()
    assert dispatch(guest_root, "thaw", env).returncode == 0
    assert_not_locked(mariadb, 1)


def test_install_hooks_writes_package_files_with_their_modes(tmp_path: Path) -> None:
    installed = install_hooks(tmp_path)
    package = resources.files("vmsnap.guest")
    assert {f.path.relative_to(tmp_path).as_posix() for f in installed} == {
        "etc/qemu/fsfreeze-hook",
        "etc/qemu/fsfreeze-hook.d/50-vmsnap-dblock",
    }
    for item in installed:
        assert stat.S_IMODE(item.path.stat().st_mode) == 0o755
        assert item.path.read_bytes() == package.joinpath(item.source).read_bytes()
    # the dash syntax check: the guest may have nothing but dash
    for item in installed:
        assert subprocess.run([DASH, "-n", str(item.path)], check=False).returncode == 0
    # installing again replaces vmsnap's files and leaves the others
    other = tmp_path / "etc/qemu/fsfreeze-hook.d/10-other"
    other.write_text("#!/bin/sh\n")
    (tmp_path / "etc/qemu/fsfreeze-hook").write_text("stale")
    install_hooks(tmp_path)
    assert other.read_text() == "#!/bin/sh\n"
    assert (tmp_path / "etc/qemu/fsfreeze-hook").read_bytes() == package.joinpath(
        "fsfreeze-hook.sh"
    ).read_bytes()


def test_install_hooks_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a directory"):
        install_hooks(tmp_path / "absent")


def test_cli_guest_install_hooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vmsnap_main(["guest", "install-hooks", "--root", str(tmp_path), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert {"path": str(tmp_path / "etc/qemu/fsfreeze-hook.d/50-vmsnap-dblock"), "mode": "0755"} in answer[
        "installed"
    ]
    assert vmsnap_main(["guest", "install-hooks", "--root", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err
