"""Consistent snapshots of a guest that is writing: freeze → QMP snapshot → thaw, then check on the host.

A writer in the guest appends a numbered line every 50 ms to /mnt/data/log.txt. The snapshot taken while
frozen must hold a clean ext4 (``e2fsck -fn``) whose log ends at a complete line, with every line written
before the freeze was asked for. Without freezing the same procedure is only observed and reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsnap.errors import CommandError
from vmsnap.lab.guest import DATA_MOUNT, LabGuest, fsck_image, read_image_file
from vmsnap.vm.freeze import frozen

pytestmark = pytest.mark.guest

LOG = f"{DATA_MOUNT}/log.txt"
PAD = "x" * 120
WRITER = (
    f"i=0; while [ $i -lt 1000000 ]; do i=$((i + 1)); printf '%08d %s\\n' $i {PAD} >> {LOG}; sleep 0.05; done"
)
NODE = "fmt-data"


def expected_line(number: int) -> bytes:
    return b"%08d %s" % (number, PAD.encode())


def complete_lines(data: bytes) -> int:
    """The number of lines in ``data``, checking they are 1..N in order and the last one is complete."""
    assert data.endswith(b"\n"), f"the log ends in a partial line: {data[-40:]!r}"
    lines = data.split(b"\n")[:-1]
    for number, line in enumerate(lines, 1):
        assert line == expected_line(number), f"line {number} is {line[:40]!r}"
    return len(lines)


def lines_now(guest: LabGuest) -> int:
    return int(guest.run(["wc", "-l", LOG]).stdout.split()[0])


@pytest.fixture
def writer(lab_guest: LabGuest) -> Iterator[int]:
    """The writer's pid in the guest; it runs until the test ends."""
    lab_guest.run(["rm", "-f", LOG])
    lab_guest.run(["sync"])  # an earlier test's log must not linger on disk under the same name
    pid = lab_guest.agent.exec("/bin/sh", ["-c", WRITER], capture=False)
    deadline = time.monotonic() + 30
    while lab_guest.sh(f"[ -s {LOG} ] && wc -l < {LOG} || echo 0").stdout.strip() in ("0", "1", "2"):
        assert time.monotonic() < deadline, "the writer in the guest did not start"
        time.sleep(0.1)
    try:
        yield pid
    finally:
        lab_guest.run(["kill", str(pid)], ok_codes=(0, 1))
        lab_guest.agent.exec_status(pid)  # lets qemu-ga reap it
        lab_guest.run(["rm", "-f", LOG])


def test_frozen_external_snapshot_is_clean_and_complete(
    lab_guest: LabGuest, writer: int, tmp_path: Path
) -> None:
    base = lab_guest.data_image
    assert base is not None
    overlay = tmp_path / "data-overlay.qcow2"
    qmp = lab_guest.machine.qmp()
    before = lines_now(lab_guest)
    with frozen(lab_guest.machine) as report:
        qmp.execute(
            "blockdev-snapshot-sync",
            {"node-name": NODE, "snapshot-file": str(overlay), "snapshot-node-name": "overlay-data"},
        )
    try:
        # the base is now a read-only backing file that QEMU flushed: readable from the host as it is
        fsck = fsck_image(base, scratch=tmp_path)
        assert fsck.clean, fsck.output
        assert "Fix? no" not in fsck.output  # not even a stale free-blocks count: the freeze wrote it all
        assert "skipping journal recovery" not in fsck.output  # and left the journal empty
        in_snapshot = complete_lines(read_image_file(base, "/log.txt", scratch=tmp_path))
        assert in_snapshot >= before  # everything written before the freeze was asked for
        time.sleep(0.3)
        assert lines_now(lab_guest) > in_snapshot  # the guest kept writing into the overlay
        print(f"\nexternal: {in_snapshot} lines, frozen window {report.window_ms:.0f} ms")
    finally:
        # merge the overlay back (active commit) so the shared guest runs on its original image again
        qmp.run_job("block-commit", {"device": "overlay-data"}, job_id="commit-data", complete_on_ready=True)
    names = {d.node_name: d for d in lab_guest.machine.disks()}
    assert NODE in names and names[NODE].backing_chain == ()
    lab_guest.run(["sync"])
    assert complete_lines(lab_guest.read_file(LOG)) > in_snapshot


def test_frozen_internal_snapshot_is_clean_and_complete(
    lab_guest: LabGuest, writer: int, tmp_path: Path
) -> None:
    base = lab_guest.data_image
    assert base is not None
    qmp = lab_guest.machine.qmp()
    before = lines_now(lab_guest)
    with frozen(lab_guest.machine):
        qmp.execute("blockdev-snapshot-internal-sync", {"device": NODE, "name": "consistent"})
    try:
        fsck = fsck_image(base, snapshot="consistent", scratch=tmp_path)
        assert fsck.clean, fsck.output
        assert "Fix? no" not in fsck.output
        assert "skipping journal recovery" not in fsck.output
        in_snapshot = complete_lines(
            read_image_file(base, "/log.txt", snapshot="consistent", scratch=tmp_path)
        )
        assert in_snapshot >= before
        print(f"\ninternal: {in_snapshot} lines")
    finally:
        qmp.execute("blockdev-snapshot-delete-internal-sync", {"device": NODE, "name": "consistent"})


def test_unfrozen_snapshot_is_observed_and_reported(lab_guest: LabGuest, writer: int, tmp_path: Path) -> None:
    """No freeze: what the snapshot holds depends on what the page cache had written; report it.

    What does not depend on it: e2fsck only looked (``-n``: exit 0 or 4, never "corrected"), and the snapshot
    holds no line the guest wrote after it was taken.
    """
    base = lab_guest.data_image
    assert base is not None
    qmp = lab_guest.machine.qmp()
    before = lines_now(lab_guest)
    qmp.execute("blockdev-snapshot-internal-sync", {"device": NODE, "name": "crash"})
    after = lines_now(lab_guest)
    try:
        fsck = fsck_image(base, snapshot="crash", scratch=tmp_path)
        assert fsck.exit_code in (0, 4), fsck.output  # -n: it found problems or none, it fixed nothing
        assert "FILE SYSTEM WAS MODIFIED" not in fsck.output, fsck.output
        try:
            data = read_image_file(base, "/log.txt", snapshot="crash", scratch=tmp_path)
        except CommandError as err:
            data, note = b"", f"log unreadable: {err.message}"
        else:
            assert data.count(b"\n") <= after, "the snapshot holds lines written after it was taken"
            lines = data.count(b"\n")
            complete = data.endswith(b"\n")
            zeros = b"\0" in data
            note = f"{lines} lines (writer had {before}+), ends complete: {complete}, NUL bytes: {zeros}"
        journal = (
            "journal recovery skipped" if "skipping journal recovery" in fsck.output else "no journal replay"
        )
        print(f"\nunfrozen: e2fsck exit {fsck.exit_code} ({journal}); {note}")
    finally:
        qmp.execute("blockdev-snapshot-delete-internal-sync", {"device": NODE, "name": "crash"})
