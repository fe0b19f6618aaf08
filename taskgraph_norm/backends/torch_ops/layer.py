"""LayerNorm's plan (``Plan.norm == "layer"``) as torch ops over row tiles, and its backward.

The forward of a row tile, in the plan's order (docs/layernorm.md):

* float: ``total = plan_row_sum(plan, x.to(acc))`` (the mean's DAG), ``mean =
  total / D``, ``d = x.to(acc) - mean``, ``var = plan_row_sum(plan, d * d)`` (the
  variance's DAG, of the same shape), then :func:`kernels.layer.finalize_layer`;
* exact: the kernels' exact functions over whole rows (every addition is exact, so
  the graph's chunking and merge order give the same pair): ``rowmax_abs``,
  ``exact_scale``, ``xsum_exact``, ``mean_exact``, then ``rowmax_centered``,
  ``exact_scale``, ``sumsq_centered_exact`` and ``finalize_layer``.

The bits are the reference interpreter's (``kernels.reference.run_reference``) for
every topology, chunk size, leaf, accumulate mode, dtype and shape; the tests
compare them.  A graph the plan cannot express (a float race over three or more
chunks, the opaque ``"standard"`` node) runs on the reference executor, and its
statistics and backward row sums follow the graph itself (:func:`graph_layer_stats`,
:func:`graph_layer_row_sum`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from ... import kernels
from ...errors import ExecutionError
from ...graph import Graph, Node, Op
from ...kernels import layer
from ...kernels.layer_backward import column_sum_blocks, layer_input_grad, layer_x_hat
from ...kernels.reference import Cancelled, ReferenceInterpreter
from ...lowering import Plan
from ..base import LayerForward
from .rowsum import plan_row_sum

__all__ = ["LAYER_TILE_NUMEL", "graph_layer_backward", "graph_layer_row_sum", "graph_layer_stats",
           "layer_backward", "run_layer", "tile_stats"]

#: Elements per row tile of the forward (rows of a longer input are cut into tiles of
#: about this many elements, so the temporaries stay near a few MiB).
LAYER_TILE_NUMEL = 1 << 18


def _acc_copy(xt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous ``xt.to(dtype)`` (``plan_row_sum`` sums in place)."""
    return torch.empty(xt.shape, dtype=dtype, device=xt.device).copy_(xt)


