"""``taskgraph-norm report``: every system of the original report, run and checked.

Each row is one way of computing RMSNorm (the report's standard kernel, its
unordered "variant", V1-V4, and the best certified configuration).  Every row
runs the same input, interleaved: ``repeats`` rounds, each calling every row
once, so load from other work hits all rows alike.  Each row is measured for:

* median wall time per call over the rounds (compiled rows write into a
  preallocated output, ``out=``; the others allocate theirs; ``standard`` is
  torch's eager ``F.rms_norm``, timed as the faster of its kernels with and
  without weight in the same rounds, which can differ severalfold on a CPU);
* run-to-run spread: the largest absolute difference between any run and the
  first one (``0`` means every run gave the same bits);
* the largest difference from torch's ``F.rms_norm`` on the same input;
* batch invariance, measured: rows computed alone, in a small batch and at
  shuffled positions of the full batch must have identical bits;
* accuracy against an fp64 reference: max absolute error and max ULP error.

Certified rows run on the compiled executor (the path ``normalize`` takes).
Race rows run on the concurrent executor, so their arrival orders are real:
the report's V2 under ``Fifo`` (partials merge in the order worker threads
finish), its unordered "variant" and the exact race under an unseeded
``Random`` schedule (a fresh order every run).  The executor column says which.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import anyio
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .. import kernels
from ..executors.concurrent import schedules
from ..api import normalize_sync
from ..checks import check_input
from ..errors import ConfigError
from ..executors import run_concurrent, run_reference
from ..pipeline import for_graph
from ..executors.concurrent.trace import Trace
from ..graph import Graph
from ..testing import bits_equal
from ..topologies import build_graph
from .progress import ProgressBar, progress_bar
from .report_rows import DTYPES, ReportConfig, ReportRow, check_effort, format_table, measure_row, ulp_error, with_best
from .report_timing import RoundTimes, time_rounds

__all__ = [
    "ReportConfig",
    "ReportRow",
    "SYSTEMS",
    "format_table",
    "fp64_reference",
    "measure_rows",
    "report_text",
    "run_report",
    "traced_run",
    "ulp_error",
]

@dataclass(frozen=True)
class System:
    """One row of the original report and the graph configuration that realises it."""

    name: str
    seed_row: str
    topology: str
    schedule: str | None = None  # None: reference executor; else a concurrent schedule
    accumulate: str = "float"


#: The original report's rows, in its order.  ``best`` is added by :func:`measure_rows`.
SYSTEMS: tuple[System, ...] = (
    System("standard", "标准RMSNorm", "standard"),
    System("variant (unordered)", "分块并行Variant", "race", schedule="random"),
    System("V1 linear", "Invariant V1", "linear"),
    System("V2 race (lock)", "Invariant V2", "race", schedule="fifo"),
    System("V3 tree", "Invariant V3", "tree"),
    System("V4 cat", "Invariant V4", "cat"),
    # Beyond the original report: the lock-free race made order-free by exact sums.
    System("V2 race + exact", "(new)", "race", schedule="random", accumulate="exact"),
)


def fp64_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp64 throughout (the accuracy yardstick)."""
    x64 = x.double()
    y = x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


