"""Several "hosts" sharing one S3 repository, on one machine: each host is a ``vmsnap`` process in a UTS
namespace of its own (``unshare --uts``, its own host name, so leases see another host), started in a working
directory of its own with a state directory of its own (``$VMSNAP_STATE_DIR``: its journals and its
known-chunks cache), reaching the test's SeaweedFS through the AWS chain in its environment.

The VMs are powered-off qcow2 images: clones of one base image (full copies, as a template deploys them),
each with some data of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from tests.integration.cli_helpers import VMSNAP, CliResult
from tests.integration.s3.seaweed import SeaweedServer

MiB = 1 << 20
STOPPED_TIMEOUT = 120.0


@attrs.frozen
class Host:
    """One pretend host: its name, working directory and environment (see the module docstring), and the
    UTS namespaces of the processes it started (what :meth:`die` kills: another test, worker or run may
    have a host of the same name)."""

    name: str
    workdir: Path
    env: Mapping[str, str]
    namespaces: set[int] = attrs.field(factory=set, eq=False)

    @classmethod
    def make(cls, name: str, root: Path, server: SeaweedServer, **extra: str) -> Host:
        workdir = root / name
        (workdir / "state").mkdir(parents=True, exist_ok=True)
        env = server.env()
        env.update(VMSNAP_STATE_DIR=str(workdir / "state"), **extra)
        return cls(name, workdir, env)

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def argv(self, *args: str | Path) -> list[str]:
        # unshare and sh exec: the pid Popen sees is vmsnap's own
        script = 'hostname "$0" && exec "$@"'
        return ["unshare", "--uts", "sh", "-c", script, self.name, VMSNAP, *[str(a) for a in args]]

    def start(self, *args: str | Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """``vmsnap ARGS`` on this host, running (stdout and stderr piped)."""
        process = subprocess.Popen(
            self.argv(*args),
            cwd=self.workdir,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._remember_namespace(process)
        return process

    def _remember_namespace(self, process: subprocess.Popen[str]) -> None:
        """Wait until ``unshare`` has made the process's UTS namespace and note it (a process that ends
        first made nothing for :meth:`die` to find)."""
        ours = os.stat("/proc/self/ns/uts").st_ino
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                namespace = os.stat(f"/proc/{process.pid}/ns/uts").st_ino
            except FileNotFoundError:
                return
            if namespace != ours:
                self.namespaces.add(namespace)
                return
            time.sleep(0.001)

    def run(self, *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 300) -> CliResult:
        """``vmsnap ARGS`` on this host, to the end."""
        return finish(self.start(*args, env=env), timeout)

    def die(self) -> list[int]:
        """The rest of this host dies with its killed vmsnap: every process still running in the UTS
        namespaces of this host's processes (a qemu-nbd that served a powered-off image, say) is killed by
        pid; returns those pids."""
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "ns" / "uts").stat().st_ino not in self.namespaces:
                    continue
                name = subprocess.run(
                    ["nsenter", "-t", entry.name, "--uts", "hostname"], capture_output=True, text=True
                ).stdout.strip()
                if name == self.name:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # gone meanwhile
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.05)
        return killed


def finish(process: subprocess.Popen[str], timeout: float = 300) -> CliResult:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return CliResult(process.returncode, out, err)


def ok_json(result: CliResult) -> Any:
    assert result.code == 0, result.err
    return result.json()


def wait_stopped(process: subprocess.Popen[str]) -> None:
    """Until ``process`` has stopped itself (a ``stop:`` crash point); fails if it exits instead."""
    deadline = time.monotonic() + STOPPED_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"it ended instead of stopping: {finish(process).err}")
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError("it did not stop")


def resume(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGCONT)


def write_random(image: Path, offset_mib: int, size_mib: int) -> None:
    """Random (incompressible) data into a qcow2 image, as a guest would write it."""
    data = image.with_suffix(".random")
    data.write_bytes(os.urandom(size_mib * MiB))
    try:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -s {data} {offset_mib}M {size_mib}M", str(image)],
            check=True,
            capture_output=True,
        )
    finally:
        data.unlink()


def base_image(path: Path, *, size: str = "256M", data_mib: int = 48) -> Path:
    """A qcow2 image with ``data_mib`` MiB of random data at its start."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    write_random(path, 0, data_mib)
    return path


def clones(base: Path, names: Sequence[str], *, own_mib: int = 1, at_mib: int = 128) -> dict[str, Path]:
    """Full copies of ``base``, one per name, each with ``own_mib`` MiB of random data of its own at
    ``at_mib`` (clones of one template, then used)."""
    made = {}
    for name in names:
        image = base.with_name(f"{name}.qcow2")
        shutil.copyfile(base, image)
        if own_mib:
            write_random(image, at_mib, own_mib)
        made[name] = image
    return made


def snapshot(image: Path, dest: Path) -> Path:
    """What the image holds now, as a standalone qcow2 (to compare a restore with)."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(image), str(dest)], check=True)
    return dest


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-U", str(a), str(b)]).returncode == 0


def bitmaps(image: Path) -> list[str]:
    """The names of the image's persistent dirty bitmaps (a run that died may leave a pending one)."""
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    return sorted(b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def image_is_clean(image: Path) -> bool:
    """``qemu-img check`` finds nothing, and only vmsnap's own bitmap is there (no pending one)."""
    check = subprocess.run(["qemu-img", "check", "-q", str(image)], capture_output=True)
    return check.returncode == 0 and bitmaps(image) in ([], ["vmsnap"])
