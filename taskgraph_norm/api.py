"""The public entry points: ``normalize``/``normalize_sync`` and ``execute``/``execute_sync``.

Each face finds its :class:`~taskgraph_norm.pipeline.Pipeline` (one cached object
per configuration: graph, proof, plan, executor) and calls it; the sync and async
faces share that one core (the pattern of httpx's ``Client``/``AsyncClient``).
The async faces run small inputs inline and move large ones to a worker thread,
so awaiting them never stalls other tasks, and cancelling them stops the work.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernels, ops, pipeline
from .backends.native import face as _face
from .checks import check_input, check_out
from .errors import ConfigError, InputRankError
from .executors import ASYNC_EXECUTORS
from .graph import Graph
from .pipeline import OFFLOAD_NUMEL
from .pipeline import cache as _cache
from .topologies import build_graph

__all__ = ["execute", "execute_sync", "find_pipeline", "normalize", "normalize_sync", "OFFLOAD_NUMEL"]


def find_pipeline(
    x: object, topology: str, chunk_size: int, leaf: str, accumulate: str, executor: str,
    weight: object | None, casting_mode: str, offset: float, residual: bool,
) -> pipeline.Pipeline | None:
    """The configuration's pipeline (every option checked, cached or not), or ``None``
    for a hidden size of 0 (an empty result, after the same checks)."""
    if isinstance(x, torch.Tensor) and x.dim():
        pipe = pipeline.cached(x.shape[-1], chunk_size, topology, leaf, accumulate, executor,
                               casting_mode, offset, residual)
        if pipe is not None:
            return pipe  # the warm path: one dict lookup
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise InputRankError(1, 0)
    hidden = x.shape[-1]
    if hidden == 0:
        # Parameters are checked even when D == 0, so a bad call fails on every input.
        build_graph(1, chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate,
                    casting_mode=casting_mode, offset=offset, residual=residual)
        pipeline.check_executor(executor)
        check_input(x, (0,), weight)
        return None
    return pipeline.for_config(hidden, chunk_size, topology, leaf, accumulate, executor,
                               casting_mode, offset, residual)


def _empty(x: torch.Tensor, weight: object | None, out: torch.Tensor | None, casting_mode: str,
           residual: torch.Tensor | None, residual_out: torch.Tensor | None) -> Any:
    """The result for a hidden size of 0 (no rows to normalise, nothing to add)."""
    dtype = kernels.output_dtype(x.dtype, weight.dtype if isinstance(weight, torch.Tensor) else None, casting_mode)
    check_out(out, x, dtype)
    y = out if out is not None else torch.empty_like(x, dtype=dtype)
    if residual is None:
        return y
    return y, kernels.residual_add(x, residual, out=residual_out)


_route, _DIRECT = ops.route, ops.DIRECT  # (bound once: normalize_sync's warm path is a few us)


def _how(x: object, weight: object | None, residual: object | None) -> int:
    """Where a call goes (:func:`taskgraph_norm.ops.route`), for the sync and async faces
    alike: through the ops when a gradient is recorded or a tracer looks (at ``x``, the
    weight or the residual), else straight to the pipeline."""
    if not isinstance(x, torch.Tensor):
        return ops.DIRECT  # (the pipeline raises the TypeError)
    how = ops.route(x, weight)  # type: ignore[arg-type]  # another type: TRACED, whose checks raise
    if how == ops.DIRECT and isinstance(residual, torch.Tensor):
        how = ops.route(residual, None)
    return how


def _traced(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, options: dict[str, Any],
    executor: str, out: torch.Tensor | None, residual: torch.Tensor | None, residual_out: torch.Tensor | None,
) -> Any:
    """A call a tracer looks at: the ``torch.library`` ops (their fake rules answer for shapes)."""
    pipeline.check_executor(executor)
    if residual is None:
        y = ops.rms_norm(x, weight, eps, **options)
        check_out(out, x, y.dtype)
        return y if out is None else out.copy_(y)
    y, h = ops.rms_norm_residual(x, residual, weight, eps, **options)
    check_out(out, x, y.dtype)
    check_out(residual_out, x, x.dtype)
    return (y if out is None else out.copy_(y)), (h if residual_out is None else residual_out.copy_(h))


def _recorded(
    pipe: pipeline.Pipeline, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None,
    out: torch.Tensor | None, residual: torch.Tensor | None, residual_out: torch.Tensor | None, how: int,
) -> Any:
    """A call whose gradient autograd records: the pipeline's checks, then its kernels
    under the ops' autograd (the same bits as the direct call)."""
    xc, w, e = pipe.check(x, weight, eps, out)
    assert pipe.options is not None  # (a normalize configuration's pipeline)
    if residual is None and residual_out is None and not pipe.residual:
        y = ops.call_checked(xc, w, e, *pipe.options, how=how)
        return y if out is None else out.copy_(y)
    r, h_out = pipe.check_residual(xc, residual, residual_out, fresh=False)
    y, h = ops.call_checked_residual(xc, r, w, e, *pipe.options)
    return (y if out is None else out.copy_(y)), (h if h_out is None else h_out.copy_(h))


