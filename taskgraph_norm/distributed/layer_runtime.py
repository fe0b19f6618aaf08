"""What one rank computes for a sharded LayerNorm: the two reductions, each with one
exchange, then its shard of ``y``.

As :mod:`.runtime` for RMSNorm: the numerics are :mod:`taskgraph_norm.kernels.layer`'s
(the single process's oracle), the merges are the reference interpreter's op methods,
and the exchanges are parameters, so tests can run every rank of any world size in one
process; :mod:`.layer_api` wires them to torch.distributed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import caches, kernels
from ..graph import Graph, Node
from ..kernels import layer
from ..prover import Proof, prove
from .layer_graph import LayerPlan, build_distributed_layer_graph, layer_plan, phase
from .runtime import Gather, Reduce, _input_id, _RankInterpreter

__all__ = ["ShardedLayerPipeline", "for_layer_shards", "layer_exact_max", "run_layer_exact", "run_layer_float"]


class _LayerRankInterpreter(_RankInterpreter):
    """One rank's part of a placed LayerNorm graph."""

    def __init__(self, plan: LayerPlan, rank: int, x_local: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> None:
        super().__init__(plan, rank, x_local, weight, eps)  # type: ignore[arg-type]
        self.bias = bias

    def _window(self, node: Node, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The leaf's input and bounds: a cut chunk reassembled in global order from the
        ranks' raw elements, or this rank's shard with the bounds made local."""
        start, stop = node.attrs["start"], node.attrs["stop"]
        if node.attrs["placement"] == "replicated":
            return torch.cat(self.chunks[(start, stop)], dim=-1), 0, stop - start
        offset = self.plan.offsets[self.rank]
        return x, start - offset, stop - offset

    def sum(self, node: Node, args: list[Any]) -> torch.Tensor:
        x, start, stop = self._window(node, args[0])
        if node.attrs["leaf"] == "native":
            return layer.xsum_native(x, start, stop)
        return layer.xsum_pairwise(x, start, stop)

    def sumsq(self, node: Node, args: list[Any]) -> torch.Tensor:
        x, start, stop = self._window(node, args[0])
        if node.attrs["leaf"] == "native":
            return layer.sumsq_centered_native(x, start, stop, args[1])
        return layer.sumsq_centered_pairwise(x, start, stop, args[1])

    def finalize(self, node: Node, args: list[Any]) -> torch.Tensor:
        return layer.finalize_layer(self.x, args[1], args[2], node.attrs["hidden_size"], self.eps, self.weight,
                                    self.bias)

    def payload(self, which: int) -> torch.Tensor:
        """This rank's phase-``which`` all-gather payload, ``(..., width)`` in the
        accumulation dtype: frontier values, then (the mean's phase) the raw elements of
        its cut chunks, then zero padding."""
        plan: LayerPlan = self.plan  # type: ignore[assignment]
        dtype = kernels.accumulation_dtype(self.x.dtype)
        columns = [self.env[i] for i in plan.frontier[which][self.rank]]
        if which == 0:
            offset = plan.offsets[self.rank]
            columns += [self.x[..., f.start - offset:f.stop - offset].to(dtype) for f in plan.fragments[self.rank]]
        pad = plan.widths[which] - plan.payload_width(which, self.rank)
        if pad:
            columns.append(self.x.new_zeros((*self.x.shape[:-1], pad), dtype=dtype))
        return torch.cat(columns, dim=-1)

    def receive(self, which: int, gathered: list[torch.Tensor]) -> None:
        plan: LayerPlan = self.plan  # type: ignore[assignment]
        for r, payload in enumerate(gathered):
            for col, node_id in enumerate(plan.frontier[which][r]):
                self.env[node_id] = payload[..., col:col + 1]
            if which == 0:
                col = len(plan.frontier[0][r])
                for f in plan.fragments[r]:
                    self.chunks.setdefault(f.chunk, []).append(payload[..., col:col + f.stop - f.start])
                    col += f.stop - f.start


def run_layer_float(plan: LayerPlan, rank: int, x_local: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, gather: Gather) -> torch.Tensor:
    """The mean's local nodes, all-gather, the replicated mean; the variance's local
    nodes, all-gather (skipped when no rank sends anything), the rest and FINALIZE."""
    run = _LayerRankInterpreter(plan, rank, x_local, weight, bias, eps)
    run.env[_input_id(plan.graph)] = x_local
    for which, name in enumerate(("mean", "var")):
        run.run_where(lambda n: n.attrs["placement"] == rank and phase(n) == name)
        if plan.widths[which]:
            run.receive(which, list(gather(run.payload(which))))
        run.run_where(lambda n: n.attrs["placement"] == "replicated" and phase(n) == name)
    run.run_where(lambda n: not isinstance(n.attrs["placement"], int))
    return run.env[plan.graph.output]  # type: ignore[no-any-return]


def layer_exact_max(m: torch.Tensor | None, x_local: torch.Tensor) -> torch.Tensor:
    """A rank's row maximum ``m`` (fp64 ``(..., 1)``; None for an empty shard: zeros),
    NaN made +Inf for the MAX all-reduce (both give the single process's scale)."""
    if m is None:
        return x_local.new_zeros((*x_local.shape[:-1], 1), dtype=torch.float64)
    return torch.where(torch.isnan(m), torch.full_like(m, float("inf")), m)


def run_layer_exact(x_local: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    hidden_size: int, reduce_max: Reduce, reduce_sum: Reduce) -> torch.Tensor:
    """Per reduction: MAX all-reduce of the local maxima, the global scale, the local
    exact pair, SUM all-reduce (every addition exact, in any order); the correctly
    rounded mean between them; then FINALIZE."""
    n = x_local.shape[-1]

    def empty() -> torch.Tensor:  # a fresh one per call: the all-reduce writes in place
        return x_local.new_zeros((*x_local.shape[:-1], kernels.EXACT_CHANNELS), dtype=torch.float64)

    sigmas = kernels.exact_scale(reduce_max(layer_exact_max(layer.rowmax_abs(x_local, 0, n) if n else None,
                                                            x_local)), hidden_size)
    total = reduce_sum(layer.xsum_exact(x_local, 0, n, sigmas) if n else empty())
    mean = layer.mean_exact(total, hidden_size, kernels.accumulation_dtype(x_local.dtype))
    maximum = layer.rowmax_centered(x_local, 0, n, mean) if n else None
    sigmas = kernels.exact_scale(reduce_max(layer_exact_max(maximum, x_local)), hidden_size)
    var_total = reduce_sum(layer.sumsq_centered_exact(x_local, 0, n, mean, sigmas) if n else empty())
    return layer.finalize_layer(x_local, var_total, mean, hidden_size, eps, weight, bias)


class ShardedLayerPipeline:
    """One sharded LayerNorm configuration, built once: ``graph``, ``proof`` and (float)
    ``plan``; calling it runs one rank's part with the collectives it is handed."""

    __slots__ = ("graph", "proof", "plan", "hidden_size", "shard_sizes")

    def __init__(self, hidden_size: int, shard_sizes: tuple[int, ...], chunk_size: int, topology: str,
                 leaf: str, accumulate: str) -> None:
        self.graph: Graph = build_distributed_layer_graph(hidden_size, shard_sizes, chunk_size=chunk_size,
                                                          topology=topology, leaf=leaf, accumulate=accumulate)
        self.proof: Proof = prove(self.graph)
        self.hidden_size, self.shard_sizes = hidden_size, shard_sizes
        self.plan: LayerPlan | None = None if accumulate == "exact" else layer_plan(self.graph)

    def __call__(self, x_shard: torch.Tensor, weight_shard: torch.Tensor | None, bias_shard: torch.Tensor | None,
                 eps: float, rank: int, gather: Gather, reduce_max: Reduce, reduce_sum: Reduce) -> torch.Tensor:
        if self.plan is None:
            return run_layer_exact(x_shard, weight_shard, bias_shard, eps, self.hidden_size, reduce_max,
                                   reduce_sum)
        return run_layer_float(self.plan, rank, x_shard, weight_shard, bias_shard, eps, gather)

    def __repr__(self) -> str:
        return f"<ShardedLayerPipeline shards={list(self.shard_sizes)} {self.proof.summary}>"


@functools.lru_cache(maxsize=256)
def for_layer_shards(hidden_size: int, shard_sizes: tuple[int, ...], chunk_size: int = 64, topology: str = "tree",
                     leaf: str = "pairwise", accumulate: str = "float") -> ShardedLayerPipeline:
    """The :class:`ShardedLayerPipeline` of a configuration (cached)."""
    return ShardedLayerPipeline(hidden_size, shard_sizes, chunk_size, topology, leaf, accumulate)


caches.register(for_layer_shards.cache_clear)
