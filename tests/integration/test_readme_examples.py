"""The Python examples of the README — today's, and the first round's (README.md at f5455c8, which imports
``vmsnap.machine`` and ``vmsnap.repository``) — and of docs/backup-and-restore.md run as written against a
real VM: the lab guest named vm1, with a real qemu-ga, only the socket and directory paths changed. Each
restores what the guest had at backup time, byte for byte; the first round's imports warn and name their
new homes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import subprocess
import warnings
from pathlib import Path

import pytest

from tests.conftest import LabGuestFactory, RunningVm
from tests.integration.cli_helpers import write
from vmsnap.lab.guest import LabGuest, read_image_file
from vmsnap.lab.qemu import qemu_io

ROOT = Path(__file__).resolve().parents[2]

FIRST_ROUND_EXAMPLE = """\
from pathlib import Path
from vmsnap.backup import Backup, BackupConfig
from vmsnap.machine import QemuMachine
from vmsnap.repository import Repository

with QemuMachine("/run/vm1.qmp", "/run/vm1.qga") as vm:
    result = Backup(vm, BackupConfig(repo=Path("/backups"), incremental=True)).run()
print(result.backup_id, result.kind, result.freeze_ms, [d.sha256 for d in result.disks])
Repository.open(Path("/backups")).restore("vm1", result.backup_id, Path("/restore"))
"""
"""The Python example of the first round's README, verbatim (``git show f5455c8:README.md``)."""


def readme_example(path: str = "README.md") -> str:
    """The Python example of ``path`` that backs up and restores."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "Backup(" in b and ".restore(" in b]
    return block


def run_example(code: str, guest: LabGuest, repo: Path, restore: Path) -> str:
    """Run ``code`` with the example's paths pointed at ``guest`` and ``repo``/``restore``; its stdout."""
    for old, new in (
        ("/run/vm1.qmp", guest.qmp_socket),
        ("/run/vm1.qga", guest.agent_socket),
        ("/backups", repo),
        ("/restore", restore),
    ):
        assert f'"{old}"' in code, old
        code = code.replace(f'"{old}"', f'"{new}"')
    guest.machine.close()  # QEMU serves its QMP socket to one client at a time
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README example", "exec"), {"__name__": "readme_example"})
    return out.getvalue()


def index_digests(repo: Path, backup_id: str) -> list[str]:
    """The sha256 of each disk's index of a backup in a chunks repository: what a backup reports as the
    disk's ``sha256`` there (``"digest": "sha256-index"``, docs/repository.md)."""
    indexes = sorted((repo / "vms" / "vm1" / backup_id).glob("*.index"))
    assert indexes
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in indexes)


def printed(out: str) -> tuple[str, str, list[str]]:
    """(backup id, kind, per-disk sha256) from the example's print line."""
    backup_id, kind, rest = out.strip().split(" ", 2)
    return backup_id, kind, re.findall(r"'([0-9a-f]{64})'", rest)