def tile_stats(plan: Plan, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(var_total, mean)`` of a 2-D row tile in the plan's order: ``mean`` ``(rows, 1)`` in
    ``acc``, ``var_total`` ``(rows, 1)`` (float) or the exact pair ``(rows, 2)``."""
    hidden = plan.hidden_size
    acc = kernels.accumulation_dtype(xt.dtype)
    if plan.accumulate == "exact":
        sigmas = kernels.exact_scale(layer.rowmax_abs(xt, 0, hidden), hidden)
        mean = layer.mean_exact(layer.xsum_exact(xt, 0, hidden, sigmas), hidden, acc)
        sigmas = kernels.exact_scale(layer.rowmax_centered(xt, 0, hidden, mean), hidden)
        return layer.sumsq_centered_exact(xt, 0, hidden, mean, sigmas), mean
    mean = layer.mean_float(plan_row_sum(plan, _acc_copy(xt, acc)), hidden)
    d = layer.deviations(xt, 0, hidden, mean)
    return plan_row_sum(plan, (d * d).contiguous()), mean


def _den(total: torch.Tensor, hidden: int, eps: float, acc: torch.dtype) -> torch.Tensor:
    """``sqrt(var_total / D + eps)`` per row, as :func:`kernels.layer.finalize_layer` makes it."""
    var = layer.round_pair(total, acc) if total.shape[-1] == kernels.EXACT_CHANNELS else total.to(acc)
    return kernels.finalize_rms(var, hidden, eps, acc)


def run_layer(
    plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
    out: torch.Tensor | None = None, residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
    stats: bool = False, cancel: threading.Event | None = None, tile_rows: int | None = None,
) -> LayerForward:
    """``y`` of a checked ``x`` (``(..., D)``; ``h = x + residual`` written into
    ``residual_out`` first for a residual plan) and, with ``stats``, each row's ``mean``
    and ``den`` (``(..., 1)``, ``acc``).  ``cancel`` stops the work between tiles."""
    if plan.norm != "layer":
        raise ExecutionError(f"run_layer runs a LayerNorm plan, got norm={plan.norm!r}")
    if residual is not None:
        x = kernels.residual_add(x, residual, out=residual_out)
    hidden = plan.hidden_size
    acc = kernels.accumulation_dtype(x.dtype)
    rows = x.numel() // hidden if hidden else 0
    x2 = x.reshape(rows, hidden)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(rows, hidden) if y.is_contiguous() else torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    mean_all = torch.empty((rows, 1), dtype=acc, device=x.device) if stats else None
    den_all = torch.empty((rows, 1), dtype=acc, device=x.device) if stats else None
    step = max(1, tile_rows if tile_rows is not None else LAYER_TILE_NUMEL // max(hidden, 1))
    for start in range(0, rows, step):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the caller was cancelled; stopped between tiles")
        xt = x2[start:start + step]
        total, mean = tile_stats(plan, xt)
        y2[start:start + step] = layer.finalize_layer(xt, total, mean, hidden, eps, weight, bias)
        if mean_all is not None and den_all is not None:
            mean_all[start:start + step] = mean
            den_all[start:start + step] = _den(total, hidden, eps, acc)
    if y2.data_ptr() != y.data_ptr() or not y.is_contiguous():
        y.copy_(y2.view(y.shape))
    shape = (*x.shape[:-1], 1)
    return LayerForward(y, None if mean_all is None else mean_all.view(shape),
                        None if den_all is None else den_all.view(shape))


def layer_backward(
    plan: Plan, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
    weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db)`` of 2-D ``dy`` and ``x`` with ``(rows, 1)`` ``mean`` and ``den``
    (``None`` where not asked; :mod:`taskgraph_norm.kernels.layer_backward` states the
    op order): ``dx``'s two row sums in the plan's order, ``dW``/``db`` over fixed row
    blocks, cast to ``weight_dtype``/``bias_dtype`` (default ``x``'s dtype)."""
    return _backward(lambda v: plan_row_sum(plan, v), plan.accumulate == "exact", dy, x, weight, mean, den,
                     input_grad, weight_grad, bias_grad, weight_dtype, bias_dtype)


def _backward(
    row_sum: Callable[[torch.Tensor], torch.Tensor], exact: bool, dy: torch.Tensor, x: torch.Tensor,
    weight: torch.Tensor | None, mean: torch.Tensor, den: torch.Tensor, input_grad: bool, weight_grad: bool,
    bias_grad: bool, weight_dtype: torch.dtype | None, bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    acc = kernels.accumulation_dtype(x.dtype)
    dx = dw = db = None
    if input_grad:
        dx = layer_input_grad(row_sum, exact, dy, x, weight, mean, den)
    if weight_grad:
        dw = column_sum_blocks(dy.to(acc) * layer_x_hat(x, mean, den), weight_dtype or x.dtype)
    if bias_grad:
        db = column_sum_blocks(dy.to(acc), bias_dtype or x.dtype)
    return dx, dw, db


# --- graphs with no plan (run node by node on the reference executor) ---------------


def _mean_root(graph: Graph) -> tuple[Node, str]:
    """The graph's MEAN node and the id of the variance total FINALIZE reads."""
    finalize = next(n for n in graph.nodes if n.op is Op.FINALIZE)
    return graph.by_id[finalize.inputs[2]], finalize.inputs[1]


def graph_layer_stats(graph: Graph, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``(mean, den)`` (``(..., 1)``, ``acc``) as the reference interpreter
    computes them on ``graph`` (``F.layer_norm``'s own statistics for the opaque
    ``"standard"`` node)."""
    hidden = x.shape[-1]
    acc = kernels.accumulation_dtype(x.dtype)
    if Op.LAYERNORM in graph.ops:
        var, mean = torch.var_mean(x.to(acc), dim=-1, keepdim=True, correction=0)
        return mean, kernels.finalize_rms(var * torch.full_like(var, hidden), hidden, eps, acc)
    mean_node, var_id = _mean_root(graph)
    values = _PlainInput(graph).run_values(x, None, eps, keep=(mean_node.id, var_id))
    return values[mean_node.id], _den(values[var_id], hidden, eps, acc)


class _PlainInput(ReferenceInterpreter):
    """The reference interpreter whose INPUT is ``self.x`` as it is (a residual graph's
    ``h`` is already made): its SUM leaves then sum any values handed in as ``x``."""

    def input(self, node: Node, args: list[Any]) -> torch.Tensor:
        return self.x


def graph_layer_row_sum(graph: Graph, v: torch.Tensor) -> torch.Tensor:
    """Each row's sum of ``v`` (``(rows, D)``, ``acc``) through ``graph``'s mean DAG, as the
    reference interpreter merges it (``torch.sum`` for the opaque ``"standard"`` node)."""
    if Op.LAYERNORM in graph.ops:
        return torch.sum(v, dim=-1, keepdim=True)
    mean_node, _ = _mean_root(graph)
    root = mean_node.inputs[0]
    needed: set[str] = set()
    stack = [root]
    while stack:
        node_id = stack.pop()
        if node_id not in needed:
            needed.add(node_id)
            stack.extend(graph.by_id[node_id].inputs)
    interpreter = _PlainInput(graph)
    interpreter.x, interpreter.weight, interpreter.eps = v, None, 0.0
    env: dict[str, torch.Tensor] = {}
    for node in graph.topological_nodes:
        if node.id in needed:
            env[node.id] = getattr(interpreter, node.op.value)(node, [env[i] for i in node.inputs])
    return env[root]


def graph_layer_backward(
    graph: Graph, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    den: torch.Tensor, *, input_grad: bool, weight_grad: bool, bias_grad: bool,
    weight_dtype: torch.dtype | None = None, bias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`layer_backward` through ``graph``'s own mean DAG (a graph with no plan)."""
    return _backward(lambda v: graph_layer_row_sum(graph, v), Op.SCALE in graph.ops, dy, x, weight, mean, den,
                     input_grad, weight_grad, bias_grad, weight_dtype, bias_dtype)
