"""The backward's numerics (the oracle every fast backward is tested against): ``dx``
through the forward's merge DAG, ``dW`` over fixed row blocks.  Part of the one
numerics family, :mod:`taskgraph_norm.kernels`, which re-exports every name."""

from __future__ import annotations

import torch

from ..constants import BACKWARD_ROW_BLOCK as ROW_BLOCK
from . import (EXACT_CHANNELS, _preround, accumulation_dtype, combine_exact, exact_scale, finalize_weight,
               output_dtype, pairwise_halving_)

__all__ = ["ROW_BLOCK", "grad_operands", "input_grad", "merge_blocks_", "merge_blocks_streamed", "norm_tangent",
           "sum_exact", "sum_native", "sum_pairwise", "weight_grad_float"]


# --- the backward (docs/design.md, "Backward") ------------------------------------
#
# With acc the accumulation dtype, xa = x.to(acc), g = dy.to(acc) * w.to(acc) (or
# dy.to(acc) without a weight) and rms the forward's per-row value (finalize_rms):
#
#   s  = sum over the row of g * xa      reduced in the forward's order: the same
#                                        chunks, leaves and merge DAG (float), or
#                                        exactly (accumulate="exact": sum_exact of
#                                        the fp64 products, rounded once to acc)
#   k  = ((s / D) / rms / rms) / rms     per row, four correctly rounded divisions
#   dx = g / rms - xa * k                elementwise, two roundings and a subtraction
#                                        (no fma), cast to x.dtype
#   dW = sum over rows of dy.to(acc) * (xa / rms)       (xa / rms is the forward's
#        value before the weight), merged over fixed blocks of ROW_BLOCK rows: pairwise
#        halving inside a block, then adjacent pairs level by level across blocks
#        (the forward tree's shape; an odd block is carried up), cast to w.dtype.
#
# Everything but the two reductions is elementwise, so dx is batch-invariant
# whenever s is, and s is by the forward's proof: its DAG is the forward's DAG over
# other leaf values.  dW is a reduction over rows, deterministic for one batch.


def grad_operands(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xa, g)``: ``x`` in the accumulation dtype and ``dy * w`` in it."""
    dtype = accumulation_dtype(x.dtype)
    g = dy.to(dtype)
    if weight is not None:
        g = g * weight.to(dtype)
    return x.to(dtype), g


def sum_pairwise(v: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of ``v[..., start:stop]`` per row, in :func:`pairwise_halving_` order."""
    return pairwise_halving_(v[..., start:stop].clone())


def sum_native(v: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Sum of ``v[..., start:stop]`` per row, ``torch.sum``'s own order (as
    :func:`sumsq_native` sums its squares: a contiguous chunk)."""
    return torch.sum(v[..., start:stop].contiguous(), dim=-1, keepdim=True)


def sum_exact(v: torch.Tensor) -> torch.Tensor:
    """The exact pair ``(S1, S2)`` of the signed fp64 values ``v`` per row, ``(..., 2)``.

    The forward's two Demmel-Nguyen folds with ``M = max|v|``: every ``|v| <= M``
    and every partial sum is at most ``D M <= sigma1 / 2`` in magnitude, so the
    argument of :func:`exact_scale` holds for signed values (a pre-rounded value
    below ``sigma1`` lands on a grid at most twice finer, still far below
    ``2**53`` units).  The pair is the same in any order and for any chunking.
    """
    hidden = v.shape[-1]
    magnitude = torch.amax(v.abs(), dim=-1, keepdim=True)
    sigmas = exact_scale(magnitude, hidden)
    sigma1, sigma2 = sigmas[..., :1], sigmas[..., 1:]
    q1 = _preround(v, sigma1)
    r = torch.where(sigma1 > 0, v - q1, torch.zeros_like(v))
    q2 = _preround(r, sigma2)
    return torch.cat(
        [torch.sum(q1, dim=-1, keepdim=True), torch.sum(q2, dim=-1, keepdim=True)], dim=-1
    )


def input_grad(
    xa: torch.Tensor, g: torch.Tensor, rms: torch.Tensor, s: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``dx = g / rms - xa * k`` with ``k = ((s / D) / rms / rms) / rms``, cast to ``dtype``.

    ``s`` is the row's reduction of ``g * xa`` (an exact pair is combined and
    rounded once to the accumulation dtype first).
    """
    if s.shape[-1] == EXACT_CHANNELS:
        s = combine_exact(s)
    s = s.to(xa.dtype)
    k = s / torch.full_like(s, xa.shape[-1])
    k = ((k / rms) / rms) / rms
    return (g / rms - xa * k).to(dtype)


def weight_grad_float(
    x: torch.Tensor, dy: torch.Tensor, rms: torch.Tensor, dtype: torch.dtype, *, round_x_hat: bool = False
) -> torch.Tensor:
    """``dW = sum over rows of dy * (xa / rms)`` in the fixed block order, cast to ``dtype``.

    ``x`` and ``dy`` are ``(rows, D)``, ``rms`` ``(rows, 1)``.  Rows are split into
    blocks of :data:`ROW_BLOCK` (the last may be shorter); a block is summed by
    pairwise halving over its rows, and the block sums by adjacent pairs, level by
    level, an odd last block carried up unchanged.  The order depends on the row
    count only, so one batch always gives the same bits.
    """
    acc = accumulation_dtype(x.dtype)
    rows, hidden = x.shape
    if rows == 0:
        return torch.zeros(hidden, dtype=dtype, device=x.device)
    x_hat = x.to(acc) / rms
    if round_x_hat:  # casting_mode="llama": the weight multiplied x_hat rounded to x's dtype
        x_hat = x_hat.to(x.dtype).to(acc)
    t = dy.to(acc) * x_hat
    n_full = rows // ROW_BLOCK
    sums = []
    if n_full:
        blocks = t[: n_full * ROW_BLOCK].reshape(n_full, ROW_BLOCK, hidden)
        sums.append(pairwise_halving_(blocks.movedim(1, -1))[..., 0])
    if rows % ROW_BLOCK:
        tail = t[n_full * ROW_BLOCK :].movedim(0, -1)
        sums.append(pairwise_halving_(tail)[..., 0].unsqueeze(0))
    p = torch.cat(sums) if len(sums) > 1 else sums[0].clone()
    return merge_blocks_(p).to(dtype)


