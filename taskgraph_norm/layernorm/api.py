"""LayerNorm's functional faces: ``layer_norm_sync`` and ``await layer_norm``.

Each finds the cached :class:`~taskgraph_norm.pipeline.layer.LayerPipeline` of its
configuration and calls it; a call that records a gradient, or that a tracer looks at
(``torch.compile``, ``torch.export``), goes through the op
``taskgraph_norm::layer_norm`` instead (its kernel is the same pipeline: the same
bits); under a ``torch.func`` transform or with a forward-mode tangent, through
:class:`taskgraph_norm.ops.layer_func.FuncLayerNorm` (the op's kernel and backward with
``jvp`` and ``vmap`` rules).  Where a call goes is decided by
:func:`taskgraph_norm.ops.route`, as for RMSNorm.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels, ops
from ..checks import check_out, check_residual
from ..backends.native import face as _face
from ..pipeline import OFFLOAD_NUMEL
from ..pipeline import layer as _pipelines
from ..pipeline.layer import LayerPipeline, cached_layer, check_layer_executor, layer_pipeline
from ..pipeline.layer_checks import autocast_layer_inputs, check_layer_input, resolve_layer_eps
from ..ops.layer_func import layer_apply
from ..topologies import build_layer_graph

__all__ = ["layer_norm", "layer_norm_sync", "warm_layer"]

_route, _DIRECT = ops.route, ops.DIRECT  # (bound once: the warm path is a few us)


def warm_layer(x: object, weight: object, bias: object, eps: object, out: object, chunk_size: int, topology: str,
               leaf: str, accumulate: str, executor: str) -> torch.Tensor | None:
    """The warm path of a call with no residual: ``y`` from the cached pipeline's one C
    call (:attr:`LayerPipeline.routed`) when :func:`taskgraph_norm.ops.route` sends ``x``,
    the weight and the bias straight to the kernel and the pipeline is cached; else
    ``None`` (the caller runs the general path, with its checks and errors)."""
    if _route(x, weight, bias) != _DIRECT:  # type: ignore[arg-type]  # (another type: TRACED)
        return None  # (DIRECT: x, weight, bias plain tensors or None)
    shape = x.shape  # type: ignore[attr-defined]
    if not shape:
        return None
    pipe = cached_layer(shape[-1], chunk_size, topology, leaf, accumulate, executor)
    if pipe is None:
        return None
    y: torch.Tensor | None = pipe.routed(x, weight, bias, eps, out)
    return y


def layer_route(x: object, weight: object, bias: object, residual: object) -> int:
    """:func:`taskgraph_norm.ops.route` over every tensor of the call (the most demanding wins)."""
    if not isinstance(x, torch.Tensor):
        return ops.DIRECT  # (the checks raise the TypeError)
    how = ops.route(x, weight if isinstance(weight, torch.Tensor) else None,
                    bias if isinstance(bias, torch.Tensor) else None)
    if isinstance(residual, torch.Tensor):
        how = max(how, ops.route(residual, None))
    return how


def _pipe(x: torch.Tensor, topology: str, chunk_size: int, leaf: str, accumulate: str, executor: str,
          residual: bool) -> LayerPipeline:
    hidden = x.shape[-1] if x.dim() else 0
    return layer_pipeline(max(hidden, 1), chunk_size, topology, leaf, accumulate, executor, residual)


def _empty(x: torch.Tensor, weight: object, bias: object, eps: object, out: torch.Tensor | None,
           residual: torch.Tensor | None, residual_out: torch.Tensor | None) -> Any:
    """A 0-d ``x`` (torch's error) or a hidden size of 0 (an empty result, after the checks)."""
    check_layer_input(x, x.shape[-1] if x.dim() else 1, weight, bias)
    resolve_layer_eps(eps)
    check_out(out, x, x.dtype)
    y = out if out is not None else torch.empty_like(x)
    if residual is None and residual_out is None:
        return y
    check_residual(x, residual)
    if residual_out is not None:
        check_residual(x, residual_out, "residual_out")
    assert residual is not None
    return y, kernels.residual_add(x, residual, out=residual_out)


def _through_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: object, options: tuple[Any, ...],
    executor: str, out: torch.Tensor | None, residual: torch.Tensor | None, residual_out: torch.Tensor | None,
) -> Any:
    """A call autograd records, a tracer looks at or a ``torch.func`` transform or tangent
    reaches: the op, or :class:`~taskgraph_norm.ops.layer_func.FuncLayerNorm`
    (:func:`~taskgraph_norm.ops.layer_func.layer_apply`), with ``h = x + residual`` as a
    differentiable torch op first (the bits of the fused add)."""
    check_layer_executor(executor)
    hidden = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 1
    if not ops.jit_tracing():
        check_layer_input(x, hidden, weight, bias)
        if not torch.compiler.is_compiling():  # (dynamo does not trace the builder)
            chunk_size, topology, leaf, accumulate = options
            build_layer_graph(max(hidden, 1), chunk_size=chunk_size, topology=topology, leaf=leaf,
                              accumulate=accumulate)
    e = resolve_layer_eps(eps)
    h = x
    if residual is not None or residual_out is not None:
        check_residual(x, residual)
        assert residual is not None
        h = x + residual
    y = layer_apply(h, weight, bias, (e, *options))
    check_out(out, x, y.dtype)
    y = y if out is None else out.copy_(y)
    if residual is None:
        return y
    if residual_out is not None:
        check_residual(x, residual_out, "residual_out")
        h = residual_out.copy_(h)
    return y, h


