"""How ``taskgraph-norm report`` times its rows: interleaved rounds, each row's
outputs checked between calls, and per-round times kept for paired ratios."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..testing import bits, bits_equal
from .bench import interleaved_times
from .progress import ProgressBar

__all__ = ["Observed", "RoundTimes", "max_abs", "time_rounds"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` in fp64 (NaN against NaN counts 0, NaN against a number inf)."""
    if a.dtype == b.dtype:
        # Only elements whose bits differ can differ: a cheap pass first, then the
        # fp64 arithmetic on those alone.
        differ = bits(a) != bits(b)
        a, b = a[differ], b[differ]
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    both_nan = a.isnan() & b.isnan()
    d = torch.where(both_nan, torch.zeros_like(d), d)
    return float(d.nan_to_num(nan=float("inf")).max())


class Observed:
    """What a row's timed outputs showed: a copy of the first (an ``out=`` buffer
    is overwritten by the next call), the run-to-run spread (max abs difference
    from the first) and whether every output had the first one's bits."""

    def __init__(self) -> None:
        self.first: torch.Tensor | None = None
        self.spread = 0.0
        self.same_bits = True

    def __call__(self, y: torch.Tensor) -> None:
        if self.first is None:
            self.first = y.clone()
        elif not bits_equal(y, self.first):
            self.same_bits = False
            self.spread = max(self.spread, max_abs(y, self.first))


@dataclass(frozen=True)
class RoundTimes:
    """Seconds of every timed call per method, round by round, and what the
    observed methods' outputs showed."""

    times: dict[str, list[float]]
    observed: dict[str, Observed]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def fastest(self, *names: str) -> str:
        """Which of ``names`` has the smallest median."""
        return min(names, key=self.median)

    def speedup(self, name: str, *, over: str) -> float:
        """Median over rounds of ``over``'s time / ``name``'s time in the same round:
        paired by round, so a load that comes and goes cancels."""
        return statistics.median(b / t for b, t in zip(self.times[over], self.times[name]))


def time_rounds(
    methods: dict[str, Callable[[], object]], rounds: int, *, observed: Iterable[str], bar: ProgressBar | None = None,
) -> RoundTimes:
    """:func:`~.bench.interleaved_times` of ``methods``; the outputs of the
    ``observed`` ones (tensors) are compared call by call, outside the timing;
    ``bar``, when given, advances by one per round."""
    seen = {name: Observed() for name in observed}

    def observe(name: str, y: object) -> None:
        if name in seen:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"{name} returned {type(y).__name__}, not a tensor")
            seen[name](y)

    return RoundTimes(interleaved_times(methods, rounds, observe=observe, bar=bar), seen)