def merge_blocks_(p: torch.Tensor) -> torch.Tensor:
    """Sum ``p`` over dim 0 by adjacent pairs, level by level; returns the sum (``p[0]``
    where ``p`` has one row; ``p`` may be overwritten).

    Level by level, ``p[i] = p[2i] + p[2i + 1]``, an odd last element carried up
    unchanged: the shape of the forward's ``tree`` merge, over row blocks.  Each level
    goes to a fresh tensor (no copy back into ``p``); the last pair is one add.
    """
    count = p.shape[0]
    while count > 2:
        pairs = count // 2
        if count % 2:
            level = p.new_empty((pairs + 1, *p.shape[1:]))
            torch.add(p[0 : 2 * pairs : 2], p[1 : 2 * pairs : 2], out=level[:pairs])
            level[pairs] = p[count - 1]
        else:
            level = p[0 : 2 * pairs : 2] + p[1 : 2 * pairs : 2]
        p, count = level, pairs + count % 2
    return p[0] + p[1] if count == 2 else p[0]


def merge_blocks_streamed(p: torch.Tensor, group: int = 1) -> torch.Tensor:
    """:func:`merge_blocks_`'s sum of ``p`` over dim 0, the same additions in the same
    order, holding ``group`` plus ``log2(n)`` rows: the model of the native backward's
    merge (native_backward.c).

    Node (level L, index i) of :func:`merge_blocks_`'s tree is the sum of rows
    ``[i 2**L, min((i + 1) 2**L, n))``: left child + right child, the left alone where
    the right is empty.  Aligned groups of ``group`` rows (a power of two) are merged
    level by level into one node each and pushed onto a binary-counter stack, where a
    node meeting its left sibling (the same level) becomes their parent.  The last,
    partial group is merged by the same rule; the root is then the stack folded from
    its smallest node up, ``acc = node + acc``: the tree's nodes cut by ``n``.
    """
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two, not {group}")
    n, g = p.shape[0], group.bit_length() - 1
    stack: list[tuple[int, torch.Tensor]] = []
    acc = None
    for start in range(0, n, group):
        node = merge_blocks_(p[start:start + group].clone())
        if start + group > n:
            acc = node  # the partial group: a node cut by n
            break
        level = g
        while stack and stack[-1][0] == level:
            node, level = stack.pop()[1] + node, level + 1
        stack.append((level, node))
    if acc is None:
        acc = stack.pop()[1]
    while stack:
        acc = stack.pop()[1] + acc
    return acc


# --- forward-mode AD --------------------------------------------------------------


def norm_tangent(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, t_x: torch.Tensor | None,
    t_w: torch.Tensor | None, casting_mode: str, offset: float,
) -> torch.Tensor:
    """The tangent of ``y = x_hat * (w + offset)`` (``x_hat = x / rms``) along ``t_x`` and
    ``t_w`` (``None``: zero).

    ``d x_hat = (t_x - x_hat * mean(x_hat * t_x)) / rms`` and ``dy = d x_hat * w_eff +
    x_hat * t_w``, in the accumulation dtype and cast as the forward casts
    (:func:`~taskgraph_norm.kernels.finalize`: ``"llama"`` rounds both ``x_hat`` terms to
    ``x``'s dtype and multiplies in the promoted dtype).  Plain torch ops in
    ``torch.mean``'s order: differentiable, and batched under ``vmap`` (``jacfwd``).
    ``rms = sqrt(mean(x**2) + eps)`` is recomputed from ``x``, not taken from the
    forward, so the tangent is differentiable in ``x`` too (reverse over forward:
    ``jacrev(jacfwd(f))``, or autograd through a tangent).
    """
    acc = accumulation_dtype(x.dtype)
    out = output_dtype(x.dtype, None if weight is None else weight.dtype, casting_mode)
    xa = x.to(acc)
    rms = torch.sqrt(torch.mean(xa * xa, dim=-1, keepdim=True) + eps)
    x_hat = xa / rms
    d_hat = None
    if t_x is not None:
        ta = t_x.to(acc)
        d_hat = (ta - x_hat * torch.mean(x_hat * ta, dim=-1, keepdim=True)) / rms
    wide = out if casting_mode == "llama" else acc
    if casting_mode == "llama":  # the forward rounded x_hat to x's dtype before the weight
        x_hat = x_hat.to(x.dtype).to(wide)
        d_hat = None if d_hat is None else d_hat.to(x.dtype).to(wide)
    terms = []
    if d_hat is not None:
        terms.append(d_hat if weight is None else d_hat * finalize_weight(weight, wide, offset))
    if t_w is not None and weight is not None:
        terms.append(x_hat * t_w.to(wide))
    if not terms:
        return torch.zeros_like(x, dtype=out)
    tangent = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return tangent.to(out)
