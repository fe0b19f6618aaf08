"""``normalize`` / ``normalize_sync`` over a last dim sharded across a process group.

Communication per call (``R`` rows, ``W`` ranks, ``b`` bytes of the accumulation
dtype: 4 for fp32/fp16/bf16 inputs, 8 for fp64):

* ``accumulate="float"``: one ``all_gather`` of a ``(R, width)`` payload per rank
  (:func:`payload_bytes_per_row` gives ``width * b``): the rank's frontier values
  (one per maximal merge subtree it owns alone) and the raw elements of chunks its
  shard boundaries cut.  Every rank receives ``W * width * b`` bytes per row.
* ``accumulate="exact"``: one ``all_reduce(MAX)`` of 8 bytes per row, then one
  ``all_reduce(SUM)`` of 16 bytes per row (the fp64 pair), order-free by construction.
* unless ``shard_sizes`` is given: one ``all_gather`` of 6 int64 per rank first, so
  every rank learns the shard sizes and all ranks reject a mismatched call together
  (rather than hanging in a collective of the wrong size).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import torch
import torch.distributed as dist

from .. import kernels
from ..checks import check_input
from ..checks import resolve_eps as _resolve_eps
from ..errors import ShardMismatchError
from ..ops.forward import check_model_options
from .graph import check_shard_sizes
from .pipeline import for_shards

__all__ = ["normalize", "normalize_sync", "naive_normalize_sync", "payload_bytes_per_row"]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _group_info(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ShardMismatchError("torch.distributed is not initialized: call "
                                 "torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(t: torch.Tensor, group: Any, world: int) -> list[torch.Tensor]:
    if world == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _reducer(op: Any, group: Any, world: int) -> Any:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            t = t.contiguous()
            dist.all_reduce(t, op=op, group=group)
        return t
    return reduce


def _agree(x: torch.Tensor, hidden_size: int, config: tuple[Any, ...], group: Any,
           rank: int, world: int) -> tuple[int, ...]:
    """Every rank's shard size, after checking that all ranks made the same call."""
    code = zlib.crc32(repr(config).encode())
    mine = torch.tensor([x.shape[-1], x.shape[:-1].numel(), _DTYPE_CODES[x.dtype], code, hidden_size,
                         x.dim()], dtype=torch.int64, device=x.device)
    table = torch.stack(_gather(mine, group, world)).cpu().tolist()
    for column, what in ((1, "row count"), (2, "dtype"), (3, "options (topology, "
                         "chunk_size, leaf, accumulate, eps)"), (4, "hidden_size"),
                         (5, "number of dims")):
        values = [row[column] for row in table]
        if len(set(values)) != 1:
            raise ShardMismatchError(f"the ranks disagree on the {what}: {values}")
    sizes = tuple(row[0] for row in table)
    if sum(sizes) != hidden_size:
        raise ShardMismatchError(f"the shards' last dims {list(sizes)} add up to {sum(sizes)}, "
                                 f"not hidden_size={hidden_size}")
    return sizes


def normalize_sync(
    x_shard: torch.Tensor,
    weight_shard: torch.Tensor | None = None,
    *,
    hidden_size: int,
    group: Any = None,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    eps: float | None = None,
    shard_sizes: Sequence[int] | None = None,
    casting_mode: str = "torch",
    offset: float = 0.0,
) -> torch.Tensor:
    """RMSNorm of a row whose last dim is split into contiguous shards across ``group``.

    Every rank of ``group`` calls this with its shard ``x_shard`` (shape
    ``(..., D_rank)``, the same leading shape on every rank, shards in rank order,
    uneven or empty shards allowed) and gets its shard of the result.  The bits are
    those of :func:`taskgraph_norm.normalize_sync` on the full tensor with the same
    options, at every world size: the ranks run the single-process merge graph.

    Parameters
    ----------
    x_shard, weight_shard:
        This rank's slices of the input and of the weight (``(D_rank,)`` or None).
    hidden_size:
        The global ``D`` (keyword-only, required).
    group:
        A ``torch.distributed`` process group; None is the default group.  gloo for
        CPU tensors, nccl for CUDA tensors.
    topology, chunk_size, leaf, accumulate, eps, casting_mode, offset:
        As in :func:`taskgraph_norm.normalize`; ``topology="standard"`` cannot span ranks.
    shard_sizes:
        Every rank's ``D_rank``, if the caller knows them; skips one small all-gather.

    Raises
    ------
    ShardMismatchError (a ValueError)
        on every rank, when the ranks' calls do not fit together (shard sizes, row
        counts, dtypes or options), or when no process group is initialised.
    ConfigError, and torch's input errors
        as :func:`taskgraph_norm.normalize_sync` raises them.
    """
    rank, world = _group_info(group)
    _check_shard(x_shard, weight_shard)
    check_model_options(casting_mode, offset)
    eps_value = _resolve_eps(eps, x_shard.dtype)
    casting = (casting_mode, float(offset))
    sizes = _sizes(hidden_size, shard_sizes, x_shard, rank, world, group,
                   (chunk_size, topology, leaf, accumulate, eps_value, *casting))
    pipe = for_shards(hidden_size, sizes, chunk_size, topology, leaf, accumulate)
    if x_shard.shape[:-1].numel() == 0:  # no rows on any rank (they agreed on the count)
        dtype = kernels.output_dtype(x_shard.dtype, None if weight_shard is None else weight_shard.dtype,
                                     casting_mode)
        return torch.empty_like(x_shard, dtype=dtype)
    return pipe(x_shard, weight_shard, eps_value, rank, lambda t: _gather(t, group, world),
                _reducer(dist.ReduceOp.MAX, group, world), _reducer(dist.ReduceOp.SUM, group, world), casting)


