"""Argument building and parsing of the transports and vmsnap.image.io, checked without running anything.

These only show which commands would run; the integration tests prove that they work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes import RecordingRunner
from vmsnap.errors import UsageError
from vmsnap.image.nbd import QemuNbdServer
from vmsnap.image.qemu_img import image_args
from vmsnap.model import Disk, ExportSource, ThrottledProgress
from vmsnap.runner import SshRunner
from vmsnap.transports.copy import CopyTransport
from vmsnap.transports.nbd import _merge, _runs
from vmsnap.transports.rsync import RsyncTarget, RsyncTransport, parse_stats

DISK = Disk("disk0", "", Path("/img/a,b.qcow2"), "qcow2", 1 << 20)


def source(**kw: object) -> ExportSource:
    fields: dict[str, object] = {"kind": "file", "location": "/img/a,b.qcow2", "format": "qcow2"}
    fields.update(kw)
    return ExportSource(disk=DISK, virtual_size=1 << 20, **fields)  # type: ignore[arg-type]


def test_snapshot_options_become_dash_l_and_others_image_opts() -> None:
    assert image_args("/img/a.qcow2", "qcow2") == ["-f", "qcow2", "/img/a.qcow2"]
    assert image_args("/i/a", "qcow2", image_opts={"snapshot.name": "s,1"}, force_share=True) == [
        "-U",
        "-l",
        "snapshot.name=s,,1",
        "-f",
        "qcow2",
        "/i/a",
    ]
    args = image_args("/img/a,b.qcow2", "qcow2", image_opts={"cache.direct": "on"})
    assert args == [
        "--image-opts",
        "driver=qcow2,file.driver=file,file.filename=/img/a,,b.qcow2,cache.direct=on",
    ]
    assert image_args("/dev/loop3", "raw", image_opts={"x": "1"}, block_device=True)[1] == (
        "driver=raw,file.driver=host_device,file.filename=/dev/loop3,x=1"
    )


def test_qemu_nbd_argv_uses_image_opts_for_force_share() -> None:
    server = QemuNbdServer(
        Path("/img/a.qcow2"), "qcow2", force_share=True, bitmap="b0", runner=RecordingRunner()
    )
    server._dir = Path("/run/x")
    argv = server.argv()
    assert argv[:2] == ["qemu-nbd", "--fork"]
    assert "--read-only" in argv and "--bitmap=b0" in argv and "--socket=/run/x/nbd.sock" in argv
    assert argv[-2:] == [
        "--image-opts",
        "driver=qcow2,read-only=on,force-share=on,file.driver=file,file.filename=/img/a.qcow2",
    ]
    assert not any(a == "-U" for a in argv)  # qemu-nbd has no -U


def test_copy_argv() -> None:
    copy = CopyTransport(RecordingRunner())
    assert copy.argv(source(force_share=True), Path("/t/x")) == [
        "qemu-img",
        "convert",
        "-O",
        "qcow2",
        "-U",
        "-f",
        "qcow2",
        "/img/a,b.qcow2",
        "/t/x",
    ]
    raw = CopyTransport(RecordingRunner(), output_format="raw")
    assert raw.argv(source(format="raw"), Path("/t/x"))[:3] == ["cp", "--reflink=auto", "--sparse=always"]
    assert raw.argv(source(format="raw", kind="block"), Path("/t/x"))[0] == "qemu-img"
    with pytest.raises(UsageError, match="output format"):
        CopyTransport(output_format="vmdk")


def test_rsync_argv_over_ssh() -> None:
    ssh = SshRunner("me@host", port=2222, identity=Path("/k/id key"), options={"ConnectTimeout": "5"})
    rsync = RsyncTransport(ssh)
    target = rsync.parse_target("whatever:/backups/d.qcow2")
    assert target == RsyncTarget("/backups/d.qcow2", "me@host")
    argv = rsync.argv("/src/d.qcow2", target, 65536)
    assert argv[0] == "rsync" and "--inplace" in argv and "--no-whole-file" in argv
    assert "--block-size=65536" in argv and "--chmod=F600" in argv
    shell = argv[argv.index("-e") + 1]
    assert "'/k/id key'" in shell and "-p 2222" in shell and "me@host" not in shell
    assert argv[-3:] == ["--", "/src/d.qcow2", "me@host:/backups/d.qcow2"]
    assert rsync.parse_target(Path("/plain")) == RsyncTarget("/plain", "me@host")
    assert RsyncTransport().parse_target("/local/x:y") == RsyncTarget("/local/x:y")
    with pytest.raises(UsageError):
        RsyncTransport().parse_target("-oProxyCommand=x:/p")


def test_rsync_stats_parsing() -> None:
    text = (
        "Number of files: 1\nLiteral data: 1,376,256 bytes\nMatched data: 65,536 bytes\n"
        "Total bytes sent: 1,376,673\n"
    )
    stats = parse_stats(text)
    assert (stats.literal, stats.matched, stats.sent) == (1376256, 65536, 1376673)


def test_zero_runs_and_range_merging() -> None:
    g = 64 * 1024
    data = bytes(g) + b"\1" * g + bytes(2 * g) + b"\2" * 10
    assert list(_runs(data)) == [(0, g, True), (g, g, False), (2 * g, 2 * g, True), (4 * g, 10, False)]
    assert _merge([(0, 10), (10, 5), (20, 1)]) == [(0, 15), (20, 1)]


def test_progress_is_throttled_and_monotonic() -> None:
    calls: list[tuple[int, int]] = []
    report = ThrottledProgress(lambda d, t: calls.append((d, t)), 100, interval=3600)
    report(0, final=True)
    for done in range(1, 90):
        report(done)  # all within the interval: none reported
    report(70, final=True)
    report(50, final=True)  # never backwards
    report(100, final=True)
    assert calls == [(0, 100), (70, 100), (70, 100), (100, 100)]


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * 64 * 1024)), max_size=6))
def test_zero_runs_cover_the_data_exactly(pieces: list[tuple[bool, int]]) -> None:
    data = b"".join(bytes(n) if zero else b"\x07" * n for zero, n in pieces)
    runs = list(_runs(data))
    assert b"".join(data[start : start + length] for start, length, _ in runs) == data
    for (start, length, zero), following in zip(runs, [*runs[1:], None], strict=False):
        assert zero == (data[start : start + length] == bytes(length))
        if following is not None:
            assert following[0] == start + length and following[2] != zero
