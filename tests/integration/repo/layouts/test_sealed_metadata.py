"""Sealed metadata (encrypted repositories of marker format 4) end to end on real parts: a guest-less QEMU
backed up with names and data the test chooses, then every stored key and byte searched for them; sealed
objects swapped, moved and truncated are refused with one line; an encrypted repository made by vmsnap
56a13a1 (format 2, plain metadata) is listed, restored, backed up into, pruned, collected and copied both
ways by this vmsnap, and one of format 3 (BLAKE3 ids, plain metadata) backed up into, restored and copied
into a sealed one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningVm, make_image
from tests.integration.cli_helpers import backup, capture, cli, cli_process, same_content, write
from tests.integration.repo.layouts.helpers import SECRET, stored_path
from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.repo.chunks.repository import ChunksRepository
from vmsnap.repo.chunks.sealed import MIN_SIZE, SealedStore
from vmsnap.repo.copy import copy_backups
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import OfflineMachine, QemuMachine

VM = "Orchard-vm7"
DISKS = ("Pear-disk7", "Plum-disk7")
FIXTURE = Path(__file__).parent.parent / "fixtures" / "format2-encrypted.tar.gz"
OLD_VM = "olddisk"
MIB = 1 << 20


@pytest.fixture
def named_vm(tmp_path: Path) -> Iterator[RunningVm]:
    """A running QEMU (no OS) named :data:`VM` with two 64 MiB disks named :data:`DISKS`."""
    images = {disk: make_image(tmp_path / f"img{n}.qcow2") for n, disk in enumerate(DISKS)}
    drives = [
        DriveSpec(images[DISKS[0]], DISKS[0], serial="s0"),
        DriveSpec(images[DISKS[1]], DISKS[1], bus="scsi", serial="s1"),
    ]
    process = QemuProcess(tmp_path, drives, name=VM).start()
    try:
        machine = QemuMachine(process.qmp_socket)
    except BaseException:
        process.kill()
        raise
    try:
        yield RunningVm(process, machine, images, tmp_path)
    finally:
        machine.close()
        process.stop()
        process.kill()


def _restore(repo: Path | str, vm: str, backup_id: str, out: Path, expected: dict[str, Path]) -> None:
    result = cli_process("restore", "--repo", repo, "--vm", vm, "--backup", backup_id, "--to", out, "--json")
    assert result.code == 0, result.err
    for disk, reference in expected.items():
        assert same_content(out / f"{disk}.qcow2", reference), f"{backup_id}/{disk}"


def _all_stored(repo: Path) -> tuple[list[str], bytes]:
    """Every key (path) in a repository directory and all the bytes stored."""
    files = sorted(p for p in repo.rglob("*") if p.is_file())
    return [str(p.relative_to(repo)) for p in files], b"".join(p.read_bytes() for p in files)


def _telltales(made: list[dict[str, object]]) -> list[bytes]:
    """What must appear nowhere: names, every backup's id and time (to the minute), the data written."""
    words = [VM.encode(), *(d.encode() for d in DISKS), SECRET, SECRET[:24]]
    for result in made:
        backup_id = str(result["backup_id"])
        words += [backup_id.encode(), backup_id[:13].encode()]  # 20261208T0125: the id's minute
        listed = str(result.get("created", ""))
        if listed:
            words.append(listed[:16].encode())  # 2026-12-08T01:25
    return words


