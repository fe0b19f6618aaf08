"""Deterministic training with ``tgn.RMSNorm(weight_grad="exact")``: a small model
trained with gradient accumulation 1, 4 and 8 and on 2 data-parallel ranks.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/training.py [--steps 3] [--no-cost | --cost-only]

The model: embedding -> 2 blocks of [tgn.RMSNorm -> Linear -> GELU -> Linear, plus
the residual] -> final tgn.RMSNorm -> head, hidden 256, a global batch of 2048
tokens per step, a fixed seed, SGD.  Every run sees the same global batch per step;
the loss is ``cross_entropy(reduction="sum") * (1 / global tokens)`` in every
micro-batch, so every run's true gradient is the same and each row's ``dy`` is the
same bits.  Runs: accumulation 1 (the reference), 4 and 8 micro-batches, and 2 gloo
ranks (``run_local``) of 1 micro-batch each, reduced by hand: ``all_reduce`` (SUM)
of the float gradients, ``all_reduce_exact_grads`` for the exact norm weights.

For ``weight_grad="exact"`` and ``"float"``, after every step, the table gives the
elements of the norm weights (and separately of the other parameters: Linear,
embedding, head) that differ in their bits from the reference run.  Two variants:

* ``all train``: every parameter trains.  The norm weights' gradient is exact, but the
  Linear layers' is float and changes with the micro-batching, so from step 2 on the
  *inputs* of the norm's gradient (``x_hat`` and ``dy``) differ and so do the norm
  weights: the guarantee is per gradient computation, given its products.
* ``norms only``: everything but the norm weights frozen (``requires_grad=False``):
  exact -> identical at every step; float -> differing (the negative control).

Then the cost: ``tgn.RMSNorm(4096)`` backward at (4096, 4096) fp32, exact against
float (interleaved medians), and the accumulator's bytes per weight element, read
off a real state.  ``benchmarks/exact_dw.py`` times the accumulate step alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.ops.exact_grad import exact_grads  # noqa: E402
from taskgraph_norm.testing import count_bit_differences  # noqa: E402
from taskgraph_norm.tools.bench import interleaved_medians  # noqa: E402

MODES = ("exact", "float")
VARIANTS = {"all train": False, "norms only": True}  # name -> Linears (and the rest) frozen


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 256
    ffn: int = 512
    vocab: int = 512
    tokens: int = 2048  # the global batch of every step
    steps: int = 3
    lr: float = 0.5
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Run:
    """How one training run splits each step's global batch."""

    name: str
    accum: int  # micro-batches per rank
    world: int = 1


RUNS = (Run("accum 1", 1), Run("accum 4", 4), Run("accum 8", 8), Run("DP=2", 1, 2))


class Block(nn.Module):
    def __init__(self, cfg: Config, mode: str) -> None:
        super().__init__()
        self.norm = tgn.RMSNorm(cfg.hidden, weight_grad=mode)
        self.up, self.down = nn.Linear(cfg.hidden, cfg.ffn), nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = h + self.down(F.gelu(self.up(self.norm(h))))
        return out


