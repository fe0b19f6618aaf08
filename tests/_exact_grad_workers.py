"""Rank functions for tests/test_exact_grad_distributed.py, run in spawned ranks by run_local.

Every function takes ``(rank, world_size, ...)`` and returns something torch.save
can write.  They import only the library, never the test module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import taskgraph_norm as tgn
from taskgraph_norm.ops.exact_grad import exact_grads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_rows(seed: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows whose products span many binades (so the float sum's order shows)."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, cols), generator=g).float())
    x_hat = torch.randn(rows, cols, generator=g)
    return dy, x_hat


def assignment(rows: int, world: int, layout: str) -> list[list[list[int]]]:
    """``[rank][micro-batch] -> row indices``: how one layout splits the rows."""
    order = list(range(rows))
    if layout == "even":  # contiguous shards, two micro-batches each
        shards = [order[r * rows // world:(r + 1) * rows // world] for r in range(world)]
        return [[s[: len(s) // 2], s[len(s) // 2:]] for s in shards]
    if layout == "strided":  # row i to rank i % world, micro-batches of 5 rows
        shards = [order[r::world] for r in range(world)]
        return [[s[i:i + 5] for i in range(0, len(s), 5)] for s in shards]
    # "skewed": rank 0 holds almost everything (and the last rank maybe nothing)
    cut = rows - (world - 1)
    shards = [order[:cut]] + [order[cut + r:cut + r + 1] for r in range(world - 1)]
    return [[s] if s else [] for s in shards]


def exact_matrix(rank: int, world: int, cases: list[tuple[str, str]], rows: int, cols: int) -> dict[str, Any]:
    """For each (dtype, layout): the exact grad after all_reduce_exact_grads, and the
    float grad DDP would give (per-rank float micro-batch sums, all-reduced in float)."""
    dy, x_hat = make_rows(1, rows, cols)
    out: dict[str, Any] = {"exact": [], "float": []}
    for dtype_name, layout in cases:
        dtype = DTYPES[dtype_name]
        w = torch.nn.Parameter(torch.ones(cols, dtype=dtype))
        exact_grads.register(w)
        float_grad = torch.zeros(cols, dtype=dtype)
        for micro in assignment(rows, world, layout)[rank]:
            idx = torch.tensor(micro, dtype=torch.int64)
            exact_grads.accumulate(w, dy[idx], x_hat[idx])
            exact_grads.finish(w)
            float_grad += (dy[idx] * x_hat[idx]).sum(0).to(dtype)
        reduced = tgn.distributed.all_reduce_exact_grads([w])
        assert reduced == [w] and w.grad is not None
        dist.all_reduce(float_grad)
        out["exact"].append(w.grad.clone())
        out["float"].append(float_grad)
    return out


class _ExactScale(torch.autograd.Function):
    """y = x_hat * w whose weight gradient goes through the exact carrier (a stand-in
    for RMSNorm's backward, which the lead wires to the same two calls)."""

    @staticmethod
    def forward(ctx: Any, x_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_hat, w)
        return x_hat * w

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        x_hat, w = ctx.saved_tensors
        exact_grads.accumulate(w, dy, x_hat)
        exact_grads.finish(w)
        return dy * w, None  # no float gradient for w: autograd and DDP never touch it


class TinyModel(torch.nn.Module):
    """``scale`` (a float parameter DDP reduces) then an exact-gradient weight.

    The layer before the norm is elementwise, so the rows' ``x_hat`` and ``dy`` are
    the same bits in any batch: the norm weight's gradient can then be compared
    bit for bit.  (A ``Linear`` there would not do: its matmul's bits change with
    the batch size, which no dW accumulator can undo: docs/training.md.)
    """

    def __init__(self, cols: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.scale = torch.nn.Parameter(torch.randn(cols, generator=g))
        self.norm_weight = exact_grads.register(torch.nn.Parameter(torch.ones(cols)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = _ExactScale.apply(x * self.scale, self.norm_weight)
        return y


def ddp_step(rank: int, world: int, rows: int, cols: int, naive: bool = False) -> dict[str, Any]:
    """One step of DDP with two micro-batches (no_sync on the first); the norm weight
    kept out of DDP's buckets and reduced exactly after the last backward."""
    from torch.nn.parallel import DistributedDataParallel

    model = TinyModel(cols)
    out: dict[str, Any] = {}
    if naive:  # the pitfall: DDP's reducer reads ".norm_weight", so this name is not enough
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["norm_weight"])
    else:
        out["ignored"] = tgn.distributed.exclude_from_ddp(model)
    ddp = DistributedDataParallel(model)
    x, target = make_rows(2, rows, cols)
    mine = list(range(rank, rows, world))
    halves = [mine[: len(mine) // 2], mine[len(mine) // 2:]]
    with ddp.no_sync():
        idx = torch.tensor(halves[0])
        (ddp(x[idx]) * target[idx]).sum().backward()
    idx = torch.tensor(halves[1])
    (ddp(x[idx]) * target[idx]).sum().backward()
    try:
        tgn.distributed.all_reduce_exact_grads(model)
    except tgn.TaskGraphError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    assert model.norm_weight.grad is not None and model.scale.grad is not None
    return out | {"norm": model.norm_weight.grad.clone(), "scale": model.scale.grad.clone()}


def single_process_ddp_reference(rows: int, cols: int) -> dict[str, torch.Tensor]:
    """The same model and rows in one process, no DDP, one micro-batch per row."""
    model = TinyModel(cols)
    x, target = make_rows(2, rows, cols)
    for i in range(rows):
        (model(x[i:i + 1]) * target[i:i + 1]).sum().backward()
    assert model.norm_weight.grad is not None and model.scale.grad is not None
    return {"norm": model.norm_weight.grad.clone(), "scale": model.scale.grad.clone()}


def module_grads(rank: int, world: int, rows: int, cols: int, layout: str) -> torch.Tensor:
    """``tgn.RMSNorm(weight_grad="exact")`` trained on this rank's micro-batches of the
    rows, then ``all_reduce_exact_grads``: the weight's gradient (``world=1``, no
    process group: the single-process reference)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-8, 8, (rows, 1), generator=g).float())
    dy = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, cols), generator=g).float())
    norm = tgn.RMSNorm(cols, weight_grad="exact", chunk_size=8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, cols))
    for micro in assignment(rows, world, layout)[rank]:
        idx = torch.tensor(micro, dtype=torch.int64)
        norm(x[idx].clone().requires_grad_()).backward(dy[idx])
    if dist.is_initialized():
        tgn.distributed.all_reduce_exact_grads(norm)
    grad = norm.weight.grad
    return torch.zeros(cols) if grad is None else grad.clone()


def run_all(rank: int, world: int, cases: list[tuple[str, str]], rows: int, cols: int) -> dict[str, Any]:
    out = exact_matrix(rank, world, cases, rows, cols)
    out["module"] = [module_grads(rank, world, rows, cols, layout) for layout in ("even", "strided", "skewed")]
    if world > 1:
        out["ddp"] = ddp_step(rank, world, rows, cols)
        out["ddp_naive"] = ddp_step(rank, world, rows, cols, naive=True)
    return out
