"""gc is safe by construction (issue 21, item 4): two writers and one gc, real processes stopped at every
named step, run in a systematic set of orders; after each, every backup that was sealed restores byte-exact,
the kept one too, and the backups the next run on this host takes name only chunks the store holds (its
cache of known chunks must be true).

The full product is too large to run (two writers of 7 named steps and a gc of 6 interleave in 20!/(7!7!6!),
about 1.3 * 10**8 orders), so the orders are a systematic subset (100) that covers every pair of steps:

- **pairs**: for every worker X, every step x of X and every other worker Y — X runs to x, Y runs to its end,
  then the rest: so every step of Y runs while X stands at every one of its steps (in both directions);
- **writers around gc**: the writers stand at every pair of their steps while gc runs through;
- **gc around a writer**: gc stands at each of its steps and the first writer at each of its own while the
  second writer runs through.

Each worker is a pretend host of its own (a UTS namespace), so the others judge its leases by their expiry.
Every order runs with leases that have always expired (every worker is "stopped longer than its lease" at
every step: nothing refuses, and only the fences keep the backups whole); the pairs run with leases that stay
live too (backups and gc refuse each other; in the two other families gc would only refuse). The
repository starts with a kept backup and the chunks of a deleted one, among them a chunk both writers
produce, so that gc has garbage a writer may deduplicate against.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.repo.heal.interleave import END, GC_STEPS, WRITER_STEPS, Move, Stepper, run_schedule
from tests.integration.repo.heal.step_worker import backup
from tests.integration.s3.fixtures import BUCKET
from tests.integration.s3.seaweed import SeaweedServer
from vmsnap.repo.layout import RepositoryLayout
from vmsnap.repo.repository import Repository

CHUNK = 4 << 20
LIVE, EXPIRED = 120.0, 0.0
WRITERS = ("w1", "w2")
EXPECTED = (
    "is collecting garbage",  # a writer saw a live gc lock
    "are using the repository",  # gc saw a live lease
    "lost the lease",  # a worker's lease was taken over while it was stopped
    "fenced it",  # a writer lost its seal to gc's tombstone
)


def orders() -> list[tuple[str, list[Move]]]:
    """The schedules (see the module docstring), named."""
    found: list[tuple[str, list[Move]]] = []
    steps = {"w1": WRITER_STEPS, "w2": WRITER_STEPS, "gc": GC_STEPS}
    for first, own in steps.items():
        for step in own[1:]:
            for second in steps:
                if second != first:
                    found.append((f"pair:{first}@{step}+{second}", [(first, step), (second, END)]))
    for one in WRITER_STEPS[1:]:
        for two in WRITER_STEPS[1:]:
            found.append((f"writers:w1@{one},w2@{two}+gc", [("w1", one), ("w2", two), ("gc", END)]))
    for step in GC_STEPS[1:]:
        for one in WRITER_STEPS[1:]:
            found.append((f"gc@{step},w1@{one}+w2", [("gc", step), ("w1", one), ("w2", END)]))
    return found


def _random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Raw disk images: ``a`` and ``b`` share their first chunk (with the deleted backup ``old``)."""
    root = tmp_path_factory.mktemp("images")
    shared = os.urandom(CHUNK)
    made = {}
    for name in ("a", "b", "old"):
        made[name] = root / f"{name}.raw"
        made[name].write_bytes(shared + os.urandom(64 << 10))
    made["keep"] = root / "keep.raw"
    _random(made["keep"], CHUNK + (16 << 10))
    return made


def _backup(repo: RepositoryLayout, vm: str, image: Path) -> str:
    backup_id: str = backup({"vm": vm, "image": str(image)}, repo)["backup_id"]
    return backup_id


def _seed(repo: RepositoryLayout, images: dict[str, Path]) -> str:
    """A kept backup of ``keep``, and the chunks of a deleted backup of ``old`` (garbage for gc)."""
    kept = _backup(repo, "keep", images["keep"])
    old = _backup(repo, "old", images["old"])
    with repo.lock("old"):
        repo.delete_backup("old", old)
    return kept


def _restores(repo: RepositoryLayout, vm: str, backup_id: str, image: Path, out: Path) -> bool:
    _, disks = repo.restore(vm, backup_id, out, format="raw")
    return filecmp.cmp(disks[0].path, image, shallow=False)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[dict[str, Stepper], list[tuple[str, str]]]]:
    trace: list[tuple[str, str]] = []
    started = {name: Stepper.start(name, tmp_path, trace, host=f"{name}-host") for name in (*WRITERS, "gc")}
    for worker in started.values():
        worker.check_started()
    yield started, trace
    for worker in started.values():
        worker.close()


def _check(results: dict[str, dict[str, Any]], label: str) -> None:
    for name, result in results.items():
        if "error" in result:
            assert result["error"] == "LeaseError" and any(e in result["message"] for e in EXPECTED), (
                f"{label}: {name}: {result}"
            )


