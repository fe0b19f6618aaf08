"""DTensor inputs to the faces: ``normalize_sync``, ``RMSNorm``, ``layer_norm_sync``, ``LayerNorm``.

torch's ``register_sharding`` can only ask DTensor for a redistribution, never run a
reduction of ours, so the faces hand a call with a DTensor here (through
:func:`taskgraph_norm.ops.dtensor_face`), and the call runs on the local tensors
(``to_local``/``from_local``, both differentiable):

* ``Replicate()`` and ``Shard(d)`` on a dim ``d`` that is not normalised: every row is
  whole on its rank, so the one-process face runs on the local rows and the result
  keeps ``x``'s placements.
* ``Shard`` of the normalised dim (one mesh dim; a norm over one dim): the forward is
  :func:`taskgraph_norm.distributed.normalize_sync` (LayerNorm:
  :func:`~taskgraph_norm.distributed.layer_norm_sync`) over that mesh dim's process
  group, the world-size-invariant tensor-parallel reduction; the backward is
  :mod:`.dtensor_grad`'s (LayerNorm: :mod:`.dtensor_layer`'s).

The gated, grouped RMSNorm's DTensor calls are :mod:`.dtensor_gated`'s.
* ``Partial()`` inputs are reduced to ``Replicate()`` first (torch's own redistribution,
  as torch's ops do).

The weight may be a DTensor on ``x``'s mesh or a plain tensor (taken as replicated on
every rank).  Its gradient follows torch's rule for ``nn.RMSNorm``: ``Partial()`` over
the mesh dims that shard rows, ``Replicate()`` where ``x`` is replicated, ``Shard(0)``
over the mesh dim that shards the hidden dim; a plain weight gets its gradient reduced
(torch's ``from_local`` backward).  With ``RMSNorm(weight_grad="exact")`` the exact
sums are added over the row-sharding groups in the backward (:mod:`.dtensor_grad`), so
the weight's gradient is ``Replicate()`` with the one-process bits.  docs/distributed.md,
"DTensor", says what each case costs and guarantees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..api import normalize_sync as _normalize_sync
from ..errors import ConfigError, InputShapeError
from ..layernorm.api import layer_norm_sync as _layer_norm_sync
from .dtensor_grad import Layout, ShardedNorm, local_param
from .dtensor_layer import ShardedLayerNorm

try:  # torch >= 2.5: the public DTensor module
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover  (torch 2.4: DTensor calls fail clearly, below)
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["layer_module", "layer_norm", "normalize", "rms_module", "MIN_TORCH"]

#: The first torch whose public ``torch.distributed.tensor`` has every API used here.
MIN_TORCH = "2.5"


def _layout(x: Any, normalized: int, what: str) -> tuple[Any, Layout]:
    """``x`` (``Partial()`` reduced to ``Replicate()``) and its :class:`Layout`."""
    if not isinstance(x, DTensor):
        raise TypeError(f"{what}: x must be a DTensor when another argument is one (got "
                        f"{type(x).__name__}); make x a DTensor on the weight's mesh, or pass plain tensors")
    placements = list(x.placements)
    if any(p.is_partial() for p in placements):
        placements = [Replicate() if p.is_partial() else p for p in placements]
        x = x.redistribute(x.device_mesh, placements)
    return x, Layout.of(x, normalized)


def _wrap(local: torch.Tensor, x: Any, lay: Layout) -> Any:
    """``local`` as a DTensor of ``x``'s global shape and placements."""
    stride = tuple(math.prod(x.shape[i + 1:]) for i in range(x.dim()))
    return DTensor.from_local(local, lay.mesh, lay.placements, run_check=False, shape=x.shape, stride=stride)


def _local_like(t: Any, x: Any, lay: Layout, name: str) -> torch.Tensor | None:
    """A tensor of ``x``'s shape (the residual) as its local shard, on ``x``'s layout."""
    if t is None:
        return None
    if not isinstance(t, DTensor):
        raise TypeError(f"{name} must be a DTensor like x (got {type(t).__name__})")
    if t.device_mesh != lay.mesh or tuple(t.placements) != tuple(lay.placements):
        t = t.redistribute(lay.mesh, lay.placements)
    return t.to_local()  # type: ignore[no-any-return]


def _no_out(out: object, residual_out: object, what: str) -> None:
    if out is not None or residual_out is not None:
        raise TypeError(f"{what}: out= and residual_out= are not supported with DTensor inputs")


def normalize(x: Any, weight: Any, eps: float | None, options: dict[str, Any], out: Any, residual: Any,
              residual_out: Any) -> Any:
    """:func:`taskgraph_norm.normalize_sync` of a DTensor ``x``."""
    _no_out(out, residual_out, "normalize_sync")
    return _rms(x, weight, eps, options, residual, 1, False, "normalize_sync")