@pytest.mark.parametrize("chunk_id", ["blake3", "sha256"])
def test_nothing_stored_names_a_vm_disk_backup_time_or_data(
    named_vm: RunningVm,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    chunk_id: str,
) -> None:
    vm = named_vm
    repo = tmp_path / "repo"
    monkeypatch.setenv("VMSNAP_KEY_FILE", str(tmp_path / "repo.key"))
    assert cli(capsys, "init", "--repo", repo, "--encrypt", "--chunk-id", chunk_id).code == 0
    marker = json.loads((repo / "vmsnap-repo.json").read_text())
    # sealed whatever the chunk id hash: format 4, naming the hash where it is not sha256 (as format 3 does)
    assert marker["format"] == 4 and marker["encryption"]["metadata"] == "sealed-1"
    assert marker.get("chunk_id", "sha256") == chunk_id
    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes((SECRET + b"\n") * (MIB // (len(SECRET) + 1)) + bytes(MIB % (len(SECRET) + 1)))
    write(vm, DISKS[0], f"write -s {secret_file} 0 1M", "write -P 0x11 8M 3M")
    write(vm, DISKS[1], f"write -s {secret_file} 20M 1M")
    expected = [{d: capture(vm, d, tmp_path / f"1-{d}.qcow2") for d in DISKS}]
    made = [backup(capsys, vm, repo)]
    write(vm, DISKS[0], "write -P 0x33 8M 1M")  # the first backup's chunk there is its own: gc frees it
    write(vm, DISKS[1], f"write -s {secret_file} 40M 1M", "write -P 0x22 1M 64k")
    expected.append({d: capture(vm, d, tmp_path / f"2-{d}.qcow2") for d in DISKS})
    made.append(backup(capsys, vm, repo, "--incremental"))
    assert made[1]["kind"] == "incremental"
    library = Repository.open(repo)
    library.attach(library.get(VM, str(made[1]["backup_id"])), "note.json", SECRET + VM.encode())

    listed = cli(capsys, "list", "--repo", repo, "--vm", VM, "--json")
    assert listed.code == 0, listed.err
    backups = listed.json()["backups"]
    assert [b["backup_id"] for b in backups] == [m["backup_id"] for m in made]
    for result, backup_listed in zip(made, backups, strict=True):
        result["created"] = backup_listed["created"]
    for n, result in enumerate(made):
        _restore(repo, VM, str(result["backup_id"]), tmp_path / f"r{n}", expected[n])
    verified = cli(capsys, "verify", "--repo", repo, "--json")
    assert verified.code == 0 and verified.json()["ok"], verified.err

    keys, data = _all_stored(repo)
    text = "\n".join(keys).encode()
    for word in _telltales(made):
        assert word not in text, f"a key names {word!r}"
        assert word not in data, f"a stored object holds {word!r}"
    assert any(k.startswith("chunks/") for k in keys) and all(
        k.startswith(("chunks/", "v/", "l/")) or k == "vmsnap-repo.json" for k in keys
    ), keys
    # every sealed object has a size class: 4 KiB or a power of two above
    sealed = [p for top in ("v", "l") for p in (repo / top).rglob("*") if p.is_file()]
    assert len(sealed) >= 6
    assert all(p.stat().st_size >= MIN_SIZE and p.stat().st_size.bit_count() == 1 for p in sealed)

    # prune and gc work on sealed keys: the first backup goes, its own chunks with it, the second restores
    assert library.prune(VM, 1).removed == (made[0]["backup_id"],)
    report = library.gc()
    assert report.chunks_freed >= 1 and report.partial_backups == ()
    _restore(repo, VM, str(made[1]["backup_id"]), tmp_path / "after-gc", expected[1])
    assert library.attachment(library.get(VM, str(made[1]["backup_id"])), "note.json") == SECRET + VM.encode()


def marker_bytes(repo: Path) -> bytes:
    """The marker's bytes (never rewritten)."""
    return (repo / "vmsnap-repo.json").read_bytes()


def _image_backups(tmp_path: Path, repo: Path, key: Path, count: int) -> tuple[list[str], list[Path]]:
    """``count`` backups of an image (VM and disk ``disk0``), each after a write of its own; the ids and the
    image's content at each."""
    image = tmp_path / "disk0.qcow2"
    if not image.exists():
        make_image(image, "16M")
    ids, contents = [], []
    for n in range(count):
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {0x41 + n} {n}M 1M", str(image)],
            check=True,
            capture_output=True,
        )
        result = Backup(OfflineMachine([image]), BackupConfig(repo=repo, key_file=key)).run()
        ids.append(result.backup_id)
        copy = tmp_path / f"at-{n}.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(copy)], check=True)
        contents.append(copy)
    return ids, contents


def _refused(argv: list[str | Path], *words: str, one_line: bool = True) -> None:
    """The command fails (exit 1) with one line on stderr naming ``words`` (``one_line`` False: verify
    also says, a line each, that it could not keep its records beside the backups it could not read)."""
    result = cli_process(*argv)
    assert result.code == 1, (argv, result.out, result.err)
    assert not one_line or len(result.err.strip().splitlines()) == 1, result.err
    for word in words:
        assert word in result.error_line, result.err


def test_swapped_moved_or_truncated_metadata_is_refused_with_one_line(tmp_path: Path) -> None:
    repo, key = tmp_path / "repo", tmp_path / "repo.key"
    Repository.init(repo, encrypt=True, key_file=key)
    (one, two), contents = _image_backups(tmp_path, repo, key, 2)
    library = Repository.open(repo, key_file=key)
    library.attach(library.get("disk0", one), "proof", b"first proof")
    library.attach(library.get("disk0", two), "proof", b"second proof")

    def path(backup_id: str, name: str) -> Path:
        return stored_path(repo, f"vms/disk0/{backup_id}/{name}", key)

    def swap(a: Path, b: Path) -> tuple[bytes, bytes]:
        saved = a.read_bytes(), b.read_bytes()
        a.write_bytes(saved[1])
        b.write_bytes(saved[0])
        return saved

    def put_back(a: Path, b: Path, saved: tuple[bytes, bytes]) -> None:
        a.write_bytes(saved[0])
        b.write_bytes(saved[1])

    base = ["--repo", repo, "--key-file", key]
    restore = ["restore", *base, "--vm", "disk0", "--backup", one, "--to", tmp_path / "out"]
    check = "fails its authentication check"
    # two manifests swapped: listing, restoring and verifying refuse, each in one line
    manifests = path(one, "manifest.json"), path(two, "manifest.json")
    saved = swap(*manifests)
    _refused(["list", *base], "damaged manifest", check)
    _refused(restore, f"vms/disk0/{one}/manifest.json", check)
    _refused(["verify", *base], check, one_line=False)
    put_back(*manifests, saved)
    # two indexes of different backups swapped
    indexes = path(one, "disk0.index"), path(two, "disk0.index")
    saved = swap(*indexes)
    _refused(restore, f"vms/disk0/{one}/disk0.index", check)
    _refused(["verify", *base], check)
    put_back(*indexes, saved)
    # an attachment moved from one backup to the other
    proofs = path(one, "attached.proof"), path(two, "attached.proof")
    saved = swap(*proofs)
    with pytest.raises(Exception, match=check):
        library.attachment(library.get("disk0", one), "proof")
    put_back(*proofs, saved)
    # a truncated manifest, then a truncated index
    for damaged in (manifests[0], indexes[0]):
        whole = damaged.read_bytes()
        damaged.write_bytes(whole[: len(whole) // 2])
        _refused(restore, check)
        damaged.write_bytes(whole)
    # all put back: everything reads again
    assert library.attachment(library.get("disk0", one), "proof") == b"first proof"
    _restore_with_key(repo, key, one, tmp_path / "fine", contents[0], vm="disk0")
    assert cli_process("verify", *base).code == 0


def _old_repository(tmp_path: Path) -> tuple[Path, Path]:
    """The format-2 encrypted repository vmsnap 56a13a1 made (tests/integration/repo/fixtures), unpacked."""
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path / "old")  # the project's own fixture
    key = tmp_path / "old" / "key.json"
    os.chmod(key, 0o600)
    return tmp_path / "old" / "repo", key


def _old_content(tmp_path: Path, second: bool) -> Path:
    """The image as each of the fixture's two backups holds it (see make_format2_encrypted.sh)."""
    image = make_image(tmp_path / f"old-{int(second)}.qcow2", "24M")
    writes = ["write -P 0x4f 0 5M", "write -P 0x50 12M 1M", *(["write -P 0x51 4M 2M"] if second else [])]
    for command in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True, capture_output=True)
    return image


def test_an_encrypted_repository_of_format_2_keeps_working(tmp_path: Path) -> None:
    repo, key = _old_repository(tmp_path)
    marker = marker_bytes(repo)
    assert json.loads(marker)["format"] == 2
    old = Repository.open(repo, key_file=key)
    assert isinstance(old, ChunksRepository) and not isinstance(old.store, SealedStore)
    ids = [m.backup_id for m in old.backups(OLD_VM)]
    assert len(ids) == 2
    contents = [_old_content(tmp_path, False), _old_content(tmp_path, True)]
    for backup_id, content in zip(ids, contents, strict=True):
        _restore_with_key(repo, key, backup_id, tmp_path / f"r-{backup_id}", content)

    # backed up into by this vmsnap: it stays format 2, its metadata in plain keys
    image = tmp_path / "img" / f"{OLD_VM}.qcow2"
    image.parent.mkdir()
    shutil.copy(contents[1], image)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x52 20M 1M", str(image)], check=True, capture_output=True
    )
    third = Backup(OfflineMachine([image]), BackupConfig(repo=repo, key_file=key)).run().backup_id
    assert marker_bytes(repo) == marker
    assert (repo / "vms" / OLD_VM / third / "manifest.json").is_file()
    _restore_with_key(repo, key, third, tmp_path / "r-third", image)
    assert Repository.open(repo, key_file=key).verify().ok

    # copied into a sealed repository (same key: blobs as they are; another key: re-encoded) and back
    for name, target_key in (("same", key), ("other", tmp_path / "other.key")):
        sealed = tmp_path / f"sealed-{name}"
        Repository.init(sealed, encrypt=True, key_file=target_key)
        copied = copy_backups(
            Repository.open(repo, key_file=key), Repository.open(sealed, key_file=target_key)
        )
        assert [b.backup_id for b in copied.backups] == [*ids, third]
        assert not (sealed / "vms").exists()
        for backup_id, content in zip([*ids, third], [*contents, image], strict=True):
            _restore_with_key(sealed, target_key, backup_id, tmp_path / f"r-{name}-{backup_id}", content)
    # a sealed repository's backups copied into the old one, and into an unencrypted one, and back
    fresh = tmp_path / "sealed-fresh"
    Repository.init(fresh, encrypt=True, key_file=key)
    (new_id,), (new_content,) = _image_backups(tmp_path, fresh, key, 1)
    assert copy_backups(Repository.open(fresh, key_file=key), Repository.open(repo, key_file=key)).backups
    assert marker_bytes(repo) == marker and (repo / "vms" / "disk0" / new_id / "manifest.json").is_file()
    _restore_with_key(repo, key, new_id, tmp_path / "r-new-in-old", new_content, vm="disk0")
    plain = tmp_path / "plain"
    Repository.init(plain)
    copy_backups(Repository.open(fresh, key_file=key), Repository.open(plain))
    back = tmp_path / "sealed-back"
    Repository.init(back, encrypt=True, key_file=tmp_path / "back.key")
    copy_backups(Repository.open(plain), Repository.open(back, key_file=tmp_path / "back.key"))
    _restore_with_key(back, tmp_path / "back.key", new_id, tmp_path / "r-back", new_content, vm="disk0")

    # pruned and collected by this vmsnap: the oldest goes, the rest restore
    library = Repository.open(repo, key_file=key)
    assert library.prune(OLD_VM, 2).removed == (ids[0],)
    assert library.gc().chunks_freed >= 1
    assert library.verify().ok
    _restore_with_key(repo, key, ids[1], tmp_path / "r-after-gc", contents[1])
    assert marker_bytes(repo) == marker


