"""LayerNorm's pipeline: :func:`build_layer_graph` → prove → lower → a backend, cached per
configuration (hidden size, chunk size, topology, leaf, accumulate, executor, residual).

The same route as RMSNorm's :class:`~taskgraph_norm.pipeline.Pipeline`: the backend is
chosen once per (device, dtype) by :func:`taskgraph_norm.backends.choose` over this
context's allowed backends (the torch-ops backend and native C run ``Plan(norm="layer")``;
Triton runs float and exact ones, and says why it does not run the others).  A graph
that does not lower (a float race over three or more chunks, ``"standard"``) runs on
the reference executor; ``executor="concurrent"`` runs the graph's nodes on the
concurrent executor's worker pool.
Every LayerNorm face (``tgn.layer_norm``, ``tgn.layer_norm_sync``, ``tgn.LayerNorm``,
the ops) calls :meth:`LayerPipeline.forward` and :meth:`LayerPipeline.backward`.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import anyio
import anyio.to_thread
import torch

from .. import caches, kernels, torch_state
from ..backends.base import Backend, LayerForward, allowed, triton_asked
from ..backends.registry import BACKENDS, choose
from ..backends.torch_ops.layer import graph_layer_backward, graph_layer_stats
from ..checks import check_no_partial_overlap, check_real, check_residual
from ..errors import ConfigError, ExecutionError, GraphError
from ..executors import PLAN_EXECUTORS
from ..executors.concurrent.executor import run_concurrent
from ..executors.concurrent.loops import run_coroutine_sync
from ..graph import Graph, gc_paused
from ..kernels.reference import run_reference
from ..lowering import Plan, lower_certified
from ..prover import Proof, prove
from ..topologies import build_layer_graph
from .layer_checks import check_layer_input, check_layer_out, resolve_layer_eps

__all__ = ["LAYER_EXECUTORS", "LAYER_PIPELINES", "LayerPipeline", "cached_layer", "check_layer_executor",
           "layer_pipeline"]

#: The executors a LayerNorm pipeline runs on.
LAYER_EXECUTORS = ("auto", "reference", "compiled", "triton", "concurrent")

#: Inputs with at least this many elements are computed on a worker thread by the async face.
OFFLOAD_NUMEL = 1 << 15


def check_layer_executor(executor: object) -> None:
    """``executor`` must be one of :data:`LAYER_EXECUTORS`."""
    if not isinstance(executor, str) or executor not in LAYER_EXECUTORS:
        raise ConfigError("executor", executor, " or ".join(repr(e) for e in LAYER_EXECUTORS))


class LayerPipeline:
    """One LayerNorm configuration, built once: ``graph``, ``proof``, ``plan``, ``executor``.

    ``executor`` is the name actually run: ``"compiled"`` (the plan on a backend) or
    ``"reference"`` (the graph node by node) for ``"auto"``; ``"triton"`` asks the
    Triton backend alone (a plan it does not run is a ``NoBackendError``);
    ``"concurrent"`` runs the graph on the concurrent executor (no plan: the backward
    follows the graph, as the reference's does).
    """

    __slots__ = ("graph", "executor", "plan", "hidden_size", "residual", "options", "_proof", "_backends", "routed",
                 "face")

    def __init__(self, graph: Graph, executor: str = "auto") -> None:
        check_layer_executor(executor)
        if graph.meta.get("norm") != "layer":
            raise ConfigError("graph", graph, "a LayerNorm graph (build_layer_graph)")
        self.graph = graph
        hidden = graph.meta["hidden_size"]
        assert isinstance(hidden, int)
        self.hidden_size: int = hidden
        self.residual = bool(graph.meta.get("residual", False))
        meta = graph.meta
        #: ``(chunk_size, topology, leaf, accumulate)``: the ops' configuration arguments.
        self.options: tuple[Any, ...] = (meta["chunk_size"], meta["topology"], meta["leaf"], meta["accumulate"])
        self._proof: Proof | None = None
        self.plan: Plan | None = None
        if executor == "auto":
            executor = "compiled"
            try:
                self.plan = lower_certified(graph, self.proof)
            except (ExecutionError, GraphError):
                executor = "reference"
        elif executor in PLAN_EXECUTORS:
            self.plan = lower_certified(graph, self.proof)
        self.executor = executor
        self._backends: dict[tuple[Any, ...], Backend] = {}
        #: ``routed(x, weight, bias, eps, out) -> y | None``: the faces' warm entry for a
        #: call :func:`taskgraph_norm.ops.route` sent straight to the kernel, on this
        #: pipeline found by ``x.shape[-1]`` (:mod:`taskgraph_norm.backends.native.layer_direct`:
        #: one C call, or ``None`` for anything unusual: then the general path runs).
        self.routed: Any = self._routed_first if executor == "compiled" and not self.residual else _not_taken
        #: The native entry's packed plan for the C face (backends/native/face.py, which
        #: finds this pipeline in :data:`LAYER_PIPELINES`), once :attr:`routed` is known.
        self.face: bytes | None = None

    def _routed_first(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: object,
                      out: object) -> torch.Tensor | None:
        """:attr:`routed` until the native entry is known (asked again while a context
        without native C is in force)."""
        if "native" not in allowed():
            return None
        assert self.plan is not None
        found = BACKENDS["native"].layer_direct(self.plan)  # type: ignore[attr-defined]
        self.routed = _not_taken if found is None else found
        self.face = getattr(found, "face", None)
        return self.routed(x, weight, bias, eps, out)  # type: ignore[no-any-return]

    @property
    def proof(self) -> Proof:
        """The graph's proof (made on first use)."""
        if self._proof is None:
            self._proof = prove(self.graph)
        return self._proof

    def __repr__(self) -> str:
        return (f"LayerPipeline(graph={len(self.graph)} nodes, hidden_size={self.hidden_size}, "
                f"executor={self.executor!r}, proof={self.proof.summary!r})")

    def backend(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """The backend that runs the plan on ``device`` for ``dtype`` input, chosen once per
        (device type, dtype, allowed backends); ``NoBackendError`` lists every backend's
        reasons when none does."""
        if self.plan is None:
            raise ExecutionError(f"this pipeline runs its graph on the {self.executor} executor, not a backend")
        names = allowed()
        key = (device.type, dtype, names, triton_asked())
        found = self._backends.get(key)
        if found is None:
            by_name = self.executor == "triton"
            found = self._backends[key] = choose(self.plan, device, dtype, ("triton",) if by_name else names,
                                                 by_name=by_name)
        return found

    # -- checks ---------------------------------------------------------------------

    def check(
        self, x: object, weight: object | None, bias: object | None, eps: object, out: object | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
        """Reject what ``F.layer_norm`` rejects; ``(x, weight, bias, eps)`` with ``eps`` resolved."""
        check_layer_input(x, self.hidden_size, weight, bias)
        assert isinstance(x, torch.Tensor)
        w = weight if isinstance(weight, torch.Tensor) else None
        b = bias if isinstance(bias, torch.Tensor) else None
        check_layer_out(out, x, w, b)
        return x, w, b, resolve_layer_eps(eps)

    def check_residual(
        self, x: torch.Tensor, residual: object, residual_out: object, fresh: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(residual, h)``: the residual (and ``residual_out``) of ``x``'s shape, dtype and
        device; ``h`` is ``residual_out``, else a fresh tensor (``None`` with ``fresh=False``)."""
        if not self.residual:
            raise ConfigError("residual", "a tensor", "None: this pipeline's graph adds no residual")
        check_residual(x, residual)
        assert isinstance(residual, torch.Tensor)
        h: torch.Tensor | None = torch.empty_like(x) if fresh else None
        if residual_out is not None:
            check_residual(x, residual_out, "residual_out")
            assert isinstance(residual_out, torch.Tensor)
            h = residual_out
        if h is not None:
            check_no_partial_overlap(h, x, residual)
        return residual, h

    # -- the core -------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
        out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, stats: bool = False, cancel: threading.Event | None = None,
    ) -> LayerForward:
        """``y`` of a checked ``x`` (``eps`` resolved) and, with ``stats``, each row's ``mean``
        and ``den`` (``(..., 1)``, the accumulation dtype), on this pipeline's backend (a
        graph with no plan: the reference executor)."""
        check_real(x)
        if x.numel() == 0:
            if residual is not None:
                kernels.residual_add(x, residual, out=residual_out)
            y = out if out is not None else torch.empty_like(x)
            acc = kernels.accumulation_dtype(x.dtype)
            empty = x.new_empty((*x.shape[:-1], 1), dtype=acc) if stats else None
            return LayerForward(y, empty, None if empty is None else empty.clone())
        if self.plan is not None:
            backend = self.backend(x.device, x.dtype)
            return backend.layer_forward(self.graph, self.plan, x, weight, bias, eps, out=out, residual=residual,
                                         residual_out=residual_out, stats=stats, cancel=cancel)
        if self.executor == "concurrent":  # the graph's nodes on the worker pool, as they become ready
            y = run_coroutine_sync(functools.partial(run_concurrent, self.graph, x, weight, eps, residual=residual,
                                                     residual_out=residual_out, bias=bias))
        else:
            y = run_reference(self.graph, x, weight, eps, cancel=cancel, residual=residual,
                              residual_out=residual_out, bias=bias)
        if out is not None:
            y = out.copy_(y)
        if not stats:
            return LayerForward(y, None, None)
        mean, den = graph_layer_stats(self.graph, x if residual_out is None else residual_out, eps)
        return LayerForward(y, mean, den)

    def backward(
        self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, den: torch.Tensor,
        *, input_grad: bool, weight_grad: bool, bias_grad: bool, weight_dtype: torch.dtype | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dx, dW, db)`` of 2-D ``dy`` and ``x`` with ``(rows, 1)`` ``mean`` and ``den``
        (``None`` where not asked): ``dx`` through the forward's merge order, ``dW`` and
        ``db`` over fixed row blocks."""
        kwargs = dict(input_grad=input_grad, weight_grad=weight_grad, bias_grad=bias_grad,
                      weight_dtype=weight_dtype, bias_dtype=bias_dtype)
        if self.plan is None:
            return graph_layer_backward(self.graph, dy, x, weight, mean, den, **kwargs)  # type: ignore[arg-type]
        return self.backend(x.device, x.dtype).layer_backward(self.plan, dy, x, weight, mean, den,
                                                               **kwargs)  # type: ignore[arg-type]

    def __call__(
        self, x: object, weight: object | None = None, bias: object | None = None, eps: object = None,
        out: object | None = None, *, residual: object | None = None, residual_out: object | None = None,
        cancel: threading.Event | None = None,
    ) -> Any:
        """``y`` for ``x`` (``(..., hidden_size)``), checked like ``F.layer_norm``; ``(y, h)``
        for a residual pipeline (``h = x + residual``, written into ``residual_out``)."""
        xc, w, b, e = self.check(x, weight, bias, eps, out)
        o = out if isinstance(out, torch.Tensor) else None
        if not self.residual:
            if residual is not None or residual_out is not None:
                raise ConfigError("residual", "a tensor", "None: this pipeline's graph adds no residual")
            return self.forward(xc, w, b, e, out=o, cancel=cancel).y
        r, h = self.check_residual(xc, residual, residual_out)
        return self.forward(xc, w, b, e, out=o, residual=r, residual_out=h, cancel=cancel).y, h

    async def acall(
        self, x: object, weight: object | None = None, bias: object | None = None, eps: object = None,
        out: object | None = None, *, residual: object | None = None, residual_out: object | None = None,
    ) -> Any:
        """:meth:`__call__` from async code: inline for a small input, on a worker thread
        (under the caller's grad and inference mode) for a large one, stopped between
        tiles when the caller is cancelled."""
        if not isinstance(x, torch.Tensor) or x.numel() < OFFLOAD_NUMEL:
            return self(x, weight, bias, eps, out, residual=residual, residual_out=residual_out)
        self.check(x, weight, bias, eps, out)  # (raise on the caller's thread)
        cancel = threading.Event()
        state = torch_state.capture()
        call = functools.partial(self.__call__, x, weight, bias, eps, out, residual=residual,
                                 residual_out=residual_out, cancel=cancel)
        try:
            return await anyio.to_thread.run_sync(functools.partial(state.run, call), abandon_on_cancel=True)
        finally:
            cancel.set()


def _not_taken(*args: object) -> None:
    """:attr:`LayerPipeline.routed` of a pipeline with no native entry."""
    return None


# --- the cache ---------------------------------------------------------------------------

_lock = threading.Lock()
#: (hidden, chunk_size, topology, leaf, accumulate, executor, residual) -> pipeline; the
#: C face (backends/native/face.py) looks a call's pipeline up here too.
LAYER_PIPELINES: dict[tuple[Any, ...], LayerPipeline] = {}
CACHE_SIZE = 256


@caches.register
def _clear() -> None:
    with _lock:
        LAYER_PIPELINES.clear()


def cached_layer(
    hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str, executor: str,
) -> LayerPipeline | None:
    """The configuration's pipeline (no residual) if one is cached, else ``None``: the
    faces' warm path, one dict lookup (an unhashable option, or a chunk size that only
    compares equal to an int, is never cached: ``None``)."""
    if type(chunk_size) is not int:
        return None
    try:
        return LAYER_PIPELINES.get((hidden_size, chunk_size, topology, leaf, accumulate, executor, False))
    except TypeError:
        return None


def layer_pipeline(
    hidden_size: int, chunk_size: int = 64, topology: str = "tree", leaf: str = "pairwise",
    accumulate: str = "float", executor: str = "auto", residual: bool = False,
) -> LayerPipeline:
    """The pipeline of one LayerNorm configuration (cached; every option checked when
    it is built: the builder's ``ConfigError``, the executor's)."""
    key = (hidden_size, chunk_size, topology, leaf, accumulate, executor, residual)
    if type(chunk_size) is int:
        try:
            found = LAYER_PIPELINES.get(key)
        except TypeError:
            found = None
        if found is not None:
            return found
    check_layer_executor(executor)
    with gc_paused():
        graph = build_layer_graph(hidden_size, chunk_size=chunk_size, topology=topology, leaf=leaf,
                                  accumulate=accumulate, residual=residual)
        pipe = LayerPipeline(graph, executor)
    if type(chunk_size) is not int:
        return pipe
    with _lock:
        pipe = LAYER_PIPELINES.setdefault(key, pipe)
        while len(LAYER_PIPELINES) > CACHE_SIZE:
            LAYER_PIPELINES.pop(next(iter(LAYER_PIPELINES)))
    return pipe