def run_orders(
    base: str,
    scratch: Path,
    images: dict[str, Path],
    workers: dict[str, Stepper],
    trace: list[tuple[str, str]],
    chosen: list[tuple[str, list[Move]]],
    modes: tuple[float, ...],
) -> dict[str, int]:
    """Run every chosen order in every lease mode, each on a fresh repository; check each; count."""
    counts = {"orders": 0, "distinct": 0, "sealed": 0, "fenced": 0, "gc_done": 0}
    distinct: set[tuple[tuple[str, str], ...]] = set()
    local = not base.startswith("s3://")
    template = Path(f"{base}-template")
    if local:  # seeded once, copied for each order (each order gets a state directory of its own)
        kept = _seed(Repository.init(template, state_root=Path(f"{base}-template-state")), images)
    for mode in modes:
        for number, (label, moves) in enumerate(chosen):
            where = f"{base}/{'live' if mode else 'expired'}-{number}"
            state = scratch / f"state-{Path(where).name}-{Path(base).name}"
            if local:
                shutil.copytree(template, where)
                library = Repository.open(where, state_root=state)
            else:  # (one client per order: making one costs about a second here)
                library = Repository.init(where, state_root=state)
                kept = _seed(library, images)
            common = {"repo": where, "state": str(state), "lease": mode}
            commands = {
                "w1": {**common, "op": "backup", "vm": "a", "image": str(images["a"])},
                "w2": {**common, "op": "backup", "vm": "b", "image": str(images["b"])},
                "gc": {**common, "op": "gc"},
            }
            del trace[:]
            began = time.monotonic()
            run_schedule(workers, commands, moves)
            if os.environ.get("HEAL_TIMING"):
                print(f"{label}: {time.monotonic() - began:.2f} s")
            results = {name: workers[name].result or {} for name in commands}
            label = f"{label} ({'live' if mode else 'expired'} leases) trace {trace}"
            _check(results, label)
            distinct.add(tuple(trace))
            out = scratch / f"out-{Path(where).name}-{Path(base).name}"
            sealed = {
                (vm, r["ok"]["backup_id"])
                for vm, r in (("a", results["w1"]), ("b", results["w2"]))
                if "ok" in r
            }
            for vm, backup_id in sealed:
                assert _restores(library, vm, backup_id, images[vm], out / backup_id), f"{label}: {vm}"
            assert _restores(library, "keep", kept, images["keep"], out / "keep"), label
            for vm in ("a", "b"):  # the next run on this host: its known chunks must be true
                _backup(library, vm, images[vm])
            report = library.verify(fast=True)  # every chunk a backup names is there
            assert report.ok, f"{label}: {report.problems}"
            counts["orders"] += 1
            counts["sealed"] += len(sealed)
            counts["fenced"] += sum("fenced it" in r.get("message", "") for r in results.values())
            counts["gc_done"] += "ok" in results["gc"]
            for done in (out, state, *((Path(where),) if local else ())):
                shutil.rmtree(done, ignore_errors=True)
    counts["distinct"] = len(distinct)
    return counts


def test_two_writers_and_gc_in_every_chosen_order_lose_no_sealed_backup(
    mount_tmpfs: Callable[[str], Path],
    images: dict[str, Path],
    workers: tuple[dict[str, Stepper], list[tuple[str, str]]],
) -> None:
    scratch = mount_tmpfs("256m")  # the orders are about order, not durability: no fsync waits
    started = time.monotonic()
    pairs = [order for order in orders() if order[0].startswith("pair:")]
    live = run_orders(str(scratch / "live"), scratch, images, *workers, pairs, (LIVE,))
    expired = run_orders(str(scratch / "expired"), scratch, images, *workers, orders(), (EXPIRED,))
    print(f"interleavings (local store): live {live}, expired {expired}, {time.monotonic() - started:.0f} s")
    assert live["orders"] == len(pairs) and expired["orders"] == len(orders())
    assert live["fenced"] == 0 and live["gc_done"] > 0 and live["sealed"] > 0
    assert expired["fenced"] > 0 and expired["gc_done"] > 0 and expired["sealed"] > 0


def test_the_deciding_orders_on_s3_with_expired_leases_lose_no_sealed_backup(
    s3_env: SeaweedServer,
    s3_prefix: str,
    mount_tmpfs: Callable[[str], Path],
    images: dict[str, Path],
    workers: tuple[dict[str, Stepper], list[tuple[str, str]]],
) -> None:
    """The same on SeaweedFS (its conditional puts are ``If-None-Match: *``), with expired leases: the orders
    where a fence decides (each order costs seconds there); ``VMSNAP_INTERLEAVE_ALL=1``: all 100."""
    scratch = mount_tmpfs("64m")
    chosen = orders()
    if os.environ.get("VMSNAP_INTERLEAVE_ALL") != "1":
        deciding = ("pair:w1@writer-sealing+gc", "pair:w1@writer-opened+gc", "pair:gc@gc-marked+w1")
        chosen = [order for order in chosen if order[0] in deciding]
    started = time.monotonic()
    counts = run_orders(f"s3://{BUCKET}/{s3_prefix}", scratch, images, *workers, chosen, (EXPIRED,))
    print(f"interleavings (S3): {counts}, {time.monotonic() - started:.0f} s")
    assert counts["orders"] == len(chosen) and counts["fenced"] > 0 and counts["sealed"] > 0
