"""The public entry points: ``execute``, ``normalize`` and ``normalize_sync``.

``normalize`` is the core; ``normalize_sync`` is the same path without an event
loop: both check their input with :func:`check_input`, build (or fetch from the
cache) one graph per configuration, and call :func:`_run`.  The async versions
move work off the event-loop thread once an input is large enough to matter,
so awaiting them never stalls other tasks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, cast

import anyio
import anyio.to_thread
import torch

from . import kernels
from .errors import (
    ConfigError,
    DeviceMismatchError,
    DtypeError,
    InputRankError,
    InputShapeError,
    WeightShapeError,
)
from .executors import resolve_executor
from .graph import Graph, Op, validate
from .topologies import build_graph

__all__ = ["execute", "normalize", "normalize_sync", "check_input", "OFFLOAD_NUMEL"]

#: Inputs with at least this many elements are computed on a worker thread by the
#: async API; smaller ones run inline, where a thread hop would cost more than the work.
OFFLOAD_NUMEL = 1 << 15

_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# torch's own names in its "not implemented for 'Int'" messages.
_TORCH_TYPE_NAMES = {
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


def check_input(
    x: object, normalized_shape: Sequence[int], weight: object | None
) -> None:
    """Reject what ``torch.nn.functional.rms_norm`` rejects, with torch's error type.

    Raises
    ------
    TypeError
        ``x`` or ``weight`` is not a tensor.
    InputRankError (ValueError)
        ``x`` is 0-d.
    DtypeError (NotImplementedError)
        ``x`` is not fp32, fp64, fp16 or bf16 (integer, bool and complex inputs).
    InputShapeError (RuntimeError)
        ``x``'s trailing dims differ from ``normalized_shape``.
    WeightShapeError, DeviceMismatchError (RuntimeError)
        ``weight`` has the wrong shape or lives on another device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise InputRankError(1, 0)
    if x.dtype not in _SUPPORTED:
        raise DtypeError(_TORCH_TYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch.")))
    shape = tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise InputShapeError(shape, tuple(x.shape))
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if tuple(weight.shape) != shape:
        raise WeightShapeError(tuple(weight.shape), shape)
    if weight.device != x.device:
        raise DeviceMismatchError(weight.device, x.device)


def _resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    if eps is None:
        return kernels.default_eps(dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ConfigError("eps", eps, "a float or None")
    return float(eps)


def _check_out(out: torch.Tensor | None, x: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ConfigError(
            "out", f"tensor{list(out.shape)} {out.dtype} on {out.device}",
            f"a tensor of shape {list(x.shape)}, dtype {x.dtype} on {x.device}",
        )


def _run(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    executor: str,
    out: torch.Tensor | None = None,
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The one code path every API call ends in (input already checked)."""
    _, runner = resolve_executor(executor, graph)
    if "hidden_size" in graph.meta and x.numel() == 0:
        y = torch.empty_like(x)
    elif getattr(runner, "writes_out", False):  # e.g. compiled: writes into `out` itself
        written: torch.Tensor = runner(graph, x, weight, eps, out=out, **(options or {}))
        return written
    elif inspect.iscoroutinefunction(runner):  # an async executor, called from sync code
        y = anyio.run(functools.partial(runner, graph, x, weight, eps, **(options or {})))
    else:
        y = runner(graph, x, weight, eps, **(options or {}))
    if out is None:
        return y
    return out.copy_(y)


def _prepare_execute(
    graph: Graph, x: object, weight: object | None, eps: float | None
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a taskgraph_norm.Graph, got {type(graph).__name__}")
    validate(graph)
    hidden = graph.meta.get("hidden_size")
    if not isinstance(hidden, int) and any(n.op is Op.CALL for n in graph.nodes):
        # A general graph (docs/executor.md): x goes to its INPUT node as it is,
        # and its CALL functions check what they are given.
        return x, weight, eps  # type: ignore[return-value]
    if not isinstance(hidden, int):
        raise ConfigError("graph", graph, "a graph made by build_graph (meta has no hidden_size)")
    check_input(x, (hidden,), weight)
    x = cast(torch.Tensor, x)  # check_input has rejected everything else
    return x, weight if isinstance(weight, torch.Tensor) else None, _resolve_eps(eps, x.dtype)


async def _maybe_offload(fn: Any, x: torch.Tensor) -> torch.Tensor:
    y: torch.Tensor = await anyio.to_thread.run_sync(fn) if x.numel() >= OFFLOAD_NUMEL else fn()
    return y


async def _arun(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    executor: str,
    out: torch.Tensor | None = None,
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """:func:`_run` from async code: an async executor is awaited on the event
    loop (it manages its own workers); a sync one runs inline or on a thread."""
    _, runner = resolve_executor(executor, graph)
    if not inspect.iscoroutinefunction(runner) or ("hidden_size" in graph.meta and x.numel() == 0):
        return await _maybe_offload(lambda: _run(graph, x, weight, eps, executor, out, options), x)
    y = await runner(graph, x, weight, eps, **(options or {}))
    return y if out is None else out.copy_(y)


async def execute(
    graph: Graph,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    executor: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """Run ``graph`` on ``x`` (shape ``(..., D)``) and return the normalised tensor.

    ``executor`` is ``"auto"`` (the best this version has for the graph) or a
    name from :data:`taskgraph_norm.executors.EXECUTORS`.  ``options`` go to the
    executor (the reference executor takes ``arrival``, the arrival order of
    each race node; the concurrent one takes ``device``, ``max_workers``,
    ``schedule``, ``trace``, ``pool`` and ``functions``: see docs/executor.md).

    A general graph -- one with CALL nodes and no ``hidden_size`` in its meta --
    is run as it is: ``x`` is passed to its INPUT node unchecked.
    """
    x, w, e = _prepare_execute(graph, x, weight, eps)
    resolve_executor(executor, graph)  # fail before any thread hop
    return await _arun(graph, x, w, e, executor, None, options)


def _prepare_normalize(
    x: object,
    weight: object | None,
    eps: float | None,
    topology: str,
    chunk_size: int,
    leaf: str,
    accumulate: str,
    out: torch.Tensor | None,
) -> tuple[Graph | None, torch.Tensor, torch.Tensor | None, float]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise InputRankError(1, 0)
    hidden = x.shape[-1]
    # Parameters are checked even when D == 0, so a bad call fails on every input.
    graph_hidden = max(hidden, 1)
    graph = build_graph(
        graph_hidden, chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate
    )
    check_input(x, (hidden,), weight)
    _check_out(out, x)
    w = weight if isinstance(weight, torch.Tensor) else None
    return (graph if hidden > 0 else None), x, w, _resolve_eps(eps, x.dtype)


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
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim through a merge graph, from sync code.

    Same arguments and result as :func:`normalize`.
    """
    graph, x, w, e = _prepare_normalize(x, weight, eps, topology, chunk_size, leaf, accumulate, out)
    if graph is None:
        return _empty_result(x, out)
    return _run(graph, x, w, e, executor, out)


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
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim, computed through an explicit merge graph.

    ``y = x / sqrt(mean(x**2, -1) + eps) * weight`` where the sum of squares is
    reduced in the order the graph fixes (``topology``, ``chunk_size``, ``leaf``,
    ``accumulate``: see :func:`taskgraph_norm.build_graph`).  ``eps=None`` means
    what it means in ``torch.nn.functional.rms_norm``.  fp16/bf16 accumulate in
    fp32 and are cast back.  With ``out``, the result is written there and
    ``out`` is returned.  Large inputs are computed off the event-loop thread.

    Examples
    --------
    >>> import anyio, torch, taskgraph_norm as tgn
    >>> x = torch.ones(2, 8)
    >>> anyio.run(tgn.normalize, x)
    tensor([[1., 1., 1., 1., 1., 1., 1., 1.],
            [1., 1., 1., 1., 1., 1., 1., 1.]])
    """
    graph, x, w, e = _prepare_normalize(x, weight, eps, topology, chunk_size, leaf, accumulate, out)
    if graph is None:
        return _empty_result(x, out)
    resolve_executor(executor, graph)
    return await _arun(graph, x, w, e, executor, out)


def _empty_result(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """D == 0: torch returns an empty tensor of the input's shape; so do we."""
    return out if out is not None else torch.empty_like(x)
