"""The fsfreeze-hook dispatcher script, run by dash on this host against hook scripts in a temp dir.

(The same script runs inside the lab guest under qemu-ga in test_freeze.py.)
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from vmsnap.errors import UsageError
from vmsnap.guest.hook import HOOK_DIR, HOOK_PATH, dispatcher_script, install_hooks, main


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    directory = tmp_path / "hooks.d"
    directory.mkdir()
    return directory


def _hook(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{name} $1" >> "$ORDER"\n{body}\n')
    path.chmod(0o755)


def _dispatch(tmp_path: Path, hooks: Path, action: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "fsfreeze-hook"
    script.write_text(dispatcher_script())
    env = {
        "PATH": os.environ["PATH"],
        "VMSNAP_HOOK_DIR": str(hooks),
        "VMSNAP_HOOK_LOG": str(tmp_path / "hook.log"),
        "ORDER": str(tmp_path / "order"),
        "VMSNAP_HOOK_TIMEOUT": "1",
    }
    return subprocess.run(["dash", str(script), action], env=env, capture_output=True, text=True)


def _order(tmp_path: Path) -> list[str]:
    path = tmp_path / "order"
    return path.read_text().splitlines() if path.exists() else []


def test_freeze_runs_in_name_order_and_thaw_in_reverse(tmp_path: Path, hooks: Path) -> None:
    for name in ("20-db", "10-app", "30-cache"):
        _hook(hooks, name, "exit 0")
    (hooks / "40-not-executable").write_text("#!/bin/sh\nexit 1\n")
    (hooks / "README").write_text("not a hook\n")
    assert _dispatch(tmp_path, hooks, "freeze").returncode == 0
    assert _dispatch(tmp_path, hooks, "thaw").returncode == 0
    assert _order(tmp_path) == [
        "10-app freeze",
        "20-db freeze",
        "30-cache freeze",
        "30-cache thaw",
        "20-db thaw",
        "10-app thaw",
    ]
    log = (tmp_path / "hook.log").read_text()
    assert "freeze " + str(hooks / "20-db") + ": ok" in log
    assert "thaw: done" in log


def test_a_failing_freeze_script_fails_the_freeze_and_thaws_what_ran(tmp_path: Path, hooks: Path) -> None:
    _hook(hooks, "10-app", "exit 0")
    _hook(hooks, "20-db", '[ "$1" = freeze ] && { echo "db refuses" >&2; exit 7; }; exit 0')
    _hook(hooks, "30-cache", "exit 0")
    result = _dispatch(tmp_path, hooks, "freeze")
    assert result.returncode == 1
    assert "20-db failed on freeze (exit 7)" in result.stderr
    # 30-cache never froze; 10-app (which did) was thawed; 20-db is not asked to thaw what it refused
    assert _order(tmp_path) == ["10-app freeze", "20-db freeze", "10-app thaw"]
    log = (tmp_path / "hook.log").read_text()
    assert "FAILED with exit status 7" in log
    assert "db refuses" in log  # the script's own output is in the log


def test_a_failing_thaw_script_is_reported_and_the_others_still_thaw(tmp_path: Path, hooks: Path) -> None:
    _hook(hooks, "10-app", "exit 0")
    _hook(hooks, "20-db", '[ "$1" = thaw ] && exit 3; exit 0')
    assert _dispatch(tmp_path, hooks, "freeze").returncode == 0
    assert _dispatch(tmp_path, hooks, "thaw").returncode == 1
    assert _order(tmp_path)[-2:] == ["20-db thaw", "10-app thaw"]
    assert "thaw: done, with failures" in (tmp_path / "hook.log").read_text()


def test_a_hanging_script_is_killed_and_fails_the_freeze(tmp_path: Path, hooks: Path) -> None:
    _hook(hooks, "10-slow", '[ "$1" = freeze ] && sleep 30; exit 0')
    env_timeout = _dispatch(tmp_path, hooks, "freeze")
    assert env_timeout.returncode == 1
    assert "FAILED" in (tmp_path / "hook.log").read_text()


def test_an_empty_or_missing_hook_dir_succeeds_and_a_bad_action_does_not(tmp_path: Path) -> None:
    assert _dispatch(tmp_path, tmp_path / "missing", "freeze").returncode == 0
    assert _dispatch(tmp_path, tmp_path / "missing", "thaw").returncode == 0
    assert _dispatch(tmp_path, tmp_path / "missing", "explode").returncode == 2


def test_install_hooks_writes_the_dispatcher_and_keeps_a_foreign_hook(tmp_path: Path) -> None:
    hook = tmp_path / HOOK_PATH
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\n# debian's stock hook\n")
    assert install_hooks(tmp_path) == hook
    assert hook.read_text() == dispatcher_script()
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755
    assert (tmp_path / HOOK_DIR).is_dir()
    assert "stock hook" in (hook.parent / "fsfreeze-hook.vmsnap-orig").read_text()
    install_hooks(tmp_path)  # idempotent: the original stays the foreign one
    assert "stock hook" in (hook.parent / "fsfreeze-hook.vmsnap-orig").read_text()
    with pytest.raises(UsageError, match="not a directory"):
        install_hooks(tmp_path / "nope")


def test_the_console_script_installs_and_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--root", str(tmp_path)]) == 0
    assert (tmp_path / HOOK_PATH).exists()
    assert main(["show"]) == 0
    assert "fsfreeze-hook.d" in capsys.readouterr().out
    assert main(["install", "--root", str(tmp_path / "missing")]) == 2
