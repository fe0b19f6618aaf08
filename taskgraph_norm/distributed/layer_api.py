"""``layer_norm`` / ``layer_norm_sync`` over a last dim sharded across a process group.

Communication per call (``R`` rows, ``W`` ranks, ``b`` bytes of the accumulation dtype):

* ``accumulate="float"``: two ``all_gather`` calls, the mean's (its frontier values
  and the raw elements of the chunks a shard boundary cuts) and, once every rank has
  the mean, the variance's (its frontier values); the second is skipped when no rank
  has anything to send.
* ``accumulate="exact"``: per reduction an ``all_reduce(MAX)`` of 8 bytes per row
  and an ``all_reduce(SUM)`` of 16 bytes per row, order-free by construction.
* unless ``shard_sizes`` is given: one ``all_gather`` of 6 int64 per rank first, as
  :func:`taskgraph_norm.distributed.normalize_sync` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import torch
import torch.distributed as dist

from ..pipeline.layer_checks import check_layer_input, resolve_layer_eps
from .api import _gather, _group_info, _reducer, _sizes
from .layer_runtime import for_layer_shards

__all__ = ["layer_norm", "layer_norm_sync"]


def layer_norm_sync(
    x_shard: torch.Tensor,
    weight_shard: torch.Tensor | None = None,
    bias_shard: torch.Tensor | None = None,
    *,
    hidden_size: int,
    group: Any = None,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    eps: float | None = None,
    shard_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """LayerNorm of a row whose last dim is split into contiguous shards across ``group``.

    Every rank calls this with its shard (shape ``(..., D_rank)``, the same leading
    shape on every rank, shards in rank order, uneven or empty shards allowed) and
    its slices of the weight and bias, and gets its shard of the result: the bits of
    :func:`taskgraph_norm.layer_norm_sync` on the full tensor with the same options, at
    every world size (the ranks run the single-process graph: docs/distributed.md).
    ``eps=None`` means 1e-5.  The other arguments and the errors are those of
    :func:`taskgraph_norm.distributed.normalize_sync`.
    """
    rank, world = _group_info(group)
    if not isinstance(x_shard, torch.Tensor):
        raise TypeError(f"x_shard must be a torch.Tensor, got {type(x_shard).__name__}")
    check_layer_input(x_shard, x_shard.shape[-1] if x_shard.dim() else 1, weight_shard, bias_shard)
    eps_value = resolve_layer_eps(eps)
    sizes = _sizes(hidden_size, shard_sizes, x_shard, rank, world, group,
                   ("layer", chunk_size, topology, leaf, accumulate, eps_value))
    pipe = for_layer_shards(hidden_size, sizes, chunk_size, topology, leaf, accumulate)
    if x_shard.shape[:-1].numel() == 0:  # no rows on any rank (they agreed on the count)
        return torch.empty_like(x_shard)
    return pipe(x_shard, weight_shard, bias_shard, eps_value, rank, lambda t: _gather(t, group, world),
                _reducer(dist.ReduceOp.MAX, group, world), _reducer(dist.ReduceOp.SUM, group, world))


async def layer_norm(
    x_shard: torch.Tensor,
    weight_shard: torch.Tensor | None = None,
    bias_shard: torch.Tensor | None = None,
    *,
    hidden_size: int,
    group: Any = None,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    eps: float | None = None,
    shard_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """:func:`layer_norm_sync` from async code (the collectives block a worker thread);
    calls on one group must still come in the same order on every rank."""
    return await anyio.to_thread.run_sync(lambda: layer_norm_sync(
        x_shard, weight_shard, bias_shard, hidden_size=hidden_size, group=group, topology=topology,
        chunk_size=chunk_size, leaf=leaf, accumulate=accumulate, eps=eps, shard_sizes=shard_sizes,
    ))
