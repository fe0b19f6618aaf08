"""The DTensor path's layout and its autograd: where a DTensor's rows and hidden dim live,
the local weight with torch's gradient placements, and :class:`ShardedNorm`.

:class:`ShardedNorm` is the RMSNorm of local tensors for the two DTensor cases the
one-process face cannot run alone:

* ``x`` sharded on the hidden dim: the forward is the tensor-parallel reduction of
  :func:`taskgraph_norm.distributed.normalize_sync` (the one-process bits at every world
  size); the backward gathers the rows of ``x`` and ``dy`` (and the weight) over the
  hidden dim's group and runs the one-process backward (``dx`` through the forward's
  merge DAG), keeping this rank's columns.  That costs an all-gather of ``x`` and ``dy``
  per backward (what SequenceParallel's all-gather costs), and gives ``dx`` and ``dW``
  the one-process bits.
* ``weight_grad="exact"``: the backward's ``dW`` is this call's exact sum, and the exact
  sums are added over every mesh dim that shards rows (an integer all-reduce,
  :func:`.exact_grads.all_reduce_exact_sums`) before the one rounding, so every rank's
  ``dW`` is the one-process ``dW`` of the whole batch, ``Replicate()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..checks import check_input, resolve_eps
from ..errors import ConfigError
from ..ops import backward as _backward
from ..ops import forward as _forward
from ..ops.exact_weight import _call_sum
from .api import normalize_sync as _sharded_normalize_sync
from .exact_grads import all_reduce_exact_sums

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    pass

__all__ = ["Layout", "ShardedNorm", "all_sizes", "chunk_sizes", "gather_columns", "local_param"]


def chunk_sizes(size: int, parts: int) -> tuple[int, ...]:
    """The sizes ``torch.chunk`` (and so DTensor's ``Shard``) splits ``size`` into, padded
    with empty parts up to ``parts``."""
    full = -(-size // parts) if size else 0
    return tuple(max(0, min(full, size - r * full)) for r in range(parts))


@dataclass(frozen=True)
class Layout:
    """Where a DTensor ``x``'s rows and normalised dims live.

    ``hidden``: the mesh dim that shards the normalised dim (``None``: none);
    ``rows``: the mesh dims that shard a row dim; ``sizes``: the hidden shards' sizes
    in mesh order (``None``: not ``torch.chunk``'s, gathered by the reduction).
    """

    mesh: Any
    placements: tuple[Any, ...]
    hidden: int | None
    rows: tuple[int, ...]
    hidden_size: int
    sizes: tuple[int, ...] | None

    @classmethod
    def of(cls, x: Any, normalized: int) -> Layout:
        ndim = x.dim()
        first = ndim - normalized
        hidden: list[int] = []
        rows: list[int] = []
        for i, p in enumerate(x.placements):
            if p.is_shard():
                (hidden if p.dim % max(ndim, 1) >= first else rows).append(i)
        if len(hidden) > 1:
            raise NotImplementedError(f"a DTensor whose normalised dim is sharded over {len(hidden)} mesh dims "
                                      f"({list(x.placements)}): shard it over one")
        mesh, size = x.device_mesh, x.shape[-1] if ndim else 0
        sizes = None
        if hidden:
            sizes = chunk_sizes(size, mesh.size(hidden[0]))
            if x.to_local().shape[-1] != sizes[mesh.get_local_rank(hidden[0])]:
                sizes = None  # from_local with shards of its own sizes: the reduction gathers them
        return cls(mesh, tuple(x.placements), hidden[0] if hidden else None, tuple(rows), size, sizes)

    def group(self) -> Any:
        assert self.hidden is not None
        return self.mesh.get_group(self.hidden)


def local_param(w: Any, lay: Layout, exact: bool) -> torch.Tensor | None:
    """The weight (or bias) as this rank needs it: whole, or its shard of the hidden dim.

    A plain tensor is taken as replicated on every rank (``from_local``, whose backward
    reduces a ``Partial()`` gradient).  The gradient placements are torch's for
    ``nn.RMSNorm`` under SequenceParallel: ``Partial()`` where the rows are sharded
    (``Replicate()`` with ``exact``: :class:`ShardedNorm` adds them exactly), ``Shard(0)``
    on the hidden dim's mesh dim, ``Replicate()`` elsewhere.
    """
    if w is None:
        return None
    mesh = lay.mesh
    if not isinstance(w, DTensor):
        w = DTensor.from_local(w, mesh, [Replicate()] * mesh.ndim, run_check=False)
    elif w.device_mesh != mesh:
        raise ValueError(f"the weight's device mesh {w.device_mesh} is not x's {mesh}")
    target = [Shard(0) if i == lay.hidden else Replicate() for i in range(mesh.ndim)]
    if list(w.placements) != target:
        w = w.redistribute(mesh, target)
    grads = [Shard(0) if i == lay.hidden else Partial() if i in lay.rows and not exact else Replicate()
             for i in range(mesh.ndim)]
    return w.to_local(grad_placements=grads)  # type: ignore[no-any-return]


def gather_columns(t: torch.Tensor, lay: Layout, sizes: tuple[int, ...]) -> torch.Tensor:
    """The whole rows of ``t`` (sharded on its last dim over the hidden group, ``sizes``)."""
    widest = max(sizes)
    pad = torch.nn.functional.pad(t, (0, widest - t.shape[-1])).contiguous()
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad, group=lay.group())
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def all_sizes(t: torch.Tensor, lay: Layout) -> tuple[int, ...]:
    if lay.sizes is not None:
        return lay.sizes
    mine = torch.tensor([t.shape[-1]], dtype=torch.int64)
    table = [torch.empty_like(mine) for _ in range(lay.mesh.size(lay.hidden))]
    dist.all_gather(table, mine, group=lay.group())
    return tuple(int(v) for v in table)


class ShardedNorm(torch.autograd.Function):
    """RMSNorm of the local tensors of a DTensor sharded on the hidden dim, or with
    ``weight_grad="exact"`` (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor | None, eps: float, config: tuple[Any, ...],
                lay: Layout, exact: bool) -> torch.Tensor:
        chunk_size, topology, leaf, accumulate, casting_mode, offset = config
        rms = None
        if lay.hidden is None:
            y, rms = _forward.forward(x, w, eps, *config)
        else:
            y = _sharded_normalize_sync(x, w, hidden_size=lay.hidden_size, group=lay.group(), topology=topology,
                                        chunk_size=chunk_size, leaf=leaf, accumulate=accumulate, eps=eps,
                                        shard_sizes=lay.sizes, casting_mode=casting_mode, offset=offset)
        ctx.save_for_backward(x, w)
        ctx.rms, ctx.eps, ctx.config, ctx.lay, ctx.exact = rms, eps, config, lay, exact
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        lay: Layout = ctx.lay
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and w is not None
        rms = ctx.rms
        if lay.hidden is not None:  # the whole rows, then the one-process backward
            sizes = all_sizes(x, lay)
            start = sum(sizes[: lay.mesh.get_local_rank(lay.hidden)])
            x, dy = gather_columns(x, lay, sizes), gather_columns(dy, lay, sizes)
            w = None if w is None else gather_columns(w, lay, sizes)
            _, rms = _forward.forward(x, w, ctx.eps, *ctx.config)
        float_backward: Any = _backward.backward
        dx, dw = float_backward(dy.contiguous(), x, w, rms, *ctx.config, "float", [need_x, need_w and not ctx.exact])
        if need_w and ctx.exact:
            assert w is not None
            total = _call_sum(dy, x, rms, w.numel())
            for dim in lay.rows:  # the rows' exact sums added over every row-sharding group
                total = all_reduce_exact_sums([total], lay.mesh.get_group(dim))[0]
            dw = total.result(w.dtype).view(w.shape)
        if lay.hidden is not None:
            stop = start + sizes[lay.mesh.get_local_rank(lay.hidden)]
            dx = dx[..., start:stop] if need_x else dx
            dw = dw[start:stop] if need_w else dw
        return (dx if need_x else None), (dw if need_w else None), None, None, None, None

    @staticmethod
    def run(x: torch.Tensor, w: torch.Tensor | None, eps: float | None, config: tuple[Any, ...], lay: Layout,
            exact: bool) -> torch.Tensor:
        """Check the local inputs as the one-process face does, then apply."""
        check_input(x, (x.shape[-1],) if x.dim() else (1,), w)
        if exact and (x.dtype == torch.float64 or (w is not None and w.dtype == torch.float64)):
            raise ConfigError("weight_grad", "exact", "fp32, bf16 or fp16 inputs and weights (the exact "
                              "accumulator sums products of fp32 values; docs/training.md)")
        apply: Any = ShardedNorm.apply
        return apply(x, w, resolve_eps(eps, x.dtype), config, lay, exact)  # type: ignore[no-any-return]
