"""The peer comparison's cheap parts: virtnbdbackup's command lines, reading its log, figures and ratios
(vmsnap's from the same domain), and the checks around vmsnap's backups there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.fakes import RecordingRunner
from vmsnap.benchmark import peers as peers_module
from vmsnap.benchmark.peers import (
    FULL,
    PUSH,
    STARTUP,
    VMSNAP_FULL,
    VMSNAP_INCREMENTAL,
    VMSNAP_RESTORE,
    PeerBench,
    PeerError,
    _restored_image,
    backup_argv,
    figure,
    fsync_tree,
    parse_backup_log,
    parse_version,
    peer_ratios,
    qemu_nbd_pids,
    restore_argv,
    wait_for_qemu_nbd,
)
from vmsnap.benchmark.report import throughput_markdown
from vmsnap.benchmark.throughput import ThroughputFigure
from vmsnap.benchmark.workload import DURABLE_COPY

URI = "qemu:///system?socket=/tmp/vmsnap-lv.x/libvirt-sock"

# what virtnbdbackup 1.9.15 logged for a full backup here (trimmed, timestamps cut)
FULL_LOG = """\
INFO root virtnbdbackup - main [MainThread]: Backup level: [full]
INFO root virtnbdbackup - handleCheckpoints [MainThread]: Using checkpoint name: [virtnbdbackup.0].
INFO root virtnbdbackup - backupDisk [vda]: Got 35 extents to backup.
INFO root virtnbdbackup - backupDisk [vda]: 268435456 bytes disk size
INFO root virtnbdbackup - backupDisk [vda]: 134217728 bytes of data extents to backup
INFO root virtnbdbackup - backupDisk [sdb]: 4194304 bytes of data extents to backup
INFO root virtnbdbackup - backupDisk [vda]: Backup of disk [vda] finished, file: [/b/vda.full.data]
INFO root virtnbdbackup - main [MainThread]: Finished successfully
"""


def test_backup_argv_names_uri_domain_level_output_and_scratch() -> None:
    argv = backup_argv(URI, "vm1", "inc", Path("/b/chain"), scratch=Path("/s"))
    assert argv == ["virtnbdbackup", "-U", URI, "-d", "vm1", "-l", "inc", "-o", "/b/chain", "-S", "/s", "-n"]


def test_restore_argv_restores_the_whole_chain_with_its_own_log() -> None:
    argv = restore_argv(URI, Path("/b/chain"), Path("/r"), logfile=Path("/s/restore.log"))
    assert argv == ["virtnbdrestore", "-U", URI, "-i", "/b/chain", "-o", "/r", "-n", "-L", "/s/restore.log"]


def test_backup_log_gives_bytes_per_disk_checkpoint_and_success() -> None:
    log = parse_backup_log(FULL_LOG)
    assert dict(log.data_bytes) == {"vda": 134217728, "sdb": 4194304}
    assert log.total_bytes == 138412032
    assert log.checkpoint == "virtnbdbackup.0"
    assert log.finished


def test_backup_log_of_a_failed_run_is_not_finished() -> None:
    log = parse_backup_log("ERROR root virtnbdbackup - main [MainThread]: Cant connect libvirt daemon")
    assert (dict(log.data_bytes), log.checkpoint, log.finished) == ({}, None, False)


def test_version() -> None:
    assert parse_version("1.9.15\n") == "1.9.15"
    assert parse_version("") == "unknown"


def test_backup_through_the_runner_reads_its_log_and_refuses_an_unfinished_run(tmp_path: Path) -> None:
    runner = RecordingRunner({("virtnbdbackup",): (0, FULL_LOG)})
    bench = PeerBench(tmp_path, URI, size_mib=64, data_mib=32, runner=runner)
    _, log = bench._backup("vm1", "full", tmp_path / "full")  # the time it took is the benchmark's business
    assert log.total_bytes == 138412032
    assert runner.calls == [tuple(backup_argv(URI, "vm1", "full", tmp_path / "full", scratch=tmp_path))]
    runner.responses[("virtnbdbackup",)] = (0, "nothing useful")
    with pytest.raises(PeerError, match="did not finish"):
        bench._backup("vm1", "inc", tmp_path / "full")


def test_compare_counts_exit_one_as_different(tmp_path: Path) -> None:
    runner = RecordingRunner({("qemu-img", "compare"): (1, "Content mismatch at offset 0!")})
    bench = PeerBench(tmp_path, URI, size_mib=64, data_mib=32, runner=runner)
    assert not bench._identical(tmp_path / "a", tmp_path / "b")
    assert bench._identical(tmp_path / "a", tmp_path / "b", shared=True) is False
    assert runner.calls == [
        ("qemu-img", "compare", str(tmp_path / "a"), str(tmp_path / "b")),
        ("qemu-img", "compare", "-U", str(tmp_path / "a"), str(tmp_path / "b")),
    ]


def _fake_proc(root: Path, processes: dict[int, list[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()
    return root


def test_qemu_nbd_serving_a_restore_is_found_by_its_command_line(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path / "proc",
        {
            10: [
                "qemu-nbd",
                "--discard=unmap",
                "--format=qcow2",
                "-x",
                "sda",
                "/r/out1/disk.qcow2",
                "--fork",
            ],
            11: ["/usr/bin/qemu-nbd", "-k", "/s", "/r/out10/disk.qcow2"],  # another directory
            12: ["qemu-img", "convert", "/r/out1/disk.qcow2", "/x"],  # not qemu-nbd
            13: [""],  # a zombie has an empty command line
        },
    )
    assert qemu_nbd_pids(Path("/r/out1"), proc) == [10]
    assert qemu_nbd_pids(Path("/r/out2"), proc) == []
    with pytest.raises(PeerError, match=r"qemu-nbd \[10\] still serves"):
        wait_for_qemu_nbd(Path("/r/out1"), timeout=0, proc=proc)
    wait_for_qemu_nbd(Path("/r/out2"), timeout=0, proc=proc)


def test_restored_image_is_the_one_image_in_the_directory(tmp_path: Path) -> None:
    (tmp_path / "vmconfig.virtnbdbackup.3.xml").write_text("<domain/>")
    with pytest.raises(PeerError, match="expected one image"):
        _restored_image(tmp_path)
    (tmp_path / "disk.qcow2").write_bytes(b"")
    assert _restored_image(tmp_path) == tmp_path / "disk.qcow2"


def test_figure_is_the_median_with_every_run() -> None:
    fig = figure(FULL, [3.0, 1.0, 2.0], 200_000_000, verified=True)
    assert fig == {
        "name": FULL,
        "seconds": 2.0,
        "mb_per_s": 100.0,
        "runs": [3.0, 1.0, 2.0],
        "data_bytes": 200_000_000,
        "verified": True,
    }


def _ours() -> list[ThroughputFigure]:
    # the bare-QEMU figures: the ratios against the peers must not use vmsnap's figures from here
    return [
        ThroughputFigure(DURABLE_COPY, 1.0, (1.0,), 1000),
        ThroughputFigure("vmsnap full backup (chunks, pull)", 0.1, (0.1,), 1000),
        ThroughputFigure("vmsnap incremental chunks (100 MiB changed)", 0.01, (0.01,), 100),
        ThroughputFigure("vmsnap restore chunks (one index)", 0.1, (0.1,), 1000),
    ]


def _peers() -> dict[str, dict[str, object]]:
    return {
        fig["name"]: fig
        for fig in (
            figure(STARTUP, [0.4], 0),
            figure(PUSH, [1.5], 1000, verified=True),
            figure(FULL, [6.0], 1000),
            figure(VMSNAP_FULL, [2.0], 1000, written_bytes=[1000]),
            figure("virtnbdbackup incremental (100 MiB changed)", [2.0], 100),
            figure(VMSNAP_INCREMENTAL.format(mib=100), [0.5], 100, written_bytes=[100]),
            figure("virtnbdrestore (full + 3 incrementals)", [8.0], 1000, verified=True),
            figure(VMSNAP_RESTORE.format(n=3), [4.0], 1000, verified=True),
        )
    }


def test_ratios_compare_vmsnap_and_each_peer_on_the_same_domain() -> None:
    assert peer_ratios(_ours(), _peers()) == {
        "full_backup_vs_virtnbdbackup": 3.0,
        "incremental_vs_virtnbdbackup": 4.0,
        "restore_vs_virtnbdrestore": 2.0,
        "full_backup_vs_backup_begin_push": 0.75,
        "domain_full_backup_vs_convert": 0.5,
        "virtnbdbackup_full_vs_convert": 0.167,
        "backup_begin_push_vs_convert": 0.667,
    }


def test_ratios_leave_out_what_was_not_measured_on_the_domain() -> None:
    # vmsnap's bare-QEMU figures are there, but no vmsnap figure from the domain: no vmsnap ratio
    assert peer_ratios(_ours(), {FULL: figure(FULL, [6.0], 1000)}) == {
        "virtnbdbackup_full_vs_convert": 0.167,
    }
    only_full = {n: _peers()[n] for n in (FULL, VMSNAP_FULL)}
    assert peer_ratios([], only_full) == {"full_backup_vs_virtnbdbackup": 3.0}


def _document(peers: dict[str, object]) -> dict[str, object]:
    return {
        "size_mib": 512,
        "data_mib": 384,
        "runs": 1,
        "figures": [{"name": "qemu-img convert (limit)", "seconds": 1.0, "mb_per_s": 400.0, "runs": [1.0]}],
        "ratios": {"cp_vs_convert": 0.9},
        "peers": peers,
    }


def test_markdown_shows_the_same_domain_table_with_versions_ratios_and_targets() -> None:
    peers = {
        "versions": {"virtnbdbackup": "1.9.15", "libvirt": "9.0.0"},
        "figures": _peers(),
        "ratios": peer_ratios(_ours(), _peers()),
        "targets": {"full_backup_vs_virtnbdbackup": ">= 4"},
    }
    text = throughput_markdown(_document(peers))
    assert "## vmsnap and its peers on the same libvirt domain" in text
    assert "on one running libvirt domain (libvirt 9.0.0, virtnbdbackup 1.9.15)" in text
    assert "back up the same domain, the same image and the same data" in text
    assert "| virtnbdbackup full | 6.000 s | 0 MB/s | 6 |  |" in text
    assert "| vmsnap full backup (chunks, same domain) | 2.000 s | 0 MB/s | 2 |  |" in text
    assert "| virtnbdrestore (full + 3 incrementals) | 8.000 s | 0 MB/s | 8 | yes |" in text
    assert "| vmsnap restore (full + 3 incrementals, same domain) | 4.000 s | 0 MB/s | 4 | yes |" in text
    assert f"| {STARTUP} | 0.400 s |  | 0.4 |  |" in text  # no throughput: it moves no data
    assert "| full_backup_vs_virtnbdbackup | 3 | >= 4 |" in text
    assert "| incremental_vs_virtnbdbackup | 4 |  |" in text
    assert "vmsnap's incrementals stored 100 bytes each (median)" in text


def test_markdown_has_no_peers_section_without_peers() -> None:
    assert "peers" not in throughput_markdown(_document({}))


def test_startup_is_timed_through_the_runner_with_every_run(tmp_path: Path) -> None:
    runner = RecordingRunner({("virtnbdbackup", "-V"): (0, "1.9.15\n")})
    bench = PeerBench(tmp_path, URI, size_mib=64, data_mib=32, runs=3, runner=runner)
    bench._startup()
    assert runner.calls == [("virtnbdbackup", "-V")] * 3
    assert len(bench.figures[STARTUP]["runs"]) == 3
    assert bench.figures[STARTUP]["data_bytes"] == 0


@attrs.frozen
class _Result:
    kind: str
    vm: str = "vm1"
    notes: tuple[str, ...] = ()
    disks: tuple[Any, ...] = ()


@attrs.define
class _FakeMachine:
    spec: Any
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def _fake_vmsnap(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[Any]:
    """open_machine and Backup replaced: what they were given is recorded, the backup is of ``kind``."""
    seen: list[Any] = []

    def open_machine(spec: Any) -> _FakeMachine:
        machine = _FakeMachine(spec)
        seen.append(machine)
        return machine

    class Backup:
        def __init__(self, machine: _FakeMachine, config: Any) -> None:
            seen.append(config)
            self.config = config

        def run(self) -> _Result:
            self.config.repo.mkdir(exist_ok=True)
            return _Result(kind, notes=("no usable parent",) if kind == "full" else ())

    monkeypatch.setattr(peers_module, "open_machine", open_machine)
    monkeypatch.setattr(peers_module, "Backup", Backup)
    return seen


def test_vmsnap_backs_up_the_domain_as_the_cli_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_vmsnap(monkeypatch, "incremental")
    bench = PeerBench(tmp_path, URI, size_mib=64, data_mib=32)
    _, result = bench._vmsnap_backup("vm1", tmp_path / "repo", incremental=True)
    assert result.kind == "incremental"
    machine, config = seen
    # --domain vm1 --connect URI, the CLI's defaults otherwise; the machine closed afterwards
    assert (machine.spec.domain, machine.spec.connect, machine.closed) == ("vm1", URI, True)
    assert (config.repo, config.incremental, config.strategy, config.transport, config.quiesce) == (
        tmp_path / "repo",
        True,
        "auto",
        "auto",
        "auto",
    )


def test_vmsnap_incremental_that_fell_back_to_full_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_vmsnap(monkeypatch, "full")
    bench = PeerBench(tmp_path, URI, size_mib=64, data_mib=32)
    with pytest.raises(PeerError, match=r"was a full one, not incremental: \['no usable parent'\]"):
        bench._vmsnap_backup("vm1", tmp_path / "repo", incremental=True)
    bench._vmsnap_backup("vm1", tmp_path / "repo", incremental=False)  # a full one is what was asked


def test_fsync_tree_takes_a_file_or_a_directory_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = tmp_path.resolve() / "chain"  # /proc/self/fd names the real path
    (chain / "checkpoints").mkdir(parents=True)
    (chain / "vda.full.data").write_bytes(b"x")
    (chain / "checkpoints" / "virtnbdbackup.0.xml").write_text("<c/>")
    (chain / "latest").symlink_to("vda.full.data")  # a link is not synced twice (its target is)
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fsync_tree(chain)
    # every file and every directory, the top one included, each once
    assert sorted(synced) == sorted(
        [chain, chain / "checkpoints", chain / "vda.full.data", chain / "checkpoints" / "virtnbdbackup.0.xml"]
    )
    synced.clear()
    fsync_tree(chain / "vda.full.data")
    assert synced == [chain / "vda.full.data"]
