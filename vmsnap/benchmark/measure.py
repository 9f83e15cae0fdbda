"""One measured figure of the strategy-cost harness and how several runs become it (their median).

Shared by the host's measurements (:mod:`.costs`) and the lab guest's (:mod:`.lvm_lab`); imports neither.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import attrs


@attrs.frozen
class Measurement:
    """One measured figure: the median of ``runs``.

    :param strategy: internal, external, backup, btrfs, lvm
    :param metric: write_first, write_again, write_baseline, delete, rollback
    :param variant: what distinguishes rows of the same metric (``lazy_refcounts=on``, ``commit``, ``64 MiB``)
    :param value: the median
    :param unit: ``MB/s``, ``s``, ``MiB``
    :param runs: every run's figure
    :param bytes_written: median bytes the cleanup wrote (kernel I/O accounting), for delete and rollback
    :param relative: a delete's or rollback's median time as a multiple of writing the same data without a
        snapshot on the same machine: what compares across machines (the lab guest's TCG included)
    """

    strategy: str
    metric: str
    variant: str
    value: float
    unit: str
    runs: tuple[float, ...]
    bytes_written: float | None = None
    relative: float | None = None


RunResult = float | tuple[float, float]
"""What one run returns: the figure, or (seconds, bytes written) for a cleanup."""


def median_of(
    strategy: str, metric: str, variant: str, unit: str, results: Sequence[RunResult]
) -> Measurement:
    """The measurement of ``results`` (one per run): the median figure and the median bytes written.

    :raise ValueError: no results
    """
    if not results:
        raise ValueError(f"{strategy} {metric} {variant}: no runs to take the median of")
    values = [r[0] if isinstance(r, tuple) else r for r in results]
    written = [r[1] for r in results if isinstance(r, tuple)]
    return Measurement(
        strategy=strategy,
        metric=metric,
        variant=variant,
        value=statistics.median(values),
        unit=unit,
        runs=tuple(round(v, 4) for v in values),
        bytes_written=statistics.median(written) if written else None,
    )


def measure(
    strategy: str, metric: str, variant: str, unit: str, one_run: Callable[[int], RunResult], runs: int
) -> Measurement:
    """Call ``one_run(i)`` for each of ``runs`` runs and take the median (see :func:`median_of`)."""
    return median_of(strategy, metric, variant, unit, [one_run(i) for i in range(runs)])


def progress_line(m: Measurement) -> str:
    """The line the harness prints when a figure is measured."""
    return f"{m.strategy:9} {m.metric:15} {m.variant:22} {m.value:10.3f} {m.unit}"