def layer_norm_sync(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    executor: str = "auto",
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> Any:
    """LayerNorm of ``x`` over its last dim through a merge graph, from sync code.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the mean's and the
    variance's sums reduced in the order the graph fixes (``topology``, ``chunk_size``,
    ``leaf``, ``accumulate``: see :func:`taskgraph_norm.topologies.build_layer_graph`);
    two passes, never ``E[x^2] - E[x]^2``.  ``eps=None`` means ``F.layer_norm``'s 1e-5.
    fp16/bf16 inputs accumulate in fp32 and are cast back; the weight and bias are
    ``x``'s dtype, or fp32 for an fp16/bf16 ``x``, as ``F.layer_norm`` takes them.
    With ``residual`` (``x``'s shape and dtype) the call returns ``(y, h)``: ``h = x +
    residual`` in ``x``'s dtype (written into ``residual_out`` when given) and ``y`` the
    LayerNorm of ``h``.  ``executor``: ``"auto"``, ``"compiled"``, ``"reference"``,
    ``"triton"`` (float plans with pairwise leaves and a tree or left-fold merge, and
    exact plans; it says why it does not run the others) or ``"concurrent"`` (the
    graph's nodes on the concurrent executor's worker pool).

    Examples
    --------
    >>> import torch, taskgraph_norm as tgn
    >>> tgn.layer_norm_sync(torch.tensor([[1.0, 3.0]]))
    tensor([[-1.0000,  1.0000]])
    """
    if residual is None and residual_out is None:
        if out is None:
            # The warmest path: the checks and the kernel in one C call (backends/native/face.py;
            # None for anything else, and for a tracer).
            y = _face.layer_face(_pipelines.LAYER_PIPELINES, x, weight, bias, eps, chunk_size, topology, leaf,
                                 accumulate, executor)
            if y is not None:
                return y
        # The warm path: one dict lookup, the checks the C call needs, one C call.
        y = warm_layer(x, weight, bias, eps, out, chunk_size, topology, leaf, accumulate, executor)
        if y is not None:
            return y
    if isinstance(x, torch.Tensor):
        x, weight, bias = autocast_layer_inputs(x, weight, bias)
    how = layer_route(x, weight, bias, residual)
    if how != ops.DIRECT:
        face = ops.dtensor_face("layer_norm", x, weight, bias, residual)
        if face is not None:  # a DTensor: taskgraph_norm.distributed.dtensor
            options = dict(topology=topology, chunk_size=chunk_size, leaf=leaf, accumulate=accumulate,
                           executor=executor)
            return face(x, weight, bias, eps, options, out, residual, residual_out)
        return _through_op(x, weight, bias, eps, (chunk_size, topology, leaf, accumulate), executor, out,
                           residual, residual_out)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    pipe = _pipe(x, topology, chunk_size, leaf, accumulate, executor, residual is not None)
    if not x.dim() or x.shape[-1] == 0:
        return _empty(x, weight, bias, eps, out, residual, residual_out)
    if residual is None and residual_out is None:
        return pipe(x, weight, bias, eps, out)
    return pipe(x, weight, bias, eps, out, residual=residual, residual_out=residual_out)


async def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    executor: str = "auto",
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> Any:
    """:func:`layer_norm_sync` from async code (the same arguments and bits).  A large
    input is computed on a worker thread under the caller's grad and inference mode;
    cancelling the call stops that work between tiles.  A call that records a gradient
    (or is traced) runs inline through the op, as the sync face does."""
    if out is None and residual is None and residual_out is None:
        # a short call: the C face, inline (no thread hop)
        y = _face.layer_face(_pipelines.LAYER_PIPELINES, x, weight, bias, eps, chunk_size, topology, leaf, accumulate,
                             executor)
        if y is not None:
            return y
    if isinstance(x, torch.Tensor):
        x, weight, bias = autocast_layer_inputs(x, weight, bias)
    if layer_route(x, weight, bias, residual) != ops.DIRECT or not isinstance(x, torch.Tensor):
        return layer_norm_sync(x, weight, bias, eps, topology=topology, chunk_size=chunk_size, leaf=leaf,
                               accumulate=accumulate, executor=executor, out=out, residual=residual,
                               residual_out=residual_out)
    pipe = _pipe(x, topology, chunk_size, leaf, accumulate, executor, residual is not None)
    if not x.dim() or x.shape[-1] == 0:
        return _empty(x, weight, bias, eps, out, residual, residual_out)
    if residual is None and residual_out is None and x.numel() < OFFLOAD_NUMEL:
        y = pipe.routed(x, weight, bias, eps, out)  # a small call: the warm entry, inline (no thread hop)
        if y is not None:
            return y
    return await pipe.acall(x, weight, bias, eps, out, residual=residual, residual_out=residual_out)