def _gated(
    x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float | None,
    out: torch.Tensor | None, residual: torch.Tensor | None, residual_out: torch.Tensor | None,
    options: dict[str, Any],
) -> torch.Tensor:
    """A gated or grouped call (:func:`taskgraph_norm.ops.gated_rms_norm`), into ``out`` if given."""
    if residual is not None or residual_out is not None:
        raise ConfigError("residual", "a tensor", "None with a gate or groups (add the residual first)")
    if out is not None and ops.dtensor_face("gated", x, gate, weight) is not None:
        raise TypeError("normalize_sync: out= is not supported with DTensor inputs")
    y = ops.gated_rms_norm(x, gate, weight, eps, **options)
    check_out(out, x, y.dtype)
    return y if out is None else out.copy_(y)


def normalize_sync(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    executor: str = "auto",
    out: torch.Tensor | None = None,
    casting_mode: str = "torch",
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    norm_before_gate: bool = False,
    group_size: int | None = None,
) -> Any:
    """RMSNorm of ``x`` over its last dim through a merge graph, from sync code.

    Same arguments and result as :func:`normalize`.  Works from inside a running
    event loop too (an async executor then runs its loop on a helper thread).
    """
    if gate is not None or group_size is not None or norm_before_gate is not False:
        return _gated(x, gate, weight, eps, out, residual, residual_out, dict(
            group_size=group_size, norm_before_gate=norm_before_gate, topology=topology, chunk_size=chunk_size,
            leaf=leaf, accumulate=accumulate, casting_mode=casting_mode, offset=offset, executor=executor))
    if residual is None and residual_out is None:
        # The warmest path: the checks and the kernel in one C call, of any size
        # (backends/native/face.py; None for anything else, and for a tracer).
        y = _face.rms_face(_cache.PIPELINES, x, weight, eps, chunk_size, topology, leaf, accumulate, executor,
                           casting_mode, offset, out, True)
        if y is not None:
            return y
        how = _route(x, weight)
        if how == _DIRECT and x.dim():  # (DIRECT: x is a plain tensor)
            # The warm path: the cached pipeline from one dict lookup, then one kernel call.
            pipe = pipeline.cached(x.shape[-1], chunk_size, topology, leaf, accumulate, executor, casting_mode,
                                   offset)
            if pipe is not None:  # (found by x.shape[-1], as routed needs)
                y = pipe.routed(x, weight, eps, out)
                return pipe.general(x, weight, eps, out) if y is None else y
        elif not isinstance(x, torch.Tensor):
            how = _DIRECT  # (the pipeline raises the TypeError)
    else:
        how = _how(x, weight, residual)
    if how == ops.TRACED:
        options = dict(topology=topology, chunk_size=chunk_size, leaf=leaf, accumulate=accumulate,
                       casting_mode=casting_mode, offset=offset)
        face = ops.dtensor_face("normalize", x, weight, residual)
        if face is not None:  # a DTensor: taskgraph_norm.distributed.dtensor
            return face(x, weight, eps, dict(options, executor=executor), out, residual, residual_out)
        return _traced(x, weight, eps, options, executor, out, residual, residual_out)
    pipe = find_pipeline(x, topology, chunk_size, leaf, accumulate, executor, weight, casting_mode, offset,
                         residual is not None)
    if pipe is None:
        return _empty(x, weight, out, casting_mode, residual, residual_out)
    if how == ops.EAGER:
        return _recorded(pipe, x, weight, eps, out, residual, residual_out, how)
    if residual is None and residual_out is None:
        return pipe(x, weight, eps, out)
    return pipe(x, weight, eps, out, residual=residual, residual_out=residual_out)


