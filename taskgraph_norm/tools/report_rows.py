"""What every ``taskgraph-norm report`` row is measured for, whichever norm it runs:
the configuration, the row's facts, the checks (batch invariance, ULP error) and the
table.  :mod:`.report` runs RMSNorm's rows, :mod:`.report_layer` LayerNorm's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ConfigError
from ..graph import Graph
from ..prover import prove
from ..testing import bits_equal
from .report_timing import RoundTimes, max_abs

__all__ = ["DTYPES", "NORMS", "ReportConfig", "ReportRow", "batch_invariant", "check_effort", "format_table",
           "measure_row", "ulp_error", "with_best"]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MANTISSA_BITS = {torch.float32: 24, torch.float64: 53, torch.float16: 11, torch.bfloat16: 8}

#: ``--norm``: which norm's rows the report runs.
NORMS = ("rms", "layer")


@dataclass(frozen=True)
class ReportConfig:
    """What to run: the input, the measurement effort and the norm (``"rms"`` or ``"layer"``)."""

    shape: tuple[int, ...] = (4, 256, 4096)
    dtype: str = "float32"
    seed: int = 0
    chunk_size: int = 64
    leaf: str = "pairwise"
    repeats: int = 40
    norm: str = "rms"


@dataclass(frozen=True)
class ReportRow:
    """The measured facts of one system on one input."""

    name: str
    topology: str
    executor: str
    median_ms: float
    run_spread: float
    diff_vs_standard: float
    batch_invariant: bool
    max_abs_err: float
    max_ulp_err: float
    accumulate: str = "float"
    proved: str = ""
    agrees: bool = True
    #: How the time was taken: ``"out="`` (into a preallocated output),
    #: ``"fresh output"``, or for ``standard`` the faster of torch's two eager
    #: kernels in this run: ``"with weight"`` or ``"without weight"``.
    timed: str = ""
    #: ``standard`` only: the median ms of the other (slower) of the two kernels.
    slower_kernel_ms: float | None = None
    #: Median over rounds of standard's time / this row's time in the same round.
    speedup: float = 1.0


def check_effort(config: ReportConfig, x: torch.Tensor) -> None:
    """An input with no element, or repeats that are not an integer >= 1: ConfigError."""
    if x.numel() == 0:
        raise ConfigError("shape", config.shape, "a shape with no zero dimension")
    if isinstance(config.repeats, bool) or not isinstance(config.repeats, int) or config.repeats < 1:
        raise ConfigError("repeats", config.repeats, "an integer >= 1 (timed rounds)")


def ulp_error(y: torch.Tensor, ref64: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Largest ``|y - ref| / ulp(ref)`` in ``y``'s format (subnormals use their fixed spacing).

    ``scale``: where ``y`` is the rounded sum of terms larger than itself (LayerNorm's
    ``x_hat * w + b``), the ulp is that of ``max(|ref|, |scale|)``, the spacing at which
    the last addition rounds."""
    if y.numel() == 0:
        return 0.0
    _, exponent = torch.frexp(ref64 if scale is None else torch.maximum(ref64.abs(), scale.abs()))
    ulp = torch.ldexp(torch.ones_like(ref64), exponent - _MANTISSA_BITS[y.dtype])
    info = torch.finfo(y.dtype)
    ulp = torch.clamp(ulp, min=info.smallest_normal * info.eps)
    err = (y.double() - ref64).abs() / ulp
    finite = torch.isfinite(err)
    return float(err[finite].max()) if bool(finite.any()) else 0.0