def rms_module(module: Any, x: Any, residual: Any) -> Any:
    """:class:`taskgraph_norm.RMSNorm`'s forward on a DTensor ``x``."""
    k = len(module.normalized_shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != module.normalized_shape:
        raise InputShapeError(module.normalized_shape, tuple(x.shape))  # torch's RuntimeError
    options = dict(module._options(), executor="auto")
    exact = module.weight_grad == "exact" and module.weight is not None
    return _rms(x, module.weight, module.eps, options, residual, k, exact, "RMSNorm")


def _rms(x: Any, weight: Any, eps: float | None, options: dict[str, Any], residual: Any, k: int, exact: bool,
         what: str) -> Any:
    x, lay = _layout(x, k, what)
    if lay.hidden is not None and k > 1:
        raise NotImplementedError("RMSNorm over several dims of a DTensor sharded on one of them: "
                                  "shard another dim, or normalise over one dim")
    x_local = x.to_local()
    r_local = _local_like(residual, x, lay, "residual")
    h = x_local if r_local is None else x_local + r_local  # elementwise: the fused add's bits
    w_local = local_param(weight, lay, exact and torch.is_grad_enabled())
    if lay.hidden is None and not exact:
        y = _flat_call(h, w_local, k, lambda a, b: _normalize_sync(a, b, eps, **options))
    else:
        if options["executor"] != "auto":
            raise ConfigError("executor", options["executor"], "'auto' with a DTensor sharded on the "
                              "normalised dim or weight_grad='exact'")
        config = (options["chunk_size"], options["topology"], options["leaf"], options["accumulate"],
                  options["casting_mode"], options["offset"])
        y = _flat_call(h, w_local, k, lambda a, b: ShardedNorm.run(a, b, eps, config, lay, exact))
    result = _wrap(y, x, lay)
    return result if residual is None else (result, _wrap(h, x, lay))


def _flat_call(x: torch.Tensor, w: torch.Tensor | None, k: int, call: Any) -> torch.Tensor:
    """``call(x, w)`` with the ``k`` normalised dims flattened into one (row-major)."""
    if k == 1:
        return call(x, w)  # type: ignore[no-any-return]
    hidden = math.prod(x.shape[x.dim() - k:])
    y = call(x.reshape(*x.shape[: x.dim() - k], hidden), None if w is None else w.reshape(hidden))
    return y.reshape(x.shape)  # type: ignore[no-any-return]


def layer_norm(x: Any, weight: Any, bias: Any, eps: float | None, options: dict[str, Any], out: Any,
               residual: Any, residual_out: Any) -> Any:
    """:func:`taskgraph_norm.layer_norm_sync` of a DTensor ``x``."""
    _no_out(out, residual_out, "layer_norm_sync")
    return _layer(x, weight, bias, eps, options, residual, 1)


def layer_module(module: Any, x: Any, residual: Any) -> Any:
    """:class:`taskgraph_norm.LayerNorm`'s forward on a DTensor ``x`` (several normalised dims)."""
    options = dict(topology=module.topology, chunk_size=module.chunk_size, leaf=module.leaf,
                   accumulate=module.accumulate)
    return _layer(x, module.weight, module.bias, module.eps, options, residual, len(module.normalized_shape))


def _layer(x: Any, weight: Any, bias: Any, eps: float | None, options: dict[str, Any], residual: Any,
           k: int) -> Any:
    x, lay = _layout(x, k, "layer_norm")
    if lay.hidden is not None and k > 1:
        raise NotImplementedError("LayerNorm over several dims of a DTensor sharded on one of them: "
                                  "shard another dim, or normalise over one dim")
    if lay.hidden is not None and options.get("executor", "auto") != "auto":
        raise ConfigError("executor", options["executor"], "'auto' with a DTensor sharded on the normalised dim")
    x_local = x.to_local()
    r_local = _local_like(residual, x, lay, "residual")
    h = x_local if r_local is None else x_local + r_local
    w_local, b_local = local_param(weight, lay, False), local_param(bias, lay, False)
    if lay.hidden is not None:  # the tensor-parallel LayerNorm of tgn.distributed
        config = (options["chunk_size"], options["topology"], options["leaf"], options["accumulate"])
        y = ShardedLayerNorm.run(h, w_local, b_local, eps, config, lay)
    elif k == 1:
        y = _layer_norm_sync(h, w_local, b_local, eps, **options)
    else:
        hidden = math.prod(h.shape[h.dim() - k:])
        flat = h.reshape(*h.shape[: h.dim() - k], hidden)
        y = _layer_norm_sync(flat, None if w_local is None else w_local.reshape(hidden),
                             None if b_local is None else b_local.reshape(hidden), eps, **options).reshape(h.shape)
    result = _wrap(y, x, lay)
    return result if residual is None else (result, _wrap(h, x, lay))


def _too_old(*_args: Any) -> Any:
    raise RuntimeError(f"DTensor inputs need torch >= {MIN_TORCH} (the public torch.distributed.tensor); "
                       f"this is torch {torch.__version__}: pass x.full_tensor() or x.to_local() instead")


def faces() -> dict[str, Callable[..., Any]]:
    """The faces' DTensor entry points by name (:data:`taskgraph_norm.ops.routing.DTENSOR_FACES`)."""
    found: dict[str, Callable[..., Any]] = dict(normalize=normalize, rms_module=rms_module, layer_norm=layer_norm,
                                                layer_module=layer_module)
    if DTensor is None:  # pragma: no cover  (torch 2.4: a private DTensor, no public module)
        return {name: _too_old for name in found}
    return found
