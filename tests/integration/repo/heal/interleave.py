"""Drive repository workers (:mod:`tests.integration.repo.heal.step_worker`) step by step in a chosen order.

Each worker is a real process with ``VMSNAP_TEST_CRASH_AT=stop:*``: it stops itself (SIGSTOP) at every named
step and appends the step's name to its step log; :meth:`Stepper.advance` continues it (SIGCONT) until its
next step or its result. A schedule is a list of moves ``(worker, target)``: run that worker until it stops
at ``target`` (a step name), or to the end (``END``); a worker that ends earlier (refused) simply ends.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from vmsnap.processes import CRASH_ENV, STEP_LOG_ENV

END = "end"
WRITER_STEPS = (
    "worker-start",
    "writer-leased",
    "writer-opened",
    "writer-ready",
    "chunks-before-sync",
    "writer-indexed",
    "writer-sealing",
)
"""The named steps of a backup in a chunks repository, in order (a takeover adds ``lease-taking-over``)."""
GC_STEPS = ("worker-start", "gc-locked", "gc-fenced", "gc-marked", "gc-mid-sweep", "gc-swept")
"""The named steps of gc, in order (``gc-mid-sweep`` only when it has chunks to delete)."""

Move = tuple[str, str]
STEP_WORKER = "tests.integration.repo.heal.step_worker"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@attrs.define
class Stepper:
    """One worker process, idle, stopped at a step, or running a command to its result."""

    name: str
    process: subprocess.Popen[str]
    log: Path
    trace: list[tuple[str, str]]
    seen: int = 0
    step: str | None = None
    passed: list[str] = attrs.Factory(list)
    result: dict[str, Any] | None = None

    @classmethod
    def start(cls, name: str, workdir: Path, trace: list[tuple[str, str]], *, host: str) -> Stepper:
        """A worker on the pretend host ``host``: a UTS namespace of its own (``unshare --uts``), so that
        the leases it takes are judged like another host's (by their expiry) by workers on other hosts."""
        log = workdir / f"{name}.steps"
        log.write_text("")
        env = {**os.environ, CRASH_ENV: "stop:*", STEP_LOG_ENV: str(log)}
        script = 'hostname "$0" && exec "$@"'  # exec: the pid Popen sees is the worker's own
        process = subprocess.Popen(
            ["unshare", "--uts", "sh", "-c", script, host, sys.executable, "-m", STEP_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(workdir / f"{name}.stderr").open("a"),
            text=True,
            env=env,
        )
        return cls(name, process, log, trace)

    def send(self, command: dict[str, Any]) -> None:
        """Send a command; it stops at ``worker-start`` (see :meth:`settle`)."""
        assert self.step is None and self.process.stdin is not None
        self.result, self.passed = None, []
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def begin(self, command: dict[str, Any]) -> None:
        """Send a command and wait until it stops at ``worker-start``."""
        self.send(command)
        self.settle()

    def advance(self) -> None:
        """Continue from the step it is stopped at, until the next one or its result."""
        assert self.step is not None, f"{self.name} is not stopped"
        self.step = None
        os.kill(self.process.pid, signal.SIGCONT)
        self.settle()

    def run_to(self, target: str) -> None:
        """Run until it stops at ``target`` (nothing, if it passed it already) or, with ``END``, finishes."""
        if target != END and target in self.passed:
            return
        while self.step is not None and self.step != target:
            self.advance()

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until it stops at its next step, or its result comes."""
        out = self.process.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([out], [], [], 0.001)[0]:
                line = out.readline()
                assert line, f"worker {self.name} exited: code {self.process.poll()}"
                self.result = json.loads(line)
                self.trace.append((self.name, END))
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited: code {self.process.returncode}")
            if _state(self.process.pid) == "T":
                lines = self.log.read_text().splitlines()
                if len(lines) > self.seen:
                    assert len(lines) == self.seen + 1, lines[self.seen :]
                    self.step = lines[self.seen]
                    self.seen += 1
                    self.passed.append(self.step)
                    self.trace.append((self.name, self.step))
                    return
        raise AssertionError(f"worker {self.name} neither stopped nor finished in {timeout} s")

    def check_started(self) -> None:
        """Fail naming the package when ``unshare`` is missing (the worker exits at once then)."""
        try:
            self.process.wait(0.2)
        except subprocess.TimeoutExpired:
            return
        raise AssertionError(f"worker {self.name} could not start: unshare --uts needs root and util-linux")

    def close(self) -> None:
        """End the process (by its pid): stdin closed, or killed when it is stopped or stuck."""
        if self.process.poll() is None:
            if self.step is not None:
                self.process.kill()
            else:
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_schedule(
    workers: dict[str, Stepper], commands: dict[str, dict[str, Any]], moves: Sequence[Move]
) -> None:
    """Begin every worker's command (each opens the repository, then stops at ``worker-start``), make the
    moves, then run every worker to its end (in name order)."""
    for name, command in commands.items():
        workers[name].send(command)
    for name in commands:
        workers[name].settle()
    for name, target in [*moves, *((name, END) for name in sorted(commands))]:
        workers[name].run_to(target)