class TinyLM(nn.Module):
    """A per-token model (no attention): every layer but the reductions is row by row."""

    def __init__(self, cfg: Config, mode: str) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)  # the same initial weights in every run and mode
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList([Block(cfg, mode) for _ in range(2)])
        self.norm = tgn.RMSNorm(cfg.hidden, weight_grad=mode)
        self.head = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def batch(cfg: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: token ids and a learnable target for each."""
    g = torch.Generator().manual_seed(1000 * cfg.seed + step)
    ids = torch.randint(cfg.vocab, (cfg.tokens,), generator=g)
    return ids, (7 * ids + 3) % cfg.vocab


def _all_reduce_grads(model: nn.Module, mode: str) -> None:
    """Data parallel by hand: float gradients summed in float, exact ones exactly."""
    exact = {id(p) for p in tgn.distributed.exact_parameters(model)}
    for p in model.parameters():
        if p.grad is not None and id(p) not in exact:
            dist.all_reduce(p.grad)
    if mode == "exact":
        tgn.distributed.all_reduce_exact_grads(model)


Snapshot = dict[str, dict[str, torch.Tensor]]  # "grad" / "weight" -> parameter name -> tensor


def train(cfg: Config, mode: str, run: Run, freeze: bool, rank: int = 0) -> list[Snapshot]:
    """After each step of ``run`` (on ``rank``): the gradients the optimizer saw
    (reduced over the ranks) and the parameters it left."""
    model = TinyLM(cfg, mode)
    for name, p in model.named_parameters():
        p.requires_grad_(is_norm(name) or not freeze)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scale = 1.0 / cfg.tokens  # the same constant in every run: the loss sums over the global batch
    snapshots = []
    for step in range(cfg.steps):
        ids, targets = batch(cfg, step)
        lo, hi = rank * cfg.tokens // run.world, (rank + 1) * cfg.tokens // run.world
        for part in range(run.accum):
            a, b = lo + part * (hi - lo) // run.accum, lo + (part + 1) * (hi - lo) // run.accum
            loss = F.cross_entropy(model(ids[a:b]), targets[a:b], reduction="sum") * scale
            loss.backward()  # type: ignore[no-untyped-call]
        if run.world > 1:
            _all_reduce_grads(model, mode)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)  # the exact carry starts a new sum next step
        snapshots.append({"grad": grads, "weight": {n: p.detach().clone() for n, p in model.named_parameters()}})
    exact_grads.forget(list(model.parameters()))
    return snapshots


Case = tuple[str, bool]  # (weight_grad mode, everything but the norm weights frozen)


def dp_worker(rank: int, world: int, cfg: Config, run: Run, cases: list[Case]) -> list[list[Snapshot]]:
    """``train`` of every case on one rank of ``run_local``'s process group."""
    return [train(cfg, mode, run, freeze, rank) for mode, freeze in cases]


def differing(a: Snapshot, b: Snapshot, kind: str, norms: bool) -> int:
    """Elements of the norm weights' (``norms``) or the other parameters' ``kind``
    ("grad" or "weight") whose bits differ."""
    return sum(count_bit_differences(t, b[kind][n]) for n, t in a[kind].items() if is_norm(n) == norms)


def all_runs(cfg: Config, cases: list[Case], runs: tuple[Run, ...] = RUNS,
             threads: int = 1) -> dict[Case, dict[str, list[Snapshot]]]:
    """Each case's snapshots for each run; a data-parallel run's are rank 0's, after
    checking that every rank holds the same bits."""
    out: dict[Case, dict[str, list[Snapshot]]] = {case: {} for case in cases}
    for run in runs:
        if run.world == 1:
            for mode, freeze in cases:
                out[(mode, freeze)][run.name] = train(cfg, mode, run, freeze)
            continue
        ranks = tgn.distributed.run_local(dp_worker, run.world, cfg, run, cases, threads=threads, timeout=600)
        for n, case in enumerate(cases):
            for other in ranks[1:]:
                for mine, theirs in zip(ranks[0][n], other[n]):
                    if any(differing(mine, theirs, k, norms) for k in ("grad", "weight") for norms in (True, False)):
                        raise RuntimeError(f"{run.name} {case}: the ranks' bits differ")
            out[case][run.name] = ranks[0][n]
    return out


def _cell(count: int) -> str:
    return "same" if count == 0 else f"{count} differ"


def table(cfg: Config, results: dict[Case, dict[str, list[Snapshot]]]) -> str:
    names = [r.name for r in RUNS[1:]]
    lines = ["| variant | weight_grad | step | what | " + " | ".join(names) + " |", "|" + "---|" * (4 + len(names))]
    for (mode, freeze), runs in results.items():
        variant = next(v for v, f in VARIANTS.items() if f == freeze)
        reference = runs[RUNS[0].name]
        for step in range(cfg.steps):
            for norms, kind in ((True, "grad"), (True, "weight"), (False, "grad"), (False, "weight")):
                if not norms and freeze:
                    continue  # frozen: nothing to compare
                label = f"{'norm' if norms else 'other'} {kind}s"
                cells = [_cell(differing(runs[n][step], reference[step], kind, norms)) for n in names]
                lines.append(f"| {variant} | {mode} | {step + 1} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost(rounds: int, rows: int = 4096, hidden: int = 4096) -> str:
    """Backward of ``tgn.RMSNorm(hidden)`` with an exact and a float weight gradient."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    norms = {mode: tgn.RMSNorm(hidden, weight_grad=mode) for mode in MODES}

    def fwd_bwd(mode: str) -> None:
        norms[mode](x).backward(dy)  # x needs no grad: the weight's gradient only
        norms[mode].weight.grad = None

    def forward(mode: str) -> None:
        norms[mode](x)  # the same grad-enabled forward, to subtract

    methods: dict[str, Callable[[], object]] = {}
    for m in MODES:
        methods[f"{m} fwd+bwd"] = functools.partial(fwd_bwd, m)
        methods[f"{m} forward"] = functools.partial(forward, m)
    med = interleaved_medians(methods, rounds)
    dw = {m: med[f"{m} fwd+bwd"] - med[f"{m} forward"] for m in MODES}
    norm = norms["exact"]
    norm(x).backward(dy)
    state = exact_grads.state(norm.weight).state
    per_element = state.element_size() * state.shape[0]
    lines = [
        f"cost at ({rows}, {hidden}) fp32, {torch.get_num_threads()} torch threads, {rounds} interleaved rounds:",
        *(f"  {name:16s} {sec * 1e3:8.2f} ms" for name, sec in med.items()),
        f"  dW backward (fwd+bwd - forward): exact {dw['exact'] * 1e3:.2f} ms, float {dw['float'] * 1e3:.2f} ms"
        f" -> exact / float = {dw['exact'] / dw['float']:.2f}x",
        f"  fwd+bwd exact / float = {med['exact fwd+bwd'] / med['float fwd+bwd']:.2f}x",
        f"accumulator memory: state {tuple(state.shape)} {state.dtype} = {per_element} bytes per weight element "
        f"({state.numel() * state.element_size() / 1024:.0f} KiB for a {hidden}-wide norm; fp32 grad: 4 bytes)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the cost (default 9)")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost figures")
    parser.add_argument("--cost-only", action="store_true", help="only the cost figures")
    args = parser.parse_args(argv)
    if args.cost_only:
        print(cost(args.rounds))
        return
    cfg = Config(hidden=args.hidden, tokens=args.tokens, steps=args.steps)
    # The rank function must be importable by the spawned ranks: this module by its package name.
    from benchmarks import training as importable

    results = importable.all_runs(cfg, [(mode, freeze) for freeze in VARIANTS.values() for mode in MODES])
    print(f"{cfg}; runs: " + ", ".join(f"{r.name} ({r.world} rank(s) x {r.accum} micro-batches)" for r in RUNS))
    print(table(cfg, results))
    if not args.no_cost:
        print(cost(args.rounds))


if __name__ == "__main__":
    main()
