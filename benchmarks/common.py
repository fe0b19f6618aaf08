"""Shared timing helpers for the benchmark scripts (not part of the library).  Their
loops show a tqdm bar on a terminal (stderr) and nothing otherwise, as the
library's :func:`~taskgraph_norm.tools.bench.interleaved_medians` does."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from taskgraph_norm.tools.bench import interleaved_medians

__all__ = ["interleaved_medians", "median_seconds", "minor_faults", "repeated", "seconds_per_call", "fastest",
           "target_row", "train_step", "TARGET_HEADER"]

try:
    import resource
except ImportError:  # not a Unix: no fault counts
    resource = None  # type: ignore[assignment]


def minor_faults() -> int:
    """This process's minor page faults so far (0 where the platform does not count
    them): pages the kernel mapped in on first touch, such as a heap block glibc gave
    back to the OS and a later allocation took again (docs/performance.md, "Page faults")."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_seconds(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    # (imported here: benchmarks/versions.py's workers import this module beside an
    # older version of the package, which may not have it)
    from taskgraph_norm.tools.progress import progress_bar

    for _ in range(warmup):
        fn()
    times = []
    with progress_bar(repeats, "repeats", unit="call") as bar:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            bar.update()
    return statistics.median(times)


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """``fn`` called ``calls`` times in a row: one timing of a call too short to time alone
    (divide the median by ``calls``)."""

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def seconds_per_call(run: Callable[[], object], calls: int) -> float:
    """One timing of ``run()``, which makes ``calls`` calls, divided back to one call."""
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) / calls


def fastest(times: dict[str, float], *names: str) -> str:
    """Which of ``names`` has the smallest time in ``times`` (ignoring names not there)."""
    return min((n for n in names if n in times), key=times.__getitem__)


TARGET_HEADER = (
    "| case | ours us | baseline us | baseline | ratio | target | met |\n"
    "|---|---|---|---|---|---|---|"
)


def target_row(case: str, ours_s: float, base_s: float, baseline: str, target: float | None) -> str:
    """One line of a ``TARGET_HEADER`` table: times in microseconds, ratio ours / baseline
    (``target=None``: a line for scale, with no target)."""
    ratio = ours_s / base_s
    goal, met = ("-", "-") if target is None else (f"<= {target:g}x", "yes" if ratio <= target else "**no**")
    return f"| {case} | {ours_s * 1e6:.1f} | {base_s * 1e6:.1f} | {baseline} | {ratio:.2f}x | {goal} | {met} |"


def train_step(module: Any, x: Any, dy: Any) -> Callable[[], None]:
    """One training step of a norm, as a timing calls it: the gradients cleared (to
    ``None``, as an optimizer's ``zero_grad`` does), then ``module(x).backward(dy)``."""

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    return step
