"""``taskgraph-norm report --norm layer``: LayerNorm's rows, measured as RMSNorm's are.

Rows: torch's eager ``F.layer_norm`` (``standard``); the float race with a fresh
random arrival order per call (the merge order a lock-free reduction would have);
the certified ``linear``, ``tree`` and ``cat`` graphs; the same random-order race
with exact sums; and the exact ``tree``.  Certified rows run through the LayerNorm
pipeline (the path ``tgn.layer_norm_sync`` takes: the native C kernel or torch ops,
into a preallocated output); the shuffled races run on the reference executor, whose
``arrival`` order for every ``ACCUMULATE`` is drawn anew for each call.  The fast
rows (``standard`` and the compiled float ``linear`` and ``tree``) are timed in
``repeats`` interleaved rounds, the slow ones in :data:`SLOW_ROUNDS` rounds of their
own beside ``standard`` again (their speed ratio is to ``standard`` in those rounds);
every row is checked for run-to-run spread, batch invariance (measured), its proof,
and its error against an fp64 LayerNorm (in ulps of :func:`layer_ulp_scale`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..executors import run_reference
from ..graph import Graph, Op
from ..kernels import layer
from ..pipeline.layer import layer_pipeline
from ..pipeline.layer_checks import check_layer_input
from ..testing import bits_equal
from ..topologies import build_layer_graph
from .progress import progress_bar
from .report_rows import DTYPES, ReportConfig, ReportRow, check_effort, measure_row, with_best
from .report_timing import RoundTimes, time_rounds

__all__ = ["LAYER_SYSTEMS", "SLOW_ROUNDS", "LayerSystem", "layer_fp64_reference", "layer_ulp_scale",
           "measure_layer_rows"]


@dataclass(frozen=True)
class LayerSystem:
    """One LayerNorm row: its graph configuration, and whether its merges arrive in a
    fresh random order per call (the reference executor's ``arrival``)."""

    name: str
    topology: str
    accumulate: str = "float"
    shuffled: bool = False


LAYER_SYSTEMS: tuple[LayerSystem, ...] = (
    LayerSystem("standard", "standard"),
    LayerSystem("race (shuffled arrival)", "race", shuffled=True),
    LayerSystem("linear", "linear"),
    LayerSystem("tree", "tree"),
    LayerSystem("cat", "cat"),
    LayerSystem("race + exact (shuffled arrival)", "race", "exact", shuffled=True),
    LayerSystem("tree + exact", "tree", "exact"),
)


def layer_ulp_scale(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """The magnitude at which LayerNorm's result rounds: ``x * w / den`` (the deviation
    ``x - mean`` is formed at ``x``'s scale) or ``x_hat * w`` (``+ b`` rounds at its
    larger operand), whichever is larger; near a cancellation a ulp of ``y`` itself
    would count rounding no implementation avoids."""
    x64 = x.double()
    den = torch.sqrt((x64 - x64.mean(-1, keepdim=True)).square().mean(-1, keepdim=True) + layer.LAYER_EPS)
    return torch.maximum((x64 * weight.double() / den).abs(), (ref64 - bias.double()).abs())


def layer_fp64_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """LayerNorm computed in fp64 throughout (the accuracy yardstick)."""
    x64 = x.double()
    d = x64 - x64.mean(-1, keepdim=True)
    y = d / torch.sqrt(d.square().mean(-1, keepdim=True) + eps)
    y = y if weight is None else y * weight.double()
    return y if bias is None else y + bias.double()


class _LayerRunner:
    """Runs one LayerNorm system on 2-D input."""

    def __init__(self, system: LayerSystem, hidden: int, config: ReportConfig, weight: torch.Tensor,
                 bias: torch.Tensor) -> None:
        self.system, self.weight, self.bias = system, weight, bias
        self.graph: Graph = build_layer_graph(hidden, chunk_size=config.chunk_size, topology=system.topology,
                                              leaf=config.leaf, accumulate=system.accumulate)
        self.eager = system.topology == "standard"
        self.pipeline = None if self.eager or system.shuffled else layer_pipeline(
            hidden, config.chunk_size, system.topology, config.leaf, system.accumulate)
        self.compiled = self.pipeline is not None and self.pipeline.executor == "compiled"
        self.races = [n for n in self.graph.nodes if n.op is Op.ACCUMULATE]
        self.rng = random.Random()  # unseeded: a fresh order every run

    @property
    def executor(self) -> str:
        if self.eager:
            return "torch eager"
        if self.system.shuffled:
            return "reference, random arrival"
        return "compiled" if self.compiled else "reference"

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        eps = layer.LAYER_EPS
        if self.eager:
            return layer.layer_norm_standard(x, x.shape[-1], eps, self.weight, self.bias)
        if self.pipeline is not None:
            y: torch.Tensor = self.pipeline(x, self.weight, self.bias, eps, out)
            return y
        arrival = {n.id: self.rng.sample(range(len(n.inputs)), len(n.inputs)) for n in self.races}
        return run_reference(self.graph, x, self.weight, eps, arrival=arrival, bias=self.bias)

    def timed(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        if not self.compiled:
            return lambda: self(x)
        out = torch.empty_like(x).zero_()  # faulted in once, here
        return lambda: self(x, out)


#: Rounds for the slow rows (the reference executor's shuffled races, exact plans on
#: torch ops, ``cat``): timed in their own interleaved rounds, beside ``standard`` again.
SLOW_ROUNDS = 2


def _fast(run: _LayerRunner) -> bool:
    """A row timed in every round: the compiled float plans of ``linear`` and ``tree``."""
    return run.compiled and run.system.accumulate == "float" and run.system.topology != "cat"


def _make_input(config: ReportConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The report's seeded ``x`` and weight (as RMSNorm's report), and a bias ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(config.seed)
    dtype = DTYPES[config.dtype]
    x = torch.randn(config.shape, generator=gen, dtype=torch.float64).to(dtype)
    w = (1.0 + 0.1 * torch.randn(config.shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    b = (0.1 * torch.randn(config.shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    return x, w, b


def measure_layer_rows(config: ReportConfig) -> list[ReportRow]:
    """Run every system of :data:`LAYER_SYSTEMS` plus the best certified one; return the rows."""
    x, weight, bias = _make_input(config)
    check_layer_input(x, x.shape[-1] if x.dim() else 1, weight, bias)
    check_effort(config, x)
    x2 = x.reshape(-1, x.shape[-1])
    eps = layer.LAYER_EPS
    standard = layer.layer_norm_standard(x2, x2.shape[-1], eps, weight, bias)
    ref64 = layer_fp64_reference(x2, weight, bias, eps)
    scale = layer_ulp_scale(x2, weight, bias, ref64)
    slow_rounds = min(config.repeats, SLOW_ROUNDS)
    with progress_bar(config.repeats + slow_rounds + len(LAYER_SYSTEMS), "report") as bar:
        runners = [_LayerRunner(s, x2.shape[-1], config, weight, bias) for s in LAYER_SYSTEMS]
        bar.set_postfix_str("timing rounds")
        timings: dict[str, RoundTimes] = {}
        for group, rounds in ((True, config.repeats), (False, slow_rounds)):
            members = [r for r in runners if r.eager or _fast(r) == group]
            methods: dict[str, Callable[[], object]] = {r.system.name: r.timed(x2) for r in members}
            observed = [r.system.name for r in members if group or not r.eager]
            timing = time_rounds(methods, rounds, observed=observed, bar=bar)
            timings.update({name: timing for name in observed})
        rows: list[ReportRow] = []
        for run in runners:
            bar.set_postfix_str(f"checking {run.system.name}")
            rows.append(measure_row(run, x2, timings[run.system.name], config.seed, standard, ref64, ("standard",),
                                    scale))
            bar.update()
    # Sanity: the pipeline (the public faces' path) must agree with the reference executor.
    tree = next(r for r in runners if r.system.name == "tree")
    if not bits_equal(tree(x2), run_reference(tree.graph, x2, weight, eps, bias=bias)):
        raise RuntimeError("the LayerNorm pipeline disagrees with the reference executor: this is a bug")
    return with_best(rows)
