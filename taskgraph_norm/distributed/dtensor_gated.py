"""DTensor inputs to the gated, grouped RMSNorm (``normalize_sync(..., gate=...)``,
``await normalize(...)``, ``GatedRMSNorm``), handed here by
:func:`taskgraph_norm.ops.gated_rms_norm` through :func:`taskgraph_norm.ops.dtensor_face`.

The gate must be a DTensor of ``x``'s shape, mesh and placements (``Partial()`` is
reduced to ``Replicate()`` first in both).  Per placement of ``x``:

* ``Replicate()`` and ``Shard(d)`` of a dim that is not normalised: every row is whole
  on its rank, so the one-process call runs on the local rows; the result keeps the
  placement.
* ``Shard`` of the hidden dim with ``group_size`` set, even shards (the hidden size a
  multiple of the mesh dim's size) and ``group_size`` dividing the shard: every group
  lies within one rank's shard, and each group is its own row of the merge graph, so
  the one-process call on the local columns (and the weight's shard) has the bits of
  the whole call.  Any other hidden sharding (no groups, or a group cut by a shard
  boundary) raises ``NotImplementedError``: the gated norm has no tensor-parallel
  reduction; redistribute ``x`` and the gate to rows sharded first.

The weight's gradient placements are :func:`.dtensor_grad.local_param`'s.  With
``GatedRMSNorm(weight_grad="exact")`` the backward is :class:`ShardedGatedExact`'s:
this call's exact sum, added over every mesh dim that shards rows by an integer
all-reduce, rounded once (``Replicate()``, the one-process bits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError, GateShapeError
from ..ops.exact_grad import exact_grads
from ..ops.gated import gated_rms_norm
from .dtensor import _layout, _too_old, _wrap
from .dtensor_grad import Layout, local_param
from .exact_grads import all_reduce_exact_sums

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ShardedGatedExact", "faces", "gated"]


def _local_gate(gate: Any, x: Any, lay: Layout) -> torch.Tensor | None:
    """The gate's local shard: a DTensor of ``x``'s shape, mesh and placements."""
    if gate is None:
        return None
    if not isinstance(gate, DTensor):
        raise TypeError(f"gate must be a DTensor like x (got {type(gate).__name__}): distribute it as x is")
    if gate.shape != x.shape:
        raise GateShapeError(tuple(gate.shape), tuple(x.shape))
    if any(p.is_partial() for p in gate.placements):
        gate = gate.redistribute(gate.device_mesh, [Replicate() if p.is_partial() else p for p in gate.placements])
    if gate.device_mesh != lay.mesh or tuple(gate.placements) != tuple(lay.placements):
        raise ValueError(f"gate must have x's mesh and placements {list(lay.placements)}, got "
                         f"{list(gate.placements)} on {gate.device_mesh}: redistribute it as x is")
    return gate.to_local()  # type: ignore[no-any-return]


def _check_hidden_sharding(x: Any, lay: Layout, group_size: object) -> None:
    """Hidden sharding runs locally only where every group lies within one rank's shard."""
    hidden, parts = x.shape[-1], lay.mesh.size(lay.hidden)
    if group_size is None:
        raise NotImplementedError(
            "a gated RMSNorm of a DTensor sharded on the normalised dim without group_size: the gated norm has "
            "no tensor-parallel reduction; shard the rows (Shard on another dim) or redistribute x and the "
            "gate to Replicate() first")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or hidden % group_size:
        raise ConfigError("group_size", group_size, f"None or a positive divisor of the hidden size {hidden}")
    if lay.sizes is None or hidden % parts or (hidden // parts) % group_size:
        raise NotImplementedError(
            f"a gated RMSNorm with group_size={group_size} of a DTensor whose hidden dim ({hidden}) is sharded "
            f"over {parts} ranks{' unevenly' if lay.sizes is None or hidden % parts else ''}: a group is cut by "
            "a shard boundary, and the gated norm has no tensor-parallel reduction; shard the hidden dim evenly "
            "in whole groups, shard the rows, or redistribute x and the gate to Replicate() first")


def gated(x: Any, gate: Any, weight: Any, eps: float | None, options: dict[str, Any],
          exact_param: torch.Tensor | None) -> Any:
    """:func:`taskgraph_norm.ops.gated_rms_norm` of a DTensor ``x`` (module doc)."""
    x, lay = _layout(x, 1, "gated RMSNorm")
    g_local = _local_gate(gate, x, lay)
    if lay.hidden is not None:
        _check_hidden_sharding(x, lay, options["group_size"])
    exact = exact_param is not None and weight is not None and torch.is_grad_enabled()
    w_local = local_param(weight, lay, exact)
    if exact:
        assert w_local is not None
        apply: Any = ShardedGatedExact.apply
        y = apply(x.to_local(), g_local, w_local, eps, options, lay)
    else:
        y = gated_rms_norm(x.to_local(), g_local, w_local, eps, **options)
    return _wrap(y, x, lay)


class ShardedGatedExact(torch.autograd.Function):
    """The gated norm of local tensors whose weight gradient is the exact sum over every
    rank's rows (``GatedRMSNorm(weight_grad="exact")`` on a DTensor).

    The backward runs the one-process exact backward on the local rows with a private
    leaf copy of the weight (its exact sum, not the module's parameter, which is a
    DTensor or the whole weight), adds the exact sums over the row-sharding groups and
    rounds once; ``dx`` and ``dgate`` are that backward's (the one-process bits)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: torch.Tensor | None, w: torch.Tensor, eps: float | None,
                options: dict[str, Any], lay: Layout) -> torch.Tensor:
        ctx.save_for_backward(x, gate, w)
        ctx.eps, ctx.options, ctx.lay = eps, options, lay
        return gated_rms_norm(x, gate, w, eps, **options)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, gate, w = ctx.saved_tensors
        lay: Layout = ctx.lay
        xl = x.detach().requires_grad_(ctx.needs_input_grad[0])
        gl = None if gate is None else gate.detach().requires_grad_(ctx.needs_input_grad[1])
        probe = w.detach().clone().requires_grad_()  # a leaf: the exact sum of this call alone
        try:
            with torch.enable_grad():
                y = gated_rms_norm(xl, gl, probe, ctx.eps, **ctx.options, exact_param=probe)
                inputs = [t for t in (xl, gl, probe) if t is not None and t.requires_grad]
                torch.autograd.backward(y, dy, inputs=inputs)
            total = exact_grads.state(probe)
        finally:
            exact_grads.forget([probe])
        for dim in lay.rows:  # the rows' exact sums added over every row-sharding group
            total = all_reduce_exact_sums([total], lay.mesh.get_group(dim))[0]
        dw = total.result(w.dtype).view(w.shape) if ctx.needs_input_grad[2] else None
        return xl.grad, (None if gl is None else gl.grad), dw, None, None, None


def faces() -> dict[str, Callable[..., Any]]:
    """The gated face by name (:data:`taskgraph_norm.ops.routing.DTENSOR_FACES`)."""
    return {"gated": _too_old if DTensor is None else gated}
