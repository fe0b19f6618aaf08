"""LayerNorm of a DTensor sharded on the normalised dim: :class:`ShardedLayerNorm`.

The forward is the tensor-parallel LayerNorm of
:func:`taskgraph_norm.distributed.layer_norm_sync` over the hidden dim's process group
(the one-process bits at every world size, ``accumulate="float"`` or ``"exact"``).  The
backward is :class:`.dtensor_grad.ShardedNorm`'s for RMSNorm: the rows of ``x`` and
``dy`` (and the weight and bias) are gathered over the hidden group, the one-process
LayerNorm backward runs on the whole rows (its row statistics recomputed there, the
forward's bits), and this rank keeps its columns of ``dx``, ``dW`` and ``db``.  So
``dx`` has the one-process bits, and so do ``dW`` and ``db`` for the rows this rank
holds (summed over ranks in float where another mesh dim shards the rows, as torch
does).
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.layer import layer_norm_backward_op, layer_norm_op
from ..pipeline.layer_checks import resolve_layer_eps
from .dtensor_grad import Layout, all_sizes, gather_columns
from .layer_api import layer_norm_sync as _sharded_layer_norm_sync

__all__ = ["ShardedLayerNorm"]


class ShardedLayerNorm(torch.autograd.Function):
    """LayerNorm of the local tensors of a DTensor sharded on the hidden dim (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float,
                config: tuple[Any, ...], lay: Layout) -> torch.Tensor:
        chunk_size, topology, leaf, accumulate = config
        y = _sharded_layer_norm_sync(x, w, b, hidden_size=lay.hidden_size, group=lay.group(), topology=topology,
                                     chunk_size=chunk_size, leaf=leaf, accumulate=accumulate, eps=eps,
                                     shard_sizes=lay.sizes)
        ctx.save_for_backward(x, w, b)
        ctx.eps, ctx.config, ctx.lay = eps, config, lay
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, w, b = ctx.saved_tensors
        lay: Layout = ctx.lay
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and w is not None,
                ctx.needs_input_grad[2] and b is not None]
        sizes = all_sizes(x, lay)
        rank = lay.mesh.get_local_rank(lay.hidden)
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        xg, dyg = gather_columns(x, lay, sizes), gather_columns(dy, lay, sizes).contiguous()
        wg = None if w is None else gather_columns(w, lay, sizes)
        bg = None if b is None else gather_columns(b, lay, sizes)
        _, mean, den = layer_norm_op(xg, wg, bg, ctx.eps, *ctx.config)  # the forward's statistics
        grads = layer_norm_backward_op(dyg, xg, wg, bg, mean, den, *ctx.config, mask)
        dx, dw, db = (g[..., start:stop] if need else None for g, need in zip(grads, mask))
        return dx, dw, db, None, None, None

    @staticmethod
    def run(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float | None,
            config: tuple[Any, ...], lay: Layout) -> torch.Tensor:
        """Apply (the sharded ``layer_norm_sync`` checks the local inputs as the
        one-process face does)."""
        apply: Any = ShardedLayerNorm.apply
        return apply(x, w, b, resolve_layer_eps(eps), config, lay)  # type: ignore[no-any-return]