class _Runner:
    """Runs one system on 2-D input: torch's eager kernel for ``standard``, the
    compiled (or reference) executor for certified rows, and for race rows the
    concurrent executor under the system's schedule, through ``portal``."""

    def __init__(
        self, system: System, hidden: int, config: ReportConfig, weight: torch.Tensor, portal: BlockingPortal
    ) -> None:
        self.system = system
        self.weight = weight
        self.portal = portal
        self.eps = kernels.default_eps(DTYPES[config.dtype])
        self.graph: Graph = build_graph(
            hidden, chunk_size=config.chunk_size, topology=system.topology, leaf=config.leaf,
            accumulate=system.accumulate,
        )
        self.eager = system.topology == "standard"
        # Certified rows run compiled (what normalize() uses); race rows run on the
        # concurrent executor, because real arrival orders are their point.
        self.pipeline = for_graph(self.graph)
        self.compiled = not self.eager and system.schedule is None and self.pipeline.executor == "compiled"

    @property
    def executor(self) -> str:
        if self.eager:
            return "torch eager"
        if self.system.schedule is not None:
            return f"concurrent, {self.system.schedule} schedule"
        return "compiled" if self.compiled else "reference"

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` for ``x``; ``out`` is written in place where the row can (compiled rows)."""
        if self.eager:
            # The standard graph's one node is this call (same bits as the reference
            # executor on it), without the interpreter around it.
            return kernels.rms_norm_standard(x, x.shape[-1], self.eps, self.weight)
        if self.system.schedule is None:
            if self.compiled:
                return self.pipeline(x, self.weight, self.eps, out)
            return run_reference(self.graph, x, self.weight, self.eps)
        # Fifo: partials merge in the order worker threads really finish; unseeded
        # Random: a fresh arbitrary order every run.  Both are real races.
        schedule = schedules.Fifo() if self.system.schedule == "fifo" else schedules.Random()
        result: torch.Tensor = self.portal.call(
            lambda: run_concurrent(self.graph, x, self.weight, self.eps, schedule=schedule)
        )
        return result

    def timed(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The call that is timed: into one preallocated output where the row takes
        ``out=``, so a fresh output's page faults are not in its time."""
        if not self.compiled:
            return lambda: self(x)
        out = torch.empty_like(x).zero_()  # faulted in once, here
        return lambda: self(x, out)


def traced_run(
    graph: Graph, *, rows: int = 64, max_workers: int = 2, schedule: str = "fifo", seed: int = 0
) -> Trace:
    """Run ``graph`` once on the concurrent executor over a seeded random input and
    return its :class:`~taskgraph_norm.executors.concurrent.trace.Trace` (for timelines)."""
    hidden = graph.meta["hidden_size"]
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))
    policy = schedules.Fifo() if schedule == "fifo" else schedules.Random()
    traces: list[Trace] = []
    anyio.run(
        lambda: run_concurrent(graph, x, None, kernels.default_eps(x.dtype), schedule=policy,
                               max_workers=max_workers, trace=traces.append)
    )
    return traces[0]


#: The standard row's second timing: torch's unweighted kernel.
_UNWEIGHTED = "standard, unweighted"


def _time_interleaved(runners: list[_Runner], x2: torch.Tensor, repeats: int, bar: ProgressBar) -> RoundTimes:
    """Every row called once per round, ``repeats`` rounds; the standard row is also
    timed without its weight (torch's faster kernel on some CPUs), in the same rounds."""
    methods: dict[str, Callable[[], object]] = {}
    # The standard kernels and the certified rows first, next to each other in
    # every round; the slow race rows after them.
    for run in sorted(runners, key=lambda r: r.system.schedule is not None):
        methods[run.system.name] = run.timed(x2)
        if run.eager:
            methods[_UNWEIGHTED] = functools.partial(kernels.rms_norm_standard, x2, x2.shape[-1], run.eps, None)
    return time_rounds(methods, repeats, observed=[run.system.name for run in runners], bar=bar)


def make_input(config: ReportConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The report's seeded input ``x`` and weight (weight ~ 1 + N(0, 0.1))."""
    gen = torch.Generator().manual_seed(config.seed)
    dtype = DTYPES[config.dtype]
    x = torch.randn(config.shape, generator=gen, dtype=torch.float64).to(dtype)
    w = (1.0 + 0.1 * torch.randn(config.shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    return x, w


def measure_rows(config: ReportConfig) -> list[ReportRow]:
    """Run every system of :data:`SYSTEMS` plus the best certified one; return the rows
    (``config.norm == "layer"``: LayerNorm's rows, :mod:`.report_layer`)."""
    if config.norm == "layer":
        from .report_layer import measure_layer_rows

        return measure_layer_rows(config)
    if config.norm != "rms":
        raise ConfigError("norm", config.norm, "'rms' or 'layer'")
    x, weight = make_input(config)
    check_input(x, (x.shape[-1],), weight)
    check_effort(config, x)
    x2 = x.reshape(-1, x.shape[-1])
    eps = kernels.default_eps(x.dtype)
    standard = kernels.rms_norm_standard(x2, x2.shape[-1], eps, weight)
    ref64 = fp64_reference(x2, weight, eps)
    # One bar over the timed rounds, then one step per row checked (proof, batch
    # invariance, errors); a terminal on stderr shows it, nothing else does.
    with start_blocking_portal() as portal, progress_bar(config.repeats + len(SYSTEMS), "report") as bar:
        runners = [_Runner(s, x2.shape[-1], config, weight, portal) for s in SYSTEMS]
        bar.set_postfix_str("timing rounds")
        timing = _time_interleaved(runners, x2, config.repeats, bar)
        rows: list[ReportRow] = []
        for run in runners:
            bar.set_postfix_str(f"checking {run.system.name}")
            rows.append(measure_row(run, x2, timing, config.seed, standard, ref64, ("standard", _UNWEIGHTED)))
            bar.update()
    # Sanity: our graphs must agree with normalize_sync, the public path.
    if not bits_equal(normalize_sync(x2, weight, topology="tree", chunk_size=config.chunk_size, leaf=config.leaf),
                      run_reference(build_graph(x2.shape[-1], chunk_size=config.chunk_size, topology="tree", leaf=config.leaf), x2, weight, eps)):
        raise RuntimeError("normalize_sync disagrees with the reference executor: this is a bug")
    return with_best(rows)


def report_text(config: ReportConfig, rows: list[ReportRow]) -> str:
    """The report as printed: a header line, the table, how rows were timed and the verdict lines."""
    from ..backends.native.loader import describe
    lines = [
        f"taskgraph-norm report ({'LayerNorm' if config.norm == 'layer' else 'RMSNorm'}): input "
        f"{'x'.join(map(str, config.shape))} {config.dtype}, "
        f"seed {config.seed}, chunk_size {config.chunk_size}, leaf {config.leaf}, "
        f"median of {config.repeats} interleaved rounds (each round runs every row once), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); {describe()}",
        "",
        format_table(rows),
    ]
    standard = next(r for r in rows if r.topology == "standard")
    fresh = [r.name for r in rows if r.timed != "out=" and not r.name.startswith("best: ")]
    torch_op = "F.layer_norm" if config.norm == "layer" else "F.rms_norm"
    lines += [
        "",
        "standard is torch's eager F.layer_norm with the weight and bias; the rows other than linear and "
        "tree are timed in 2 rounds of their own beside standard (their ratios are to standard in "
        "those rounds); ULP errors are in ulps of max(|x * w / den|, |x_hat * w|), where the result "
        "rounds." if config.norm == "layer" else
        f"standard is torch's eager F.rms_norm, timed as the faster of its kernels with and "
        f"without weight in the same rounds: {standard.timed} ({standard.median_ms:.3f} ms; "
        f"the other {standard.slower_kernel_ms or 0:.3f} ms); its bits and errors are the weighted call's.",
        "compiled rows are timed writing into a preallocated output (out=); the other rows "
        f"({', '.join(fresh)}) have no out= and allocate a fresh output per call, "
        "whose page faults are part of their time.",
    ]
    best = next((r for r in rows if r.name.startswith("best: ")), None)
    if best is not None:
        lines += ["", f"best certified configuration: {best.name[6:]} ({best.proved}, executor "
                  f"{best.executor}), {best.speedup:.2f}x the speed of "
                  f"standard (torch eager {torch_op}{'' if config.norm == 'layer' else ' ' + standard.timed}) "
                  "on this input "
                  f"(median over the rounds of standard's time / its time in the same round; "
                  f"ratio of the medians: {standard.median_ms / best.median_ms:.2f}x)"]
    if not all(r.agrees for r in rows):
        lines += ["", "A measurement CONTRADICTS a certificate above: this is a bug, please report it."]
    return "\n".join(lines) + "\n"


def run_report(config: ReportConfig, stream: TextIO) -> tuple[list[ReportRow], str]:
    """Measure every row, print the report to ``stream``; return the rows and the text
    (``taskgraph-norm report --out`` hands the text to :mod:`.report_files`)."""
    rows = measure_rows(config)
    text = report_text(config, rows)
    stream.write(text)
    return rows, text
