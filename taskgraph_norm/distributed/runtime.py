"""What one rank computes, in three steps: local nodes, one exchange, replicated nodes.

The numerics are the library's kernels and the merge nodes are run by the
reference interpreter's op methods, so a rank computes exactly what the
single-process graph computes; only the leaves' inputs and the place a node runs
differ.  The functions here are pure (the exchange is a parameter), so tests can
check any world size in one process; :mod:`.api` wires them to torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import kernels
from ..kernels.reference import ReferenceInterpreter
from ..graph import Graph, Node, Op
from .graph import DistributedPlan

__all__ = [
    "exact_local_max",
    "exact_local_pair",
    "float_finish",
    "float_payload",
    "run_float",
    "run_exact",
]

#: ``gather(payload) -> [payload of rank 0, ..., payload of rank W-1]``
Gather = Callable[[torch.Tensor], Sequence[torch.Tensor]]
#: ``reduce(t) -> t reduced over ranks`` (MAX, then SUM), in place or not
Reduce = Callable[[torch.Tensor], torch.Tensor]


class _RankInterpreter(ReferenceInterpreter):
    """The reference interpreter's op methods, run on one rank's part of the graph."""

    def __init__(self, plan: DistributedPlan, rank: int, x_local: torch.Tensor,
                 weight: torch.Tensor | None, eps: float, casting: tuple[str, float] = ("torch", 0.0)) -> None:
        # The plan's graph was validated when it was built; skip re-validating per call.
        self.graph, self.arrival = plan.graph, {}
        self._order = plan.graph.topological_order
        self.plan, self.rank = plan, rank
        self.x, self.weight, self.eps, self.casting = x_local, weight, eps, casting
        self.env: dict[str, Any] = {}
        self.chunks: dict[tuple[int, int], list[torch.Tensor]] = {}

    def run_where(self, keep: Callable[[Node], bool]) -> None:
        for node_id in self._order:
            node = self.graph.by_id[node_id]
            if node_id not in self.env and keep(node):
                args = [self.env[i] for i in node.inputs]
                self.env[node_id] = getattr(self, node.op.value)(node, args)

    def sumsq(self, node: Node, args: list[Any]) -> torch.Tensor:
        start, stop = node.attrs["start"], node.attrs["stop"]
        if node.attrs["placement"] == "replicated":
            # A cut chunk, reassembled in global order from the ranks' raw elements:
            # the leaf kernel sees the same values at the same positions as on one process.
            x, start, stop = torch.cat(self.chunks[(start, stop)], dim=-1), 0, stop - start
        else:
            x, offset = args[0], self.plan.offsets[self.rank]
            start, stop = start - offset, stop - offset
        if node.attrs["leaf"] == "native":
            return kernels.sumsq_native(x, start, stop)
        return kernels.sumsq_pairwise(x, start, stop)

    def finalize(self, node: Node, args: list[Any]) -> torch.Tensor:
        return kernels.finalize(self.x, args[1], node.attrs["hidden_size"], self.eps, self.weight, *self.casting)


def float_payload(plan: DistributedPlan, rank: int, x_local: torch.Tensor) -> torch.Tensor:
    """Rank ``rank``'s all-gather payload, shape ``(..., plan.width)``, accumulation dtype.

    Its frontier values (one column each), then the raw elements of its cut chunks,
    then zero padding up to the common width.
    """
    run = _RankInterpreter(plan, rank, x_local, None, 0.0)
    run.env[_input_id(plan.graph)] = x_local
    _batched_leaves(plan, rank, x_local, run.env)
    run.run_where(lambda n: n.attrs["placement"] == rank)
    dtype = kernels.accumulation_dtype(x_local.dtype)
    offset = plan.offsets[rank]
    columns = [run.env[i] for i in plan.frontier[rank]]
    columns += [x_local[..., f.start - offset:f.stop - offset].to(dtype)
                for f in plan.fragments[rank]]
    pad = plan.width - plan.payload_width(rank)
    if pad:
        columns.append(x_local.new_zeros((*x_local.shape[:-1], pad), dtype=dtype))
    return torch.cat(columns, dim=-1)


def _batched_leaves(plan: DistributedPlan, rank: int, x_local: torch.Tensor,
                    env: dict[str, Any]) -> None:
    """This rank's full-length pairwise leaves, all at once: the same kernel on a
    ``(..., n, C)`` view does each chunk's halving elementwise, so each leaf has the
    bits it gets alone.  (Native leaves stay one by one: torch.sum's order for a
    different outer shape is not ours to promise.)"""
    run = plan.batched[rank]
    if run is None:
        return
    first, count, length, ids = run
    start = first - plan.offsets[rank]
    block = x_local[..., start:start + count * length]
    sums = kernels.sumsq_pairwise(block.reshape(*block.shape[:-1], count, length), 0, length)
    for k, node_id in enumerate(ids):
        env[node_id] = sums[..., k, :]


def float_finish(
    plan: DistributedPlan,
    rank: int,
    x_local: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    gathered: Sequence[torch.Tensor],
    casting: tuple[str, float] = ("torch", 0.0),
) -> torch.Tensor:
    """Rank ``rank``'s output shard from every rank's payload (in rank order); ``casting``
    is FINALIZE's ``(casting_mode, offset)``."""
    run = _RankInterpreter(plan, rank, x_local, weight, eps, casting)
    run.env[_input_id(plan.graph)] = x_local
    for r, payload in enumerate(gathered):
        for col, node_id in enumerate(plan.frontier[r]):
            run.env[node_id] = payload[..., col:col + 1]
        col = len(plan.frontier[r])
        for f in plan.fragments[r]:
            run.chunks.setdefault(f.chunk, []).append(payload[..., col:col + f.stop - f.start])
            col += f.stop - f.start
    run.run_where(lambda n: not isinstance(n.attrs["placement"], int))
    return run.env[plan.graph.output]  # type: ignore[no-any-return]


