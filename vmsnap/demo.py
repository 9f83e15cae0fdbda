"""``vmsnap demo``: the main job end to end on the built-in tiny VM, with proof at the end.

Boot the lab guest, write files inside it, take a consistent (frozen) full backup and an incremental, change
the data, restore the full backup, and prove the restored filesystem is clean and holds exactly the files as
they were at backup time. Every step is reported through a callback; only the CLI prints.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from vmsnap.backup import Backup, BackupConfig, BackupResult
from vmsnap.errors import VmsnapError
from vmsnap.image.qemu_img import image_args
from vmsnap.lab.guest import DATA_MOUNT, LabGuest
from vmsnap.repo.repository import Repository
from vmsnap.runner import LocalRunner

DEMO_DIR = "demo"
FILE_COUNT = 12


class DemoFailed(VmsnapError):
    """The demo's proof failed: the restored data is not what the guest held at backup time."""


@attrs.frozen
class DemoReport:
    """What the demo did and proved."""

    workdir: str
    boot_seconds: float
    full: dict[str, object]
    incremental: dict[str, object]
    freeze_quiesced: bool
    restored_image: str
    fsck_clean: bool
    files_compared: int
    files_matching: int
    changed_after_backup: int
    seconds: float


def _guest_sha256s(guest: LabGuest, directory: str) -> dict[str, str]:
    out = guest.sh(f"cd {directory} && sha256sum *").stdout
    sums = {}
    for line in out.splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.strip().lstrip("*")] = digest
    return sums


def run_demo(
    workdir: Path | None = None, *, keep: bool = False, say: Callable[[str], None] = lambda line: None
) -> DemoReport:
    """Run the demo; raise :class:`DemoFailed` if the proof does not hold.

    :param workdir: where the repository, images and restore go (default: a temporary directory)
    :param keep: keep ``workdir`` afterwards (a temporary one is otherwise removed)
    :param say: receives one line per step
    """
    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="vmsnap-demo-") if workdir is None else None
    root = Path(tmp.name) if tmp is not None else Path(workdir or ".")
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _run(root, started, say)
    finally:
        if tmp is not None and not keep:
            tmp.cleanup()


@attrs.frozen
class _Taken:
    """What the guest part of the demo did: the files' digests at backup time and the two backups."""

    expected: dict[str, str]
    full: BackupResult
    incremental: BackupResult
    changed: int
    boot_seconds: float


def _back_up_in_guest(root: Path, repo_dir: Path, say: Callable[[str], None]) -> _Taken:
    """Boot the lab guest, write files, take a frozen full backup, change files, take an incremental."""
    say("building (or reusing) the lab guest and booting it under QEMU …")
    with LabGuest(root / "vm", name="demo-vm") as guest:
        say(f"guest up in {guest.boot_seconds:.1f} s; qemu-ga answers")
        data = f"{DATA_MOUNT}/{DEMO_DIR}"
        guest.run(["mkdir", "-p", data])
        for i in range(FILE_COUNT):
            guest.write_file(
                f"{data}/file{i:02d}.txt", f"file {i}: written before the backup\n".encode() * (i + 1)
            )
        guest.run(["dd", "if=/dev/urandom", f"of={data}/random.bin", "bs=64k", "count=64"])
        expected = _guest_sha256s(guest, data)
        say(f"wrote {len(expected)} files in the guest ({data}), sha256 taken inside the guest")

        config = BackupConfig(repo=repo_dir, quiesce="on")
        full: BackupResult = Backup(guest.machine, config, note=lambda line: say(f"  note: {line}")).run()
        written = sum(d.bytes_written for d in full.disks) / 1e6
        say(
            f"full backup {full.backup_id}: strategy {full.strategy}, transport {full.transport}, "
            f"guest frozen for {full.freeze_ms or 0:.0f} ms, {written:.1f} MB in {full.seconds:.2f} s"
        )

        guest.write_file(f"{data}/file00.txt", b"changed after the backup\n")
        guest.run(["rm", "-f", f"{data}/file01.txt"])
        guest.write_file(f"{data}/new-after-backup.txt", b"new\n")
        guest.sync()
        after = _guest_sha256s(guest, data)
        changed = sum(1 for k in set(expected) | set(after) if expected.get(k) != after.get(k))
        say(f"changed {changed} files in the guest after the backup")

        incremental = Backup(
            guest.machine, attrs.evolve(config, incremental=True), note=lambda line: say(f"  note: {line}")
        ).run()
        say(
            f"incremental backup {incremental.backup_id} ({incremental.kind}): "
            f"{sum(d.bytes_written for d in incremental.disks) / 1e6:.2f} MB in {incremental.seconds:.2f} s"
        )
        return _Taken(expected, full, incremental, changed, guest.boot_seconds)


def _check_restored(
    root: Path, image: Path, expected: dict[str, str], say: Callable[[str], None]
) -> tuple[bool, int]:
    """e2fsck the restored filesystem and compare its files with the guest's: (clean, files matching).

    :raise DemoFailed: the restored data differs
    """
    runner = LocalRunner()
    raw = root / "restored-data.raw"
    runner.run(["qemu-img", "convert", *image_args(image, "qcow2"), "-O", "raw", str(raw)], timeout=600)
    fsck = runner.run(["e2fsck", "-fn", str(raw)], ok_codes=(0, 1, 2, 4), timeout=600)
    fsck_clean = fsck.exit_code == 0
    say(f"e2fsck -fn on the restored filesystem: {'clean' if fsck_clean else 'NOT CLEAN'}")
    dump = root / "dump"
    dump.mkdir()
    runner.run(["debugfs", "-R", f"rdump /{DEMO_DIR} {dump}", str(raw)], timeout=600)
    got = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (dump / DEMO_DIR).iterdir() if p.is_file()
    }
    matching = sum(1 for name, digest in expected.items() if got.get(name) == digest)
    extra = sorted(set(got) - set(expected))
    say(f"restored files identical to the guest's at backup time: {matching}/{len(expected)}")
    if not fsck_clean or matching != len(expected) or extra:
        raise DemoFailed(
            f"restored data differs: fsck clean={fsck_clean}, {matching}/{len(expected)} files match, "
            f"unexpected files: {extra or 'none'}"
        )
    return fsck_clean, matching


def _run(root: Path, started: float, say: Callable[[str], None]) -> DemoReport:
    repo_dir = root / "repo"
    taken = _back_up_in_guest(root, repo_dir, say)
    repo = Repository.open(repo_dir, runner=LocalRunner())
    report = repo.verify("demo-vm")
    if not report.ok:
        raise DemoFailed(f"verify found problems: {'; '.join(str(p) for p in report.problems)}")
    say(f"verify: {len(repo.backups('demo-vm'))} backups, every checksum and chain link good")
    restore_dir = root / "restored"
    repo.restore("demo-vm", taken.full.backup_id, restore_dir)
    image = restore_dir / "data.qcow2"
    say(f"restored the full backup into {restore_dir} (sha256 checked against the manifest)")
    fsck_clean, matching = _check_restored(root, image, taken.expected, say)
    return DemoReport(
        workdir=str(root),
        boot_seconds=round(taken.boot_seconds, 2),
        full=taken.full.to_json(),
        incremental=taken.incremental.to_json(),
        freeze_quiesced=taken.full.quiesced,
        restored_image=str(image),
        fsck_clean=fsck_clean,
        files_compared=len(taken.expected),
        files_matching=matching,
        changed_after_backup=taken.changed,
        seconds=round(time.monotonic() - started, 2),
    )
