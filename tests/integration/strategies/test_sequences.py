"""Random sequences of write / snapshot / delete / rollback on offline images (hypothesis), checked against a
model of the bytes after every step: the layer bookkeeping of internal and external snapshots, whatever the
order of operations. The CI run keeps a few examples; ``-m slow`` runs many."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_image
from tests.integration.strategies.contract import run
from vmsnap.image.qemu_img import convert_argv
from vmsnap.model import ExportSource
from vmsnap.strategies import strategy_class
from vmsnap.strategies.base import Strategy
from vmsnap.vm.machine import OfflineMachine

pytestmark = pytest.mark.filterwarnings("ignore::vmsnap.strategies.internal.LazyRefcountsWarning")

BLOCK = 256 * 1024
BLOCKS = 16
SIZE = BLOCK * BLOCKS

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, BLOCKS - 1), st.integers(1, 4), st.integers(1, 255)),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("delete"), st.integers(0, 7)),
        st.tuples(st.just("rollback"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=9,
)


def _exported(source: ExportSource, workdir: Path) -> bytes:
    out = workdir / "export.raw"
    run(convert_argv(source, out, target_format="raw"))
    data = out.read_bytes()
    out.unlink()
    return data


def _current(image: Path, workdir: Path) -> bytes:
    out = workdir / "current.raw"
    run(["qemu-img", "convert", "-f", "qcow2", str(image), "-O", "raw", str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def _check(
    strategy: Strategy,
    image: Path,
    model: bytearray,
    snaps: dict[str, bytes],
    workdir: Path,
    *,
    exports: bool,
) -> None:
    assert _current(image, workdir) == bytes(model)
    refs = {r.name: r for r in strategy.list()}
    assert set(refs) == set(snaps)
    if exports:
        for name, ref in refs.items():
            with strategy.export(ref) as source:
                assert _exported(source, workdir) == snaps[name], f"snapshot {name}"
    run(["qemu-img", "check", "-q", str(image)])


def play(strategy_name: str, ops: Sequence[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        image = make_image(workdir / "disk0.qcow2", size=str(SIZE))
        machine = OfflineMachine([image])
        options = {"export_via": "file"} if strategy_name == "internal" else {}  # nbd: the contract's job
        strategy: Strategy = strategy_class(strategy_name)(machine, **options)
        model = bytearray(SIZE)
        snaps: dict[str, bytes] = {}
        order: list[str] = []  # creation order of the live snapshots
        made = 0
        for op in ops:
            if op[0] == "write":
                start, count, pattern = op[1], min(op[2], BLOCKS - op[1]), op[3]
                command = f"write -P {pattern} {start * BLOCK} {count * BLOCK}"
                run(["qemu-io", "-f", "qcow2", "-c", command, str(image)])
                model[start * BLOCK : (start + count) * BLOCK] = bytes([pattern]) * (count * BLOCK)
            elif op[0] == "snapshot":
                name = f"s{made}"
                made += 1
                strategy.create(machine.disks(), name=name)
                snaps[name] = bytes(model)
                order.append(name)
            elif order:
                name = order[op[1] % len(order)]
                (ref,) = [r for r in strategy.list() if r.name == name]
                if op[0] == "delete":
                    strategy.delete(ref)
                    order.remove(name)
                    del snaps[name]
                else:
                    strategy.rollback(ref)
                    model[:] = snaps[name]
                    survivors = {r.name for r in strategy.list()}
                    older = order[: order.index(name)]
                    assert set(older) <= survivors <= set(order)  # newer ones may go with the rollback
                    order = [n for n in order if n in survivors]
                    snaps = {n: snaps[n] for n in order}
            # every snapshot's export after the steps that move layers; the live bytes after every step
            _check(strategy, image, model, snaps, workdir, exports=op[0] in ("delete", "rollback"))
        _check(strategy, image, model, snaps, workdir, exports=True)
        leftovers = sorted(p.name for p in workdir.iterdir())
        expected = ["disk0.qcow2"] + [
            f"disk0.qcow2.vmsnap-{n}.qcow2" for n in order if strategy_name == "external"
        ]
        assert leftovers == sorted(expected)


@pytest.mark.parametrize("strategy_name", ["internal", "external"])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_sequences_keep_every_snapshot_exact(strategy_name: str, ops: list[tuple[Any, ...]]) -> None:
    play(strategy_name, ops)


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["internal", "external"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_sequences_many(strategy_name: str, ops: list[tuple[Any, ...]]) -> None:
    play(strategy_name, ops)


def test_a_known_tricky_external_sequence() -> None:
    """Snapshots s0 < s1 < s2, delete the middle, roll back to the oldest, snapshot again, delete all."""
    ops = [
        ("write", 0, 2, 1),
        ("snapshot",),
        ("write", 1, 2, 2),
        ("snapshot",),
        ("write", 2, 2, 3),
        ("snapshot",),
        ("write", 3, 2, 4),
        ("delete", 1),
        ("rollback", 0),
        ("write", 5, 1, 5),
        ("snapshot",),
        ("delete", 0),
        ("delete", 0),
        ("delete", 0),
    ]
    play("external", ops)  # internal snapshots are QEMU's own bookkeeping; the random runs cover them