def run_float(
    plan: DistributedPlan, rank: int, x_local: torch.Tensor, weight: torch.Tensor | None,
    eps: float, gather: Gather, casting: tuple[str, float] = ("torch", 0.0),
) -> torch.Tensor:
    """Payload, one all-gather, then the replicated merge and this rank's FINALIZE."""
    return float_finish(plan, rank, x_local, weight, eps, gather(float_payload(plan, rank, x_local)), casting)


def _input_id(graph: Graph) -> str:
    return next(n.id for n in graph.nodes if n.op is Op.INPUT)


# --- exact domain ------------------------------------------------------------------------


def exact_local_max(x_local: torch.Tensor) -> torch.Tensor:
    """This rank's row maximum of the squares, fp64 ``(..., 1)``, ready for a MAX all-reduce.

    NaN becomes +Inf: a collective's max need not propagate NaN, and both give the
    same scale (none), so the single-process result is kept.
    """
    if x_local.shape[-1] == 0:
        return x_local.new_zeros((*x_local.shape[:-1], 1), dtype=torch.float64)
    m = kernels.rowmax_sq(x_local, 0, x_local.shape[-1])
    return torch.where(torch.isnan(m), torch.full_like(m, float("inf")), m)


def exact_local_pair(x_local: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """This rank's exact pair ``(S1, S2)`` on the row's global grid, ready for a SUM all-reduce."""
    if x_local.shape[-1] == 0:
        return x_local.new_zeros((*x_local.shape[:-1], kernels.EXACT_CHANNELS), dtype=torch.float64)
    return kernels.sumsq_exact(x_local, 0, x_local.shape[-1], sigmas)


def run_exact(
    x_local: torch.Tensor, weight: torch.Tensor | None, eps: float, hidden_size: int,
    reduce_max: Reduce, reduce_sum: Reduce, casting: tuple[str, float] = ("torch", 0.0),
) -> torch.Tensor:
    """MAX all-reduce, global scale, local exact pair, SUM all-reduce, FINALIZE.

    Every fp64 addition the SUM all-reduce makes, in whatever order its algorithm
    picks, adds multiples of one grid unit whose total stays below 2**53 units (the
    scale is sized for the global D and maximum), so each is exact.
    """
    sigmas = kernels.exact_scale(reduce_max(exact_local_max(x_local)), hidden_size)
    total = reduce_sum(exact_local_pair(x_local, sigmas))
    return kernels.finalize(x_local, total, hidden_size, eps, weight, *casting)
