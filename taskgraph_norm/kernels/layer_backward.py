"""LayerNorm's backward numerics: the torch form of ``dx``, ``dW`` and ``db``, the oracle
the backends are tested against (docs/layernorm.md, "Backward").

With ``acc`` the accumulation dtype, a row's forward statistics ``mean`` and
``den = sqrt(var / D + eps)`` (``(rows, 1)``, as :func:`kernels.layer.finalize_layer`
made them), and every step an IEEE operation rounded in ``acc``:

1. ``d = x.to(acc) - mean`` (the forward's rounding), ``x_hat = d / den``;
2. ``g = dy.to(acc) * w.to(acc)`` (``dy.to(acc)`` without a weight);
3. ``mg = sum(g) / D`` and ``mgx = sum(g * x_hat) / D``: two row sums in the
   forward's merge order (the caller's ``row_sum``), so ``dx`` is batch-invariant by
   the forward's proof; an exact plan sums exactly (fp64 products) and rounds each
   mean once (:func:`kernels.layer.mean_exact`);
4. ``dx = ((g - mg) - x_hat * mgx) / den``, cast to ``x``'s dtype;
5. ``dW = sum over rows of dy.to(acc) * x_hat`` and ``db = sum over rows of
   dy.to(acc)``, each over fixed blocks of ``ROW_BLOCK`` rows (pairwise halving in
   a block, the blocks merged by :func:`kernels.backward.merge_blocks_`): the order of
   RMSNorm's float ``dW``, which depends on the row count only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import accumulation_dtype, pairwise_halving_
from .backward import ROW_BLOCK, merge_blocks_, sum_exact
from .layer import deviations, mean_exact, mean_float

__all__ = ["column_sum_blocks", "composite_x_hat", "layer_input_grad", "layer_tangent", "layer_x_hat"]

RowSum = Callable[[torch.Tensor], torch.Tensor]


def layer_x_hat(x: torch.Tensor, mean: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``(x.to(acc) - mean) / den`` per row (``x`` ``(rows, D)``, ``mean``/``den`` ``(rows, 1)``)."""
    return deviations(x, 0, x.shape[-1], mean) / den


def composite_x_hat(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_hat, den)`` of ``x`` by differentiable torch ops in ``acc`` (``torch.mean``'s
    order, not the graph's): for the derivatives that must themselves be differentiable
    (a double backward, forward-mode AD, ``torch.func``), whose values carry no bits."""
    xa = x.to(accumulation_dtype(x.dtype))
    d = xa - xa.mean(dim=-1, keepdim=True)
    den = torch.sqrt((d * d).mean(dim=-1, keepdim=True) + eps)
    return d / den, den


def layer_tangent(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, t_x: torch.Tensor | None,
    t_w: torch.Tensor | None, t_b: torch.Tensor | None,
) -> torch.Tensor:
    """The tangent of ``y = x_hat * w + b`` along ``t_x``, ``t_w`` and ``t_b`` (``None``: zero),
    in ``acc`` and cast to ``x``'s dtype as the forward's step 7.

    With ``tc = t_x - mean(t_x)``: ``d x_hat = (tc - x_hat * mean(x_hat * tc)) / den`` and
    ``dy = d x_hat * w + x_hat * t_w + t_b``.  The statistics are recomputed from ``x``
    (:func:`composite_x_hat`), not taken from the forward, so the tangent is differentiable
    in ``x`` too (reverse over forward: ``jacrev(jacfwd(f))``) and batched under ``vmap``."""
    acc = accumulation_dtype(x.dtype)
    x_hat, den = composite_x_hat(x, eps)
    tangent = torch.zeros_like(x_hat)
    if t_x is not None:
        ta = t_x.to(acc)
        tc = ta - ta.mean(dim=-1, keepdim=True)
        d_hat = (tc - x_hat * (x_hat * tc).mean(dim=-1, keepdim=True)) / den
        tangent = tangent + (d_hat if weight is None else d_hat * weight.to(acc))
    if t_w is not None and weight is not None:
        tangent = tangent + x_hat * t_w.to(acc)
    if t_b is not None:
        tangent = tangent + t_b.to(acc)
    return tangent.to(x.dtype)


def _row_mean(v: torch.Tensor, row_sum: RowSum, exact: bool, dtype: torch.dtype) -> torch.Tensor:
    """``sum(v) / D`` per row: through ``row_sum`` (the plan's float order; ``v`` is
    consumed) then a tensor divisor, or exactly (``v`` fp64) and rounded once to ``dtype``."""
    hidden = v.shape[-1]
    if exact:
        return mean_exact(sum_exact(v), hidden, dtype)
    return mean_float(row_sum(v), hidden)


def layer_input_grad(
    row_sum: RowSum, exact: bool, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
    mean: torch.Tensor, den: torch.Tensor,
) -> torch.Tensor:
    """``dx`` of 2-D ``dy`` and ``x`` (steps 1-4 of the module doc), in ``x``'s dtype."""
    acc = accumulation_dtype(x.dtype)
    x_hat = layer_x_hat(x, mean, den)
    g = dy.to(acc) if weight is None else dy.to(acc) * weight.to(acc)
    if exact:
        mg = _row_mean(g.to(torch.float64), row_sum, True, acc)
        mgx = _row_mean(g.to(torch.float64) * x_hat.to(torch.float64), row_sum, True, acc)
    else:
        mg = _row_mean(g.contiguous().clone(), row_sum, False, acc)
        mgx = _row_mean((g * x_hat).contiguous(), row_sum, False, acc)
    return (((g - mg) - x_hat * mgx) / den).to(x.dtype)


def column_sum_blocks(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t``'s sum over rows (``t`` ``(rows, D)`` in ``acc``) over fixed blocks of
    ``ROW_BLOCK`` rows, cast to ``dtype``: the order of ``kernels.weight_grad_float``."""
    rows, hidden = t.shape
    if rows == 0:
        return torch.zeros(hidden, dtype=dtype, device=t.device)
    n_full = rows // ROW_BLOCK
    sums = []
    if n_full:
        blocks = t[: n_full * ROW_BLOCK].reshape(n_full, ROW_BLOCK, hidden)
        sums.append(pairwise_halving_(blocks.movedim(1, -1).clone())[..., 0])
    if rows % ROW_BLOCK:
        tail = t[n_full * ROW_BLOCK :].movedim(0, -1).clone()
        sums.append(pairwise_halving_(tail)[..., 0].unsqueeze(0))
    p = torch.cat(sums) if len(sums) > 1 else sums[0].clone()
    return merge_blocks_(p).to(dtype)