@pytest.mark.guest
def test_the_readme_examples_back_up_and_restore_a_running_vm(
    lab_guest_factory: LabGuestFactory, tmp_path: Path
) -> None:
    guest = lab_guest_factory(name="vm1")
    repo = tmp_path / "backups"
    guest.write_file("/mnt/data/first", b"written before the first backup\n" * 1000)
    guest.sync()

    out = run_example(readme_example(), guest, repo, tmp_path / "restore1")
    backup_id, kind, digests = printed(out)
    assert kind == "full"  # incremental=True on an empty repository: the first backup is full
    guest.write_file("/mnt/data/first", b"changed after the first backup\n")
    first = tmp_path / "restore1"
    assert read_image_file(first / "data.qcow2", "/first", scratch=tmp_path) == (
        b"written before the first backup\n" * 1000
    )
    assert index_digests(repo, backup_id) == sorted(digests)

    guest.write_file("/mnt/data/second", b"written before the second backup\n")
    guest.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_example(FIRST_ROUND_EXAMPLE, guest, repo, tmp_path / "restore2")
    deprecations = sorted(str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
    assert deprecations == [
        "vmsnap.machine.QemuMachine is deprecated: import QemuMachine from vmsnap.vm.machine",
        "vmsnap.repository.Repository is deprecated: import Repository from vmsnap.repo.repository",
    ]
    second_id, kind, digests = printed(out)
    assert kind == "incremental" and second_id > backup_id
    second = tmp_path / "restore2"
    assert read_image_file(second / "data.qcow2", "/first", scratch=tmp_path) == (
        b"changed after the first backup\n"
    )
    assert read_image_file(second / "data.qcow2", "/second", scratch=tmp_path) == (
        b"written before the second backup\n"
    )
    assert index_digests(repo, second_id) == sorted(digests)

    # docs/backup-and-restore.md has the same example (without freeze_ms): a third backup, incremental
    guest.write_file("/mnt/data/third", b"written before the third backup\n")
    guest.sync()
    out = run_example(readme_example("docs/backup-and-restore.md"), guest, repo, tmp_path / "restore3")
    third_id, kind, digests = printed(out)
    assert kind == "incremental" and third_id > second_id
    assert read_image_file(tmp_path / "restore3" / "data.qcow2", "/third", scratch=tmp_path) == (
        b"written before the third backup\n"
    )
    assert index_digests(repo, third_id) == sorted(digests)


@pytest.mark.guest
def test_the_lab_guest_example_of_docs_consistency_md(tmp_path: Path) -> None:
    """docs/consistency.md: a lab guest, a file written, an internal snapshot while frozen, e2fsck clean."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/consistency.md").read_text(), re.DOTALL)
    (code,) = [b for b in blocks if "LabGuest(" in b]
    assert 'Path("/tmp/lab")' in code
    code = code.replace('Path("/tmp/lab")', f'Path("{tmp_path / "lab"}")')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/consistency.md", "exec"), {"__name__": "docs_example"})
    first, *rest = out.getvalue().splitlines()
    assert first == "True"  # the snapshot taken frozen is a clean ext4
    assert any("LVM version" in line for line in rest), rest


def test_the_example_of_docs_backup_strategy_md(two_disk_vm: RunningVm, tmp_path: Path) -> None:
    """docs/backup-strategy.md: a full and an incremental backup with the strategy alone (push), restorable
    with qemu-img convert along the chain."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/backup-strategy.md").read_text(), re.DOTALL)
    (code,) = blocks
    write(two_disk_vm, "disk0", "write -P 0x61 0 2M")
    two_disk_vm.machine.close()
    code = code.replace('"/run/vm1.qmp"', f'"{two_disk_vm.process.qmp_socket}"')
    code = code.replace('Path("/backups/vm1/1")', f'Path("{tmp_path / "1"}")')
    code = code.replace('Path("/backups/vm1/2")', f'Path("{tmp_path / "2"}")')
    code = code.replace('f"/backups/vm1/1/', f'f"{tmp_path / "1"}/')
    assert "/run/vm1" not in code and 'Path("/backups' not in code and 'f"/backups' not in code
    first, second = code.split("inc = ", 1)
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(first, "docs/backup-strategy.md", "exec"), namespace)
    qmp = namespace["vm"].qmp()  # type: ignore[attr-defined]  # the example's QMP connection
    for command in ("write -P 0x62 1M 64k", "flush"):  # a guest write between the two backups
        qemu_io(qmp, "disk0", command)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("inc = " + second, "docs/backup-strategy.md", "exec"), namespace)
    assert out.getvalue().split() == ["incremental"], out.getvalue()
    namespace["vm"].close()  # type: ignore[attr-defined]
    restored = tmp_path / "restored.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(tmp_path / "2" / "disk0.qcow2"), str(restored)], check=True
    )
    data = restored.read_bytes()
    assert data[: 1 << 20] == b"\x61" * (1 << 20)
    assert data[1 << 20 : (1 << 20) + 65536] == b"\x62" * 65536
    assert data[(1 << 20) + 65536 : 2 << 20] == b"\x61" * ((1 << 20) - 65536)


def test_the_first_example_of_docs_transports_md(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/transports.md: the nbd transport copies an image; the guest-visible digests match."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/transports.md").read_text(), re.DOTALL)
    monkeypatch.chdir(tmp_path)  # the example names its files relative to the working directory
    image = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 3M 5M", str(image)], check=True)
    exec(compile(blocks[0], "docs/transports.md", "exec"), {"__name__": "docs_example"})
    assert (tmp_path / "backup.qcow2").stat().st_mode & 0o777 == 0o600
