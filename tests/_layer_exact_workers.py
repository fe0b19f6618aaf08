"""Rank functions for tests/test_layer_exact_grad.py, run in spawned ranks by run_local.

Every function takes ``(rank, world_size, ...)`` and returns something torch.save can
write; they import only the library and the RMSNorm workers' row assignment."""

from __future__ import annotations

import torch
import torch.distributed as dist

import taskgraph_norm as tgn

from ._exact_grad_workers import DTYPES, assignment

LAYOUTS = ("even", "strided", "skewed")


def layer_rows(rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x and dy whose products span many binades (so a float sum's order shows)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-8, 8, (rows, 1), generator=g).float()) + 2
    dy = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-12, 4, (rows, cols), generator=g).float())
    return x.to(dtype), dy.to(dtype)


def layer_grads(rank: int, world: int, rows: int, cols: int, layout: str, dtype_name: str,
                weight_grad: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """``tgn.LayerNorm(weight_grad=...)`` trained on this rank's micro-batches of the rows,
    then (exact, in a process group) ``all_reduce_exact_grads``: ``(weight.grad, bias.grad)``
    (``world=1`` without a process group: the single-process reference)."""
    dtype = DTYPES[dtype_name]
    x, dy = layer_rows(rows, cols, dtype)
    norm = tgn.LayerNorm(cols, weight_grad=weight_grad, chunk_size=8, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, cols))
        norm.bias.copy_(torch.linspace(-1, 1, cols))
    for micro in assignment(rows, world, layout)[rank]:
        idx = torch.tensor(micro, dtype=torch.int64)
        norm(x[idx].clone().requires_grad_()).backward(dy[idx])
    if dist.is_initialized():
        if weight_grad == "exact":
            tgn.distributed.all_reduce_exact_grads(norm)
        else:  # what DDP does: the float grads all-reduced in float
            for p in (norm.weight, norm.bias):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
    return tuple(torch.zeros(cols, dtype=dtype) if p.grad is None else p.grad.clone()  # type: ignore[return-value]
                 for p in (norm.weight, norm.bias))


def run_all(rank: int, world: int, rows: int, cols: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"exact": [], "float": []}
    for dtype_name in DTYPES:
        for layout in LAYOUTS:
            out["exact"].append(layer_grads(rank, world, rows, cols, layout, dtype_name))
            out["float"].append(layer_grads(rank, world, rows, cols, layout, dtype_name, "float"))
    return out
