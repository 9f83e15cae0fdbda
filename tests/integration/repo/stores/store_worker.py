"""A store client in a process of its own, for the contract suite's multi-process and kill tests.

Run as ``python store_worker.py LOCATION KEY SIZE SEED MODE`` (MODE ``put``, ``put-if-absent`` or
``put-unsynced``), with the AWS chain (if any) in its environment, never on the command line. It opens the
store, makes its data (``seeded_bytes(SIZE, SEED)``), prints ``ready``, waits for a line on stdin, prints
``putting``, puts, and prints one JSON line: ``{"written": true|false}``, or ``{"error": "..."}`` with exit
status 1. ``put-unsynced`` puts ``KEY/0`` … ``KEY/4`` (seeds SEED … SEED+4) with ``durable=False``, prints
``queued`` and waits for stdin again, never calling ``sync()`` (the test kills it there).
"""

from __future__ import annotations

import json
import random
import sys


def seeded_bytes(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes that depend on ``seed`` only (the tests recompute them)."""
    return random.Random(seed).randbytes(size)


def main(argv: list[str]) -> int:
    location, key, size, seed, mode = argv
    from vmsnap.errors import VmsnapError
    from vmsnap.repo.stores import open_store

    store = open_store(location)
    data = seeded_bytes(int(size), int(seed))
    print("ready", flush=True)
    sys.stdin.readline()
    print("putting", flush=True)
    if mode == "put-unsynced":
        for number in range(5):
            store.put(f"{key}/{number}", seeded_bytes(int(size), int(seed) + number), durable=False)
        print("queued", flush=True)
        sys.stdin.readline()
        return 0
    try:
        written = store.put(key, data, if_absent=mode == "put-if-absent")
    except VmsnapError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    print(json.dumps({"written": written}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
