"""A repository worker for the interleaving test: one JSON command per line on stdin, one JSON result per line
on stdout, for as long as stdin is open.

usage: python -m tests.integration.repo.heal.step_worker  (with VMSNAP_TEST_CRASH_AT=stop:* and
VMSNAP_TEST_STEP_LOG=FILE, every named step stops the process — see :func:`vmsnap.processes.crash_point`)

- ``{"op": "backup", "repo", "state", "lease", "vm", "image"}``: a full backup of a raw image (one disk,
  ``disk0``) through the chunks writer, as ``vmsnap backup`` drives it: the VM's lease, begin, write, seal;
- ``{"op": "gc", "repo", "state", "lease"}``: ``vmsnap gc``;
- ``{"op": "hold", "repo", "state", "lease", "vm"}``: take the VM's writer lease, stop at the step
  ``worker-holding``, check the lease is still this process's, and let it go.

Each command opens the repository (it reads the marker), then stops at the step ``worker-start``, so that
the test decides when it does anything else.
The result is ``{"ok": {...}}``, or ``{"error": CLASS, "message": …}`` for a VmsnapError, or ``{"error":
"crash", "message": TRACEBACK}`` for anything else.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from vmsnap.errors import VmsnapError
from vmsnap.model import Disk, ExportSource
from vmsnap.processes import crash_point
from vmsnap.repo.repository import Repository


def _open(args: dict[str, Any]) -> Any:
    return Repository.open(args["repo"], state_root=Path(args["state"]), lease_seconds=float(args["lease"]))


def backup(args: dict[str, Any], repo: Any) -> dict[str, Any]:
    image = Path(args["image"])
    size = image.stat().st_size
    disk = Disk(name="disk0", node_name="", file=image, format="raw", virtual_size=size)
    source = ExportSource(kind="file", location=str(image), format="raw", disk=disk, virtual_size=size)
    with repo.lock(args["vm"]):
        writer = repo.begin_backup(args["vm"], None)
        try:
            writer.write(disk, source, transport=None, progress=lambda done, total: None)
            manifest = writer.seal(
                kind="full", parent=None, strategy="internal", quiesced=False, bitmap=None, definition=None
            )
        except BaseException:
            writer.discard()
            raise
    return {"backup_id": manifest.backup_id}


def gc(args: dict[str, Any], repo: Any) -> dict[str, Any]:
    return dict(repo.gc().to_json())


def hold(args: dict[str, Any], repo: Any) -> dict[str, Any]:
    with repo.lock(args["vm"]):
        crash_point("worker-holding")
        repo._held[args["vm"]].check()  # (the lease object this process holds)
    return {"held": args["vm"]}


OPS = {"backup": backup, "gc": gc, "hold": hold}


def main() -> int:
    for line in sys.stdin:
        args = json.loads(line)
        try:
            repo = _open(args)
            crash_point("worker-start")
            result: dict[str, Any] = {"ok": OPS[args["op"]](args, repo)}
        except VmsnapError as err:
            result = {"error": type(err).__name__, "message": str(err)}
        except Exception:
            result = {"error": "crash", "message": traceback.format_exc()}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
