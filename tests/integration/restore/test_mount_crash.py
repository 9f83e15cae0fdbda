"""A ``mount`` killed with SIGKILL at each step leaves servers, loop devices or mounts behind; ``recover``
removes all of them, and the same backup mounts again afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.restore.conftest import BackedUpDisk, daemon_pids, empty_dirs, leftovers
from tests.integration.restore.test_mount import assert_nothing_left, check_mounted
from vmsnap.processes import CRASH_ENV
from vmsnap.restore.mount import CRASH_POINTS, mount, recover, umount
from vmsnap.restore.source import ImageSource

MOUNT_IN_A_CHILD = """
import sys
from pathlib import Path
from vmsnap.restore.mount import mount
from vmsnap.restore.source import ImageSource
mount(ImageSource(Path(sys.argv[1])), Path(sys.argv[2]), run_dir=Path(sys.argv[3]))
"""


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_killed_mount_is_recovered(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path, point: str
) -> None:
    target = tmp_path / "m"
    target.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", MOUNT_IN_A_CHILD, str(backed_up_disk.inc), str(target), str(run_dir)],
        env={**os.environ, CRASH_ENV: point},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    pids = daemon_pids(run_dir)
    left = leftovers(run_dir, [target], pids)
    assert left.entries  # the premise: the dead mount left its state behind
    if point != "mount-after-state":
        assert left.processes  # … and its servers
    if point in ("mount-after-loop", "mount-after-first-mount"):
        assert left.loops
    if point == "mount-after-first-mount":
        assert any(str(target) in line for line in left.mounts)
    done = recover(run_dir=run_dir)
    assert done or point == "mount-after-state"
    assert_nothing_left(run_dir, [target], pids)
    result = mount(ImageSource(backed_up_disk.inc), target, run_dir=run_dir)
    check_mounted(result, backed_up_disk.v2)
    umount(target, run_dir=run_dir)
    assert_nothing_left(run_dir, [target], daemon_pids(run_dir) + pids)


def test_recover_keeps_healthy_mounts_and_cleans_one_whose_server_died(
    backed_up_disk: BackedUpDisk, run_dir: Path, tmp_path: Path
) -> None:
    healthy, broken = empty_dirs(tmp_path, "healthy", "broken")
    mount(ImageSource(backed_up_disk.base), healthy, run_dir=run_dir)
    healthy_pids = daemon_pids(run_dir)
    mount(ImageSource(backed_up_disk.inc), broken, run_dir=run_dir)
    broken_pids = [pid for pid in daemon_pids(run_dir) if pid not in healthy_pids]
    os.kill(broken_pids[0], signal.SIGKILL)  # its files now read as errors
    while leftovers(run_dir, [], broken_pids).processes:  # SIGKILL lands asynchronously
        time.sleep(0.01)
    recover(run_dir=run_dir)
    assert (healthy / "p1/etc/hostname").read_bytes() == b"lab-t1\n"
    assert list(broken.iterdir()) == []
    umount(healthy, run_dir=run_dir)
    assert_nothing_left(run_dir, [healthy, broken], healthy_pids + broken_pids)