def batch_invariant(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, full: torch.Tensor, seed: int) -> bool:
    """Rows alone, a small prefix batch and a shuffled full batch all match ``full``."""
    rows = x.shape[0]
    probe = sorted({0, rows // 2, rows - 1})
    for r in probe:
        if not bits_equal(run(x[r : r + 1]), full[r : r + 1]):
            return False
    prefix = min(rows, 7)
    if not bits_equal(run(x[:prefix]), full[:prefix]):
        return False
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return bits_equal(run(x[perm]), full[perm])


class System(Protocol):
    """What a row's system must say: its name, graph and accumulation."""

    @property
    def name(self) -> str: ...
    @property
    def topology(self) -> str: ...
    @property
    def accumulate(self) -> str: ...


class Runner(Protocol):
    """One row's runner, as :func:`measure_row` reads it."""

    @property
    def system(self) -> System: ...
    @property
    def graph(self) -> Graph: ...
    @property
    def eager(self) -> bool: ...
    @property
    def compiled(self) -> bool: ...
    @property
    def executor(self) -> str: ...
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def measure_row(
    run: Runner, x2: torch.Tensor, timing: RoundTimes, seed: int, standard: torch.Tensor, ref64: torch.Tensor,
    standard_names: tuple[str, ...], ulp_scale: torch.Tensor | None = None,
) -> ReportRow:
    """A row's facts from the timed rounds (``standard_names``: the standard row's timed
    kernels, the fastest of which is the baseline), its proof and the checks
    (``ulp_scale``: :func:`ulp_error`'s ``scale``)."""
    seen = timing.observed[run.system.name]
    assert seen.first is not None
    first = seen.first
    baseline = timing.fastest(*standard_names)
    seconds = timing.median(run.system.name)
    speedup = timing.speedup(run.system.name, over=baseline)
    timed, slower = "out=" if run.compiled else "fresh output", None
    if run.eager:
        medians = [timing.median(n) for n in standard_names]
        timed = "without weight" if baseline != standard_names[0] else "with weight"
        seconds, slower = min(medians), (max(medians) * 1e3 if len(medians) > 1 else None)
        speedup = 1.0
    proof = prove(run.graph)
    invariant = batch_invariant(run, x2, first, seed)
    # A certificate contradicted by a measurement is a bug, never a footnote.
    agrees = not (proof.deterministic and not seen.same_bits) and not (proof.batch_invariant and not invariant)
    system = run.system
    return ReportRow(
        name=system.name,
        topology=system.topology,
        executor=run.executor,
        median_ms=seconds * 1e3,
        run_spread=seen.spread,
        diff_vs_standard=max_abs(first, standard),
        batch_invariant=invariant,
        max_abs_err=max_abs(first, ref64),
        max_ulp_err=ulp_error(first, ref64, ulp_scale),
        accumulate=system.accumulate,
        proved=proof.summary,
        agrees=agrees,
        timed=timed,
        slower_kernel_ms=slower,
        speedup=speedup,
    )


def with_best(rows: list[ReportRow]) -> list[ReportRow]:
    """``rows`` and, when there is one, the fastest row the prover certifies
    (deterministic and batch-invariant) whose measurements agree, as ``best: ...``."""
    candidates = [r for r in rows if r.proved.startswith("certified") and r.agrees]
    if candidates:
        best = max(candidates, key=lambda r: r.speedup)
        rows.append(ReportRow(**{**best.__dict__, "name": f"best: {best.name}"}))
    return rows


_HEADERS = (
    "system", "graph", "executor", "median ms", "run-to-run max diff",
    "max diff vs standard", "batch-invariant (measured)", "proved", "max abs err vs fp64",
    "max ULP err",
)


def format_table(rows: list[ReportRow]) -> str:
    """A Markdown table of the rows (aligned, readable as plain text too)."""
    cells = [
        (
            r.name, r.topology if r.accumulate == "float" else f"{r.topology}, {r.accumulate}",
            r.executor, f"{r.median_ms:.3f}", f"{r.run_spread:.2e}",
            f"{r.diff_vs_standard:.2e}", "yes" if r.batch_invariant else "NO",
            r.proved if r.agrees else f"CONTRADICTED: {r.proved}",
            f"{r.max_abs_err:.2e}", f"{r.max_ulp_err:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]

    def line(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    out = [line(_HEADERS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)
