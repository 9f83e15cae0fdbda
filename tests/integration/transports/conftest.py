"""Sources for the transport contract suite: real images with known data, one per ExportSource kind, each with
a reference image holding the guest-visible content a transport must reproduce; and a tiny full filesystem.

qemu-nbd servers, loop devices and tmpfs mounts made here are removed by the fixture, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tests.conftest import RunningVm, make_image
from vmsnap.errors import QMPConnectionError
from vmsnap.lab.qemu import DriveSpec, QemuProcess
from vmsnap.model import Disk, ExportSource
from vmsnap.vm.machine import QemuMachine

SIZE = 64 * 1024 * 1024
PATTERN: tuple[tuple[int, int, int], ...] = (
    (0, 1024 * 1024, 0x11),
    (7 * 1024 * 1024 + 4096, 512 * 1024, 0x22),  # not cluster-aligned
    (40 * 1024 * 1024, 2 * 1024 * 1024, 0x33),
    (SIZE - 1024 * 1024, 1024 * 1024, 0x44),  # the very end
)
"""(offset, length, byte) writes every source starts from: 4.5 MiB of data in a 64 MiB disk."""

DATA_BYTES = sum(length for _, length, _ in PATTERN)


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    """Run qemu-io commands on an image that nothing else has open."""
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    out = subprocess.run([*argv, str(image)], check=True, capture_output=True, text=True).stdout
    assert "error" not in out.lower() and "fail" not in out.lower(), out


def write_pattern(image: Path, fmt: str, pattern: tuple[tuple[int, int, int], ...] = PATTERN) -> None:
    qemu_io(image, fmt, *(f"write -P {byte:#x} {offset} {length}" for offset, length, byte in pattern))


def image_format(path: Path) -> str:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True, text=True
        ).stdout
    )
    return str(info["format"])


def images_equal(a: Path, b: Path) -> bool:
    """``qemu-img compare`` of guest-visible content (formats probed; both closed)."""
    done = subprocess.run(
        ["qemu-img", "compare", "-f", image_format(a), "-F", image_format(b), str(a), str(b)],
        capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


CaseFactory = Callable[[str], "SourceCase"]
"""What the ``case_factory`` fixture gives: kind → a fresh :class:`SourceCase`."""


@attrs.frozen
class SourceCase:
    """An ExportSource and the image (``reference``) holding what its guest sees."""

    kind: str
    source: ExportSource
    reference: Path


def _disk(path: Path, fmt: str) -> Disk:
    return Disk(name="disk0", node_name="", file=path, format=fmt, virtual_size=SIZE)


def _file_source(path: Path, fmt: str, **kw: object) -> ExportSource:
    return ExportSource("file", str(path), fmt, _disk(path, fmt), SIZE, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def served(image: Path, fmt: str, workdir: Path, *extra: str) -> Iterator[str]:
    """A qemu-nbd (started here, stopped by pid) serving ``image`` read-only; yields its URI."""
    sock = workdir / "src-nbd.sock"
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--read-only",
            "--persistent",
            "--shared=8",
            "--export-name=exp",
            f"--socket={sock}",
            "-f",
            fmt,
            *extra,
            str(image),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        yield f"nbd+unix:///exp?socket={sock}"
    finally:
        # qemu-nbd 7.2 can miss a SIGTERM sent right after it opened its socket: repeat it
        for _ in range(20):
            proc.terminate()
            try:
                proc.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool = True) -> Iterator[str]:
    """A loop device over ``image`` (detached afterwards)."""
    for attempt in range(5):  # --find races with other processes taking loop devices at the same moment
        done = subprocess.run(
            ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(image)],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            break
        time.sleep(0.2 * (attempt + 1))
    assert done.returncode == 0, f"losetup failed: {done.stderr}"
    device = done.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


KINDS = ("qcow2", "raw", "snapshot", "chain", "nbd", "block")


@contextlib.contextmanager
def make_case(kind: str, workdir: Path) -> Iterator[SourceCase]:
    """A source of ``kind`` (one of :data:`KINDS`) built in ``workdir/src``, holding :data:`PATTERN`."""
    src = workdir / "src"
    src.mkdir()
    if kind in ("qcow2", "nbd"):
        image = make_image(src / "disk.qcow2", "64M")
        write_pattern(image, "qcow2")
        if kind == "qcow2":
            yield SourceCase(kind, _file_source(image, "qcow2"), image)
        else:
            with served(image, "qcow2", src) as uri:
                yield SourceCase(kind, ExportSource("nbd", uri, "raw", _disk(image, "qcow2"), SIZE), image)
    elif kind in ("raw", "block"):
        image = make_image(src / "disk.raw", "64M", fmt="raw")
        write_pattern(image, "raw")
        if kind == "raw":
            yield SourceCase(kind, _file_source(image, "raw"), image)
        else:
            with loop_device(image) as device:
                yield SourceCase(kind, ExportSource("block", device, "raw", _disk(image, "raw"), SIZE), image)
    elif kind == "snapshot":
        image = make_image(src / "disk.qcow2", "64M")
        write_pattern(image, "qcow2")
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(image)], check=True)
        qemu_io(image, "qcow2", "write -P 0x99 0 2M", "write -z 40M 1M")  # the live state moves on
        reference = src / "s1.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "qcow2", str(image), str(reference)],
            check=True,
        )
        assert not images_equal(image, reference)
        yield SourceCase(kind, _file_source(image, "qcow2", image_opts={"snapshot.name": "s1"}), reference)
    elif kind == "chain":
        base = make_image(src / "base.qcow2", "64M")
        write_pattern(base, "qcow2", (*PATTERN[:2], (40 * 1024 * 1024, 4 * 1024 * 1024, 0x55)))
        top = make_image(src / "top.qcow2", backing=base)
        write_pattern(top, "qcow2", PATTERN[2:])
        reference = src / "flat.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(top), str(reference)], check=True)
        yield SourceCase(kind, _file_source(top, "qcow2"), reference)
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.fixture(params=KINDS)
def source_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceCase]:
    """One source of each kind, holding :data:`PATTERN` as its guest-visible content."""
    with make_case(request.param, tmp_path) as case:
        yield case


@pytest.fixture
def case_factory(tmp_path: Path) -> Iterator[CaseFactory]:
    """Makes sources of a given kind on demand (each in its own directory); cleans them all up."""
    with contextlib.ExitStack() as stack:
        count = iter(range(1000))

        def factory(kind: str) -> SourceCase:
            workdir = tmp_path / f"case{next(count)}"
            workdir.mkdir()
            return stack.enter_context(make_case(kind, workdir))

        yield factory


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted here for this test (smaller than the 4.5 MiB a source holds)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)


def _connect(process: QemuProcess, attempts: int = 50) -> QemuMachine:
    """A QemuMachine on the process's QMP socket, retried: the socket file can exist a moment before QEMU
    listens on it (ECONNREFUSED), and a connection that races QEMU's start can fail once."""
    for _ in range(attempts - 1):
        try:
            return QemuMachine(process.qmp_socket)
        except QMPConnectionError:
            if not process.alive():
                raise
            time.sleep(0.1)
    return QemuMachine(process.qmp_socket)


@pytest.fixture
def two_disk_vm(tmp_path: Path) -> Iterator[RunningVm]:
    """tests/conftest.py's two-disk VM, made robust for this directory: waits until QEMU listens on its QMP
    socket before connecting, and stops QEMU also when connecting fails."""
    images = {"disk0": make_image(tmp_path / "disk0.qcow2"), "disk1": make_image(tmp_path / "disk1.qcow2")}
    drives = [
        DriveSpec(images["disk0"], "disk0", serial="d0"),
        DriveSpec(images["disk1"], "disk1", bus="scsi", serial="d1"),
    ]
    process = QemuProcess(tmp_path, drives, name="testvm").start()
    machine: QemuMachine | None = None
    try:
        machine = _connect(process)
        yield RunningVm(process, machine, images, tmp_path)
    finally:
        if machine is not None:
            machine.close()
        process.stop()
        process.kill()