async def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    topology: str = "tree",
    chunk_size: int = 64,
    leaf: str = "pairwise",
    accumulate: str = "float",
    executor: str = "auto",
    out: torch.Tensor | None = None,
    casting_mode: str = "torch",
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    norm_before_gate: bool = False,
    group_size: int | None = None,
) -> Any:
    """RMSNorm of ``x`` over its last dim, computed through an explicit merge graph.

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight`` where the sum of squares is
    reduced in the order the graph fixes (``topology``, ``chunk_size``, ``leaf``,
    ``accumulate``: see :func:`taskgraph_norm.build_graph`).  ``eps=None`` means
    what it means in ``torch.nn.functional.rms_norm``.  fp16/bf16 accumulate in
    fp32 and are cast back.  With ``out``, the result is written there and
    ``out`` is returned.  Large inputs are computed off the event-loop thread
    (under the caller's grad and inference mode); cancelling the call stops that
    work between tiles.  A call that records a gradient (or is traced) goes through
    the same ops as :func:`normalize_sync`'s, inline, with the same bits.

    ``casting_mode`` (``"torch"``, ``"llama"``, ``"gemma"``) and ``offset`` (added to
    the weight; no effect without one) follow Hugging Face's model families
    (:func:`taskgraph_norm.kernels.finalize`; ``"llama"`` with a weight returns the
    promoted dtype of the weight and ``x``).
    With ``residual`` (``x``'s shape and dtype) the call returns ``(y, h)``:
    ``h = x + residual`` rounded to ``x``'s dtype, and ``y`` the RMSNorm of ``h``
    (a fused residual add, one pass on the native kernels); ``out`` receives ``y``
    and ``residual_out`` receives ``h`` (it may be ``x`` or ``residual`` itself).

    Gated, grouped RMSNorm (Mamba2, Qwen3-Next and the hybrid families): ``gate``
    (``x``'s shape) multiplies by ``silu(gate)`` before the norm
    (``norm_before_gate=False``, Mamba2) or after the weight (``True``, Qwen3-Next);
    ``group_size`` normalises each group of that many values of the hidden dim on its
    own (:func:`taskgraph_norm.ops.gated_rms_norm`; not with ``residual``).

    Examples
    --------
    >>> import anyio, torch, taskgraph_norm as tgn
    >>> x = torch.ones(2, 8)
    >>> anyio.run(tgn.normalize, x)
    tensor([[1., 1., 1., 1., 1., 1., 1., 1.],
            [1., 1., 1., 1., 1., 1., 1., 1.]])
    """
    gated = gate is not None or group_size is not None or norm_before_gate is not False
    if residual is None and residual_out is None and not gated:
        # a short call: the C face, inline (as the small calls below: no thread hop)
        y = _face.rms_face(_cache.PIPELINES, x, weight, eps, chunk_size, topology, leaf, accumulate, executor,
                           casting_mode, offset, out, False)
        if y is not None:
            return y
    how = _how(x, weight, residual)
    if how != ops.DIRECT or gated:
        # autograd records on the caller's thread (and a tracer looks there): inline
        return normalize_sync(x, weight, eps, topology=topology, chunk_size=chunk_size, leaf=leaf,
                              accumulate=accumulate, executor=executor, out=out, casting_mode=casting_mode,
                              offset=offset, residual=residual, residual_out=residual_out, gate=gate,
                              norm_before_gate=norm_before_gate, group_size=group_size)
    pipe = find_pipeline(x, topology, chunk_size, leaf, accumulate, executor, weight, casting_mode, offset,
                         residual is not None)
    if pipe is None:
        return _empty(x, weight, out, casting_mode, residual, residual_out)
    if residual is None and residual_out is None and x.numel() < OFFLOAD_NUMEL and pipe.executor not in (
            ASYNC_EXECUTORS):
        return pipe(x, weight, eps, out)  # a small call: inline, no thread hop
    return await pipe.acall(x, weight, eps, out, residual=residual, residual_out=residual_out)


async def execute(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    executor: str = "auto",
    **options: Any,
) -> Any:
    """Run ``graph`` on ``x`` (shape ``(..., D)``) and return the normalised tensor.

    ``executor`` is ``"auto"`` (the best this version has for the graph) or a
    name from :data:`taskgraph_norm.executors.EXECUTORS`.  ``options`` go to the
    executor (the reference executor takes ``arrival``, the arrival order of
    each race node; the concurrent one takes ``device``, ``max_workers``,
    ``schedule``, ``trace``, ``pool`` and ``functions``; the compiled one
    ``tile_rows`` and ``threads``: see docs/executor.md).

    A general graph -- one with CALL nodes and no ``hidden_size`` in its meta --
    is run as it is: ``x`` is passed to its INPUT node unchecked.  A graph built
    with ``residual=True`` takes ``residual=`` (and optionally ``residual_out=``)
    and returns ``(y, h)``, as :func:`normalize` does.
    """
    return await pipeline.for_graph(graph, executor).acall(x, weight, eps, None, **options)


def execute_sync(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    executor: str = "auto",
    **options: Any,
) -> Any:
    """:func:`execute` from sync code (also from inside a running event loop)."""
    return pipeline.for_graph(graph, executor)(x, weight, eps, None, **options)