def _restore_with_key(
    repo: Path, key: Path, backup_id: str, out: Path, expected: Path, *, vm: str = OLD_VM
) -> None:
    result = cli_process(
        "restore", "--repo", repo, "--key-file", key, "--vm", vm, "--backup", backup_id, "--to", out
    )
    assert result.code == 0, result.err
    (restored,) = out.glob("*.qcow2")
    assert same_content(restored, expected), backup_id


def test_an_encrypted_repository_of_format_3_keeps_its_plain_metadata(tmp_path: Path) -> None:
    """Encrypted with BLAKE3 ids and plain metadata: format 3, what vmsnap made between BLAKE3 ids and sealed
    metadata (its marker written here as that vmsnap wrote it, into a repository holding nothing else yet)."""
    repo, key = tmp_path / "repo3", tmp_path / "repo3.key"
    Repository.init(repo, encrypt=True, key_file=key)
    assert [p.name for p in repo.iterdir()] == ["vmsnap-repo.json"]
    marker = json.loads(marker_bytes(repo))
    assert marker["encryption"].pop("metadata") == "sealed-1"
    marker["format"] = 3
    assert (marker["chunk_id"], marker["encryption"]["chunk_id"]) == ("blake3", "blake3-keyed")
    (repo / "vmsnap-repo.json").write_text(json.dumps(marker))
    opened = Repository.open(repo, key_file=key)
    assert isinstance(opened, ChunksRepository) and not isinstance(opened.store, SealedStore)
    ids, contents = _image_backups(tmp_path, repo, key, 2)
    assert all((repo / "vms" / "disk0" / backup_id / "manifest.json").is_file() for backup_id in ids)
    for backup_id, content in zip(ids, contents, strict=True):
        _restore_with_key(repo, key, backup_id, tmp_path / f"r-{backup_id}", content, vm="disk0")
    assert Repository.open(repo, key_file=key).verify().ok
    assert json.loads(marker_bytes(repo)) == marker
    # copied into a sealed repository: its keys name nothing there
    sealed = tmp_path / "sealed"
    Repository.init(sealed, encrypt=True, key_file=key)
    copy_backups(Repository.open(repo, key_file=key), Repository.open(sealed, key_file=key))
    assert not (sealed / "vms").exists() and (sealed / "v").is_dir()
    _restore_with_key(sealed, key, ids[1], tmp_path / "r-sealed", contents[1], vm="disk0")
