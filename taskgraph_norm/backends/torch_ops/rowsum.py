"""Row sums of any values in a graph's order: the backward's ``sum(dy * w * x)``.

The forward reduces squares of ``x`` through the graph's merge DAG.  The backward
needs one more row reduction, of the products ``g * xa``, and gives it the same
DAG: the same chunks, the same leaves, the same merges, over other leaf values.
So its result is batch-invariant by the forward's proof (docs/design.md).

* :func:`reference_row_sum` interprets the graph itself (the oracle), with each
  ``SUMSQ`` leaf summing ``v[..., start:stop]`` instead of the squares of ``x``;
* :func:`plan_row_sum` runs a lowered :class:`~.lowering.Plan` as a few tensor
  ops, operation for operation the compiled executor's order (tests compare the two).

An exact graph's sums are exact in any order and chunking, so both sum the
whole row with :func:`kernels.sum_exact`; a graph with one opaque ``RMSNORM`` node
(``topology="standard"``) sums with ``torch.sum`` (its order is the backend's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ... import kernels
from ...graph import Graph, Node, Op
from ...lowering import Plan, tree_levels
from ...kernels.reference import ReferenceInterpreter

__all__ = ["graph_backward", "graph_rms", "plan_rms", "plan_row_sum", "reference_row_sum", "torch_backward",
           "torch_rms"]


class _RowSumInterpreter(ReferenceInterpreter):
    """The reference interpreter with leaves that sum ``self.x`` (the values) as they are."""

    def sumsq(self, node: Node, args: list[Any]) -> torch.Tensor:
        start, stop = node.attrs["start"], node.attrs["stop"]
        if node.attrs["leaf"] == "native":
            return kernels.sum_native(self.x, start, stop)
        return kernels.sum_pairwise(self.x, start, stop)


def reference_row_sum(graph: Graph, v: torch.Tensor) -> torch.Tensor:
    """Each row's sum of ``v`` (``(..., D)``) through ``graph``'s merge DAG, ``(..., 1)``
    in ``v``'s dtype (``(..., 2)`` exact pairs for an exact graph: see
    :func:`kernels.sum_exact`; pass fp64 values there)."""
    ops = graph.ops
    if Op.SCALE in ops:
        return kernels.sum_exact(v)
    if Op.RMSNORM in ops:
        return torch.sum(v, dim=-1, keepdim=True)
    finalize = next(n for n in graph.nodes if n.op is Op.FINALIZE)
    total_id = finalize.inputs[1]
    total: torch.Tensor = _RowSumInterpreter(graph).run_values(v, None, 0.0, keep=(total_id,))[total_id]
    return total


def plan_row_sum(plan: Plan, v: torch.Tensor) -> torch.Tensor:
    """:func:`reference_row_sum` for the graph ``plan`` was lowered from, as tensor ops.

    ``v`` is ``(rows, D)``, contiguous, in the accumulation dtype (fp64 for an exact
    plan); it is consumed (summed in place).
    """
    if plan.accumulate == "exact":
        return kernels.sum_exact(v)
    rows, c, n_full = v.shape[0], plan.chunk_size, plan.n_full
    parts = []
    if n_full:
        full = v[:, : n_full * c].reshape(rows, n_full, c)
        if plan.leaf == "native":
            parts.append(torch.sum(full, dim=-1))
        else:
            parts.append(kernels.pairwise_halving_(full)[..., 0])
    if plan.tail:
        start = n_full * c
        leaf = kernels.sum_native if plan.leaf == "native" else kernels.sum_pairwise
        parts.append(leaf(v, start, plan.hidden_size))
    p = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return _merge(plan, p)


def _merge(plan: Plan, p: torch.Tensor) -> torch.Tensor:
    """The plan's float merge of the ``(rows, n)`` leaf partials, as the compiled executor runs it."""
    if plan.merge == "single":
        return p[:, :1]
    if plan.merge == "cat":
        return torch.sum(p.contiguous(), dim=-1, keepdim=True)
    if plan.merge == "tree":
        p = p.clone()
        for k in tree_levels(p.shape[1]):
            pairs = k // 2
            merged = p[:, 0 : 2 * pairs : 2] + p[:, 1 : 2 * pairs : 2]
            if k % 2:
                p[:, pairs] = p[:, k - 1]
            p[:, :pairs] = merged
        return p[:, :1]
    n = p.shape[1]
    slots = torch.empty(p.shape[0], n + sum(map(len, plan.adds)), dtype=p.dtype, device=p.device)
    slots[:, :n] = p
    for level in plan.adds:
        for dst, a, b in level:
            torch.add(slots[:, a], slots[:, b], out=slots[:, dst])
    return slots[:, plan.root : plan.root + 1]


RowSum = Callable[[torch.Tensor], torch.Tensor]


def torch_backward(
    row_sum: RowSum, exact: bool, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    rms: torch.Tensor, input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW)`` of 2-D ``dy``, ``x`` and ``(rows, 1)`` ``rms`` as torch ops (``None``
    where not asked), ``dx``'s row reduction ``sum(g * xa)`` by ``row_sum`` (the graph's
    or the plan's order; an ``exact`` graph's sum is exact in any order).

    ``offset``: FINALIZE multiplied by ``w + offset``; ``round_x_hat``:
    ``casting_mode="llama"``, whose ``x_hat`` was rounded to ``x.dtype`` before the
    weight (``dW`` sums ``dy`` times that rounded value)."""
    dx = dw = None
    if input_grad:
        acc = kernels.accumulation_dtype(x.dtype)
        w_g = None if weight is None else kernels.finalize_weight(weight, acc, offset)
        xa, g = kernels.grad_operands(x, dy, w_g)
        s = (kernels.sum_exact(g.to(torch.float64) * xa.to(torch.float64)) if exact
             else row_sum((g * xa).contiguous()))
        dx = kernels.input_grad(xa, g, rms, s, x.dtype)
    if weight_grad and weight is not None:
        dw = kernels.weight_grad_float(x, dy, rms, weight.dtype, round_x_hat=round_x_hat)
    return dx, dw


def graph_backward(
    graph: Graph, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rms: torch.Tensor,
    input_grad: bool, weight_grad: bool, offset: float = 0.0, round_x_hat: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`torch_backward` through ``graph``'s own merge DAG (a graph with no plan)."""
    return torch_backward(lambda v: reference_row_sum(graph, v), Op.SCALE in graph.ops, dy, x, weight, rms,
                          input_grad, weight_grad, offset, round_x_hat)


def torch_rms(row_sum: RowSum, exact: bool, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row's ``rms`` (``(..., 1)``, the accumulation dtype) from the sum of squares by
    ``row_sum`` (the graph's or the plan's order; fp64 squares for an ``exact`` one): the
    value FINALIZE divided by."""
    hidden = x.shape[-1]
    xa = x.reshape(-1, hidden).to(torch.float64 if exact else kernels.accumulation_dtype(x.dtype))
    total = row_sum((xa * xa).contiguous())
    rms = kernels.finalize_rms(total, hidden, eps, kernels.accumulation_dtype(x.dtype))
    return rms.view(*x.shape[:-1], 1)


def graph_rms(graph: Graph, x: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`torch_rms` in ``graph``'s own order (a graph with no plan)."""
    return torch_rms(lambda v: reference_row_sum(graph, v), Op.SCALE in graph.ops, x, eps)


def plan_rms(plan: Plan, x: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`torch_rms` in the plan's order (the compiled executor's operations)."""
    return torch_rms(lambda v: plan_row_sum(plan, v), plan.accumulate == "exact", x, eps)