def _check_shard(x: object, weight: object | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x_shard must be a torch.Tensor, got {type(x).__name__}")
    check_input(x, (x.shape[-1],) if x.dim() else (1,), weight)


def _sizes(hidden_size: int, shard_sizes: Sequence[int] | None, x: torch.Tensor, rank: int,
           world: int, group: Any, options: tuple[Any, ...]) -> tuple[int, ...]:
    if shard_sizes is None:
        return _agree(x, hidden_size, (hidden_size, *options), group, rank, world)
    sizes = check_shard_sizes(hidden_size, shard_sizes)
    if len(sizes) != world or sizes[rank] != x.shape[-1]:
        raise ShardMismatchError(
            f"shard_sizes={list(sizes)} does not fit rank {rank} of {world} holding "
            f"{x.shape[-1]} elements of the last dim")
    return sizes


async def normalize(
    x_shard: torch.Tensor,
    weight_shard: torch.Tensor | None = None,
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
    """:func:`normalize_sync` from async code: the collectives block a worker thread,
    not the event loop.  Calls on one group must still be issued in the same order on
    every rank (torch.distributed's rule), so do not overlap two calls on one group."""
    return await anyio.to_thread.run_sync(lambda: normalize_sync(
        x_shard, weight_shard, hidden_size=hidden_size, group=group, topology=topology,
        chunk_size=chunk_size, leaf=leaf, accumulate=accumulate, eps=eps,
        shard_sizes=shard_sizes,
    ))


def naive_normalize_sync(
    x_shard: torch.Tensor,
    weight_shard: torch.Tensor | None = None,
    *,
    hidden_size: int,
    group: Any = None,
    eps: float | None = None,
) -> torch.Tensor:
    """The usual tensor-parallel RMSNorm, kept as the negative control and benchmark
    baseline: ``torch.sum`` of the local squares, ``all_reduce(SUM)`` of one fp32 per
    row, FINALIZE.  Its rounding follows the shard boundaries and the all-reduce's
    algorithm, so its bits change with the world size (see :func:`build_naive_graph`)."""
    _, world = _group_info(group)
    _check_shard(x_shard, weight_shard)
    total = kernels.sumsq_native(x_shard, 0, x_shard.shape[-1])
    total = _reducer(dist.ReduceOp.SUM, group, world)(total)
    return kernels.finalize(x_shard, total, hidden_size, _resolve_eps(eps, x_shard.dtype),
                            weight_shard)


def payload_bytes_per_row(
    hidden_size: int, shard_sizes: Sequence[int], *, dtype: torch.dtype = torch.float32,
    topology: str = "tree", chunk_size: int = 64, leaf: str = "pairwise",
    accumulate: str = "float",
) -> int:
    """Bytes per row one rank hands to the collectives of one call (after the shard
    sizes are known): the all-gather payload for ``"float"``, the two all-reduce
    buffers (8 + 16) for ``"exact"``."""
    if accumulate == "exact":
        return 8 + 16
    plan = for_shards(hidden_size, check_shard_sizes(hidden_size, shard_sizes), chunk_size, topology, leaf,
                      accumulate).plan
    assert plan is not None  # a float configuration
    size = torch.empty((), dtype=kernels.accumulation_dtype(dtype)).element_size()
    return plan.width * size
