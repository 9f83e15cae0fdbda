"""Repository operations in a process of their own, for the tests that stop or kill them mid-way.

usage: python -m tests.integration.repo.layouts.worker COMMAND JSON-ARGS

- ``backup {"repo", "qmp", "strategy", "incremental", "lease", "stop_at_progress"}``
- ``gc {"repo", "wait", "lease"}``
- ``restore {"repo", "vm", "backup", "to", "stop_at_progress"}``

``stop_at_progress``: the process stops itself (SIGSTOP) at the first progress report, inside the operation
(its lease taken), or with ``"second-disk"`` when the second disk starts (the first disk's chunks and index
stored), until the test sends SIGCONT. Prints one JSON object on success; on a
VmsnapError, its one line on stderr and exit status 1. ``$VMSNAP_TEST_CRASH_AT`` works as in the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from vmsnap.backup.run import Backup, BackupConfig
from vmsnap.errors import VmsnapError
from vmsnap.repo.chunks.leases import LEASE_ENV
from vmsnap.repo.repository import Repository
from vmsnap.vm.machine import QemuMachine


def _stopper(when: Any) -> Any:
    """A progress callback that stops the process once: at the first report (``when`` true), or with
    ``"second-disk"`` at the first report about the second disk (the first disk's chunks and index are
    stored, the manifest is not)."""
    state: dict[str, Any] = {"stopped": not when, "first": None}

    def progress(disk: str, *_: object) -> None:
        if state["first"] is None:
            state["first"] = disk
        if state["stopped"] or (when == "second-disk" and disk == state["first"]):
            return
        state["stopped"] = True
        os.kill(os.getpid(), signal.SIGSTOP)

    return progress


def run(command: str, args: dict[str, Any]) -> dict[str, Any]:
    lease = float(args.get("lease", 120.0))
    if command == "backup":
        Repository.open(args["repo"], create=True, lease_seconds=lease)
        machine = QemuMachine(Path(args["qmp"]))
        config = BackupConfig(
            repo=Path(args["repo"]),
            strategy=args.get("strategy", "backup"),
            incremental=bool(args.get("incremental")),
            quiesce="off",
        )
        backup = Backup(machine, config, progress=_stopper(args.get("stop_at_progress")))
        os.environ[LEASE_ENV] = str(lease)  # the lease lifetime of the run's repository, as a user sets it
        try:
            result = backup.run()
        finally:
            machine.close()
        return result.to_json()
    repo = Repository.open(args["repo"], lease_seconds=lease)
    if command == "gc":
        return repo.gc(wait=float(args.get("wait", 0))).to_json()
    if command == "restore":
        stop = _stopper(args.get("stop_at_progress"))
        manifest, disks = repo.restore(args["vm"], args["backup"], Path(args["to"]), progress=stop)
        return {"backup_id": manifest.backup_id, "disks": [str(d.path) for d in disks]}
    raise SystemExit(f"unknown command {command}")


def main() -> int:
    try:
        print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))
    except VmsnapError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
