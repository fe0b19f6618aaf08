"""The sharded pipeline: one cached object per sharded configuration.

What :class:`taskgraph_norm.Pipeline` is to ``normalize``, :class:`ShardedPipeline`
is to :func:`taskgraph_norm.distributed.normalize_sync`: built once per
(hidden size, shard sizes, chunk size, topology, leaf, accumulate), it holds the
single-process graph placed over the shards (``graph``), its proof (``proof``:
whether the result is the same bits at every world size), and, for the float
domain, the send/receive plan (``plan``); calling it runs one rank's part with the
collectives it is handed.  ``for_shards`` is the cache; ``tgn.clear_caches()``
empties it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .. import caches
from ..graph import Graph
from ..prover import Proof, prove
from .graph import DistributedPlan, build_distributed_graph, distributed_plan
from .runtime import run_exact, run_float

__all__ = ["ShardedPipeline", "for_shards"]

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
Reduce = Callable[[torch.Tensor], torch.Tensor]


class ShardedPipeline:
    """One sharded configuration, built once: ``graph``, ``proof`` and ``plan``.

    ``plan`` is ``None`` in the exact domain, whose ranks need no plan: a MAX and a
    SUM all-reduce of exact values (docs/distributed.md).
    """

    __slots__ = ("graph", "proof", "plan", "hidden_size", "shard_sizes", "exact")

    def __init__(self, hidden_size: int, shard_sizes: tuple[int, ...], chunk_size: int, topology: str,
                 leaf: str, accumulate: str) -> None:
        self.graph: Graph = build_distributed_graph(hidden_size, shard_sizes, chunk_size=chunk_size,
                                                    topology=topology, leaf=leaf, accumulate=accumulate)
        self.proof: Proof = prove(self.graph)
        self.hidden_size, self.shard_sizes = hidden_size, shard_sizes
        self.exact = accumulate == "exact"
        self.plan: DistributedPlan | None = None if self.exact else distributed_plan(self.graph)

    def __call__(self, x_shard: torch.Tensor, weight_shard: torch.Tensor | None, eps: float, rank: int,
                 gather: Gather, reduce_max: Reduce, reduce_sum: Reduce,
                 casting: tuple[str, float] = ("torch", 0.0)) -> torch.Tensor:
        """Rank ``rank``'s output shard: ``gather`` is an all-gather over the group (float
        domain), ``reduce_max``/``reduce_sum`` all-reduces (exact domain); ``casting`` is
        FINALIZE's ``(casting_mode, offset)``."""
        if self.plan is None:
            return run_exact(x_shard, weight_shard, eps, self.hidden_size, reduce_max, reduce_sum, casting)
        return run_float(self.plan, rank, x_shard, weight_shard, eps, gather, casting)

    def __repr__(self) -> str:
        return f"<ShardedPipeline shards={list(self.shard_sizes)} {self.proof.summary}>"


@functools.lru_cache(maxsize=256)
def for_shards(hidden_size: int, shard_sizes: tuple[int, ...], chunk_size: int = 64, topology: str = "tree",
               leaf: str = "pairwise", accumulate: str = "float") -> ShardedPipeline:
    """The :class:`ShardedPipeline` of a configuration (cached)."""
    return ShardedPipeline(hidden_size, shard_sizes, chunk_size, topology, leaf, accumulate)


caches.register(for_shards.cache_clear)
