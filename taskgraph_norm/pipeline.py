"""The pipeline: build → prove → lower → run, one cached object per configuration.

A :class:`Pipeline` is to a graph what ``torch.fx.GraphModule`` is to an fx graph:
the graph is the program, the pipeline is the thing you call.  It holds the graph,
its proof, the lowered plan and the executor chosen for it, all made once; a warm
call checks its input and makes one kernel call.  ``normalize``, ``normalize_sync``,
``execute``, ``execute_sync`` and ``RMSNorm`` all call through it
(:mod:`taskgraph_norm.api` is their faces).

Two caches hold pipelines: one per normalize configuration (hidden size, chunk
size, topology, leaf, accumulate, executor) and one per (graph, executor) for
``execute``.  Both are bounded and emptied by :func:`taskgraph_norm.clear_caches`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any, overload

import anyio
import anyio.to_thread
import torch

from . import caches, kernels
from .checks import check_input, check_out, check_real, resolve_eps
from .errors import ConfigError, DeviceMismatchError, ExecutionError, GraphError
from .backends import direct_call
from .backends import triton as _triton
from .backends.native.direct import DirectCall
from .executors import ASYNC_EXECUTORS, EXECUTORS, PLAN_EXECUTORS
from .executors.concurrent.loops import run_coroutine_sync
from .graph import Graph, Op, validate
from .graph.nodes import gc_paused
from .lowering import Plan, lower_certified
from .prover import Proof, prove
from .topologies import build_graph

__all__ = ["OFFLOAD_NUMEL", "Pipeline", "cached", "for_config", "for_graph", "run_coroutine_sync"]

#: Inputs with at least this many elements are computed on a worker thread by the
#: async faces; smaller ones run inline, where a thread hop would cost more than the work.
OFFLOAD_NUMEL = 1 << 15

#: How many pipelines each cache keeps (the oldest goes first).
CACHE_SIZE = 256

#: The options ``auto`` hands the triton executor on a CUDA tensor (any other runs the compiled one).
_TRITON_OPTIONS = frozenset({"residual", "residual_out"})

_DEFAULT_EPS = {dt: torch.finfo(torch.float32 if dt in (torch.float16, torch.bfloat16) else dt).eps
                for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


class Pipeline:
    """One configuration, built once: ``graph``, ``proof``, ``plan`` and ``executor``.

    ``executor`` is the name actually run (``"auto"`` resolved: ``concurrent`` for
    a general graph with CALL nodes, ``compiled`` for a certified graph that lowers,
    else ``reference``).  Calling it::

        pipe = Pipeline(tgn.build_graph(4096))
        y = pipe(x, weight)            # sync, input checked like F.rms_norm
        y = await pipe.acall(x, weight)

    Raises ConfigError for an unknown executor name, ExecutionError when
    ``executor="compiled"`` is asked of a graph the prover does not certify.
    """

    __slots__ = ("graph", "executor", "plan", "hidden_size", "_proof", "_runner", "_direct", "_direct_known",
                 "_triton", "casting_mode", "offset", "residual")

    def __init__(self, graph: Graph, executor: str = "auto") -> None:
        if not isinstance(graph, Graph):
            raise TypeError(f"graph must be a taskgraph_norm.Graph, got {type(graph).__name__}")
        if executor != "auto" and executor not in EXECUTORS:
            raise ConfigError("executor", executor, "'auto' or one of " + ", ".join(repr(k) for k in EXECUTORS))
        validate(graph)
        self.graph = graph
        hidden = graph.meta.get("hidden_size")
        self.hidden_size: int | None = hidden if isinstance(hidden, int) else None
        if self.hidden_size is None and Op.CALL not in graph.ops:
            raise ConfigError("graph", graph, "a graph made by build_graph (meta has no hidden_size)")
        self._proof: Proof | None = None
        self.plan: Plan | None = None
        if executor == "auto":
            executor = "concurrent" if Op.CALL in graph.ops else "compiled"
            if executor == "compiled":
                try:
                    self.plan = lower_certified(graph, self.proof)
                except (ExecutionError, GraphError):
                    executor = "reference"
        elif executor in PLAN_EXECUTORS:
            self.plan = lower_certified(graph, self.proof)
        self.casting_mode, self.offset, self.residual = _semantics(graph)
        self.executor = executor
        self._runner = EXECUTORS[executor]
        # auto on a CUDA tensor: the Triton kernels, where triton is installed and
        # the plan is one they run; the compiled executor's torch ops otherwise.
        self._triton = (executor == "compiled" and self.plan is not None
                        and _triton.available() and _triton.supports(self.plan))
        self._direct: DirectCall | None = None
        self._direct_known = self.plan is None or executor != "compiled"  # triton runs its kernels

    @property
    def proof(self) -> Proof:
        """The graph's proof (made on first use; the witness of a refutation is
        searched only when ``proof.witness`` is read)."""
        if self._proof is None:
            self._proof = prove(self.graph)
        return self._proof

    def __repr__(self) -> str:
        return (f"Pipeline(graph={len(self.graph)} nodes, hidden_size={self.hidden_size}, "
                f"executor={self.executor!r}, proof={self.proof.summary!r})")

    # -- the sync core ------------------------------------------------------------

    @overload
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: None = None, residual_out: None = None, **options: Any,
    ) -> torch.Tensor: ...

    @overload
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor, residual_out: torch.Tensor | None = None,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, **options: Any,
    ) -> Any: ...

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, **options: Any,
    ) -> Any:
        """``y`` for ``x`` (shape ``(..., hidden_size)``), checked like ``F.rms_norm``;
        ``(y, h)`` for a residual graph (``h = x + residual``, written into
        ``residual_out`` when given)."""
        if self.residual or residual is not None or residual_out is not None:
            return self._call_residual(x, weight, eps, out, residual, residual_out, options)
        if not options:
            direct = self._direct if self._direct_known else self._resolve_direct()
            if direct is not None and isinstance(x, torch.Tensor):
                y = self._try_direct(direct, x, weight, eps, out)
                if y is not None:
                    return y
        x, weight, e = self.check(x, weight, eps, out)
        return self.run(x, weight, e, out, options)

    def _try_direct(
        self, direct: DirectCall, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor | None:
        # The checks of check_input/check_out that the direct path needs, inline: the
        # direct kernel takes only fp32 CPU tensors, so any other input falls through
        # to the full checks, which raise torch's errors.
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            return None
        # (devices: the direct call takes CPU tensors only, and says so)
        if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1
                                   or weight.shape[0] != self.hidden_size):
            return None
        if out is not None and (not isinstance(out, torch.Tensor) or out.shape != x.shape
                                or out.dtype != x.dtype):
            return None
        if eps is None:
            e = _DEFAULT_EPS.get(x.dtype)
            if e is None:
                return None
        elif type(eps) is float:
            e = eps
        else:
            return None
        return direct(x, weight, e, out, None, None)

    def _call_residual(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, out: torch.Tensor | None,
        residual: torch.Tensor | None, residual_out: torch.Tensor | None, options: Mapping[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight, e = self.check(x, weight, eps, out)
        r, h = self.check_residual(x, residual, residual_out)
        if not options:
            direct = self._direct if self._direct_known else self._resolve_direct()
            if direct is not None:
                y = direct(x, weight, e, out, r, h)
                if y is not None:
                    return y, h
        return self.run(x, weight, e, out, {**options, "residual": r, "residual_out": h}), h

    def check_residual(
        self, x: torch.Tensor, residual: object, residual_out: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(residual, h)`` for a residual graph: the residual must have ``x``'s
        shape, dtype and device (as must ``residual_out``, which may be ``x`` or the
        residual itself); ``h`` is ``residual_out`` or a fresh tensor."""
        if not self.residual:
            raise ConfigError("residual", "a tensor", "None: this pipeline's graph adds no residual "
                              "(build it with residual=True)")
        checked = []
        for name, t in (("residual", residual), ("residual_out", residual_out)):
            if t is None and name == "residual_out":
                checked.append(torch.empty_like(x))
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != x.device:
                raise DeviceMismatchError(t.device, x.device)
            if t.shape != x.shape or t.dtype != x.dtype:
                raise ConfigError(name, f"tensor{list(t.shape)} {t.dtype}",
                                  f"a tensor of x's shape {list(x.shape)} and dtype {x.dtype}")
            checked.append(t)
        return checked[0], checked[1]

    def direct(self) -> DirectCall | None:
        """This configuration's direct native kernel (:func:`backends.direct_call`), or
        ``None`` where there is none (no native form, not built, switched off)."""
        return self._direct if self._direct_known else self._resolve_direct()

    def _resolve_direct(self) -> DirectCall | None:
        from .backends.native import loader as native

        if not native.enabled():
            return None  # native.disabled() is in force: ask again on a later call
        assert self.plan is not None
        self._direct = direct_call(self.plan)
        self._direct_known = True
        return self._direct

    def check(
        self, x: object, weight: object | None, eps: float | None, out: object | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Reject what ``F.rms_norm`` rejects; returns ``(x, weight, eps)`` with ``eps``
        resolved.  A general graph's input goes to its INPUT node unchecked."""
        if self.hidden_size is None:
            return x, weight, eps  # type: ignore[return-value]
        check_input(x, (self.hidden_size,), weight)
        assert isinstance(x, torch.Tensor)
        w = weight if isinstance(weight, torch.Tensor) else None
        if w is None and self.offset:
            raise ConfigError("offset", self.offset, "0.0 without a weight (the offset is added to the weight)")
        check_out(out, x, kernels.output_dtype(x.dtype, None if w is None else w.dtype, self.casting_mode))
        return x, w, resolve_eps(eps, x.dtype)

    def run(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, out: torch.Tensor | None = None,
        options: Mapping[str, Any] | None = None, cancel: threading.Event | None = None,
    ) -> torch.Tensor:
        """The one code path every call ends in (input already checked, ``eps`` resolved)."""
        opts = dict(options or {})
        if self.hidden_size is not None:
            check_real(x)  # a tracer's tensor never reaches a kernel or a workspace cache
        if self.hidden_size is not None and x.numel() == 0:
            if "residual" in opts:
                kernels.residual_add(x, opts["residual"], out=opts["residual_out"])
            return out if out is not None else torch.empty_like(x, dtype=kernels.output_dtype(
                x.dtype, None if weight is None else weight.dtype, self.casting_mode))
        if self.executor == "compiled":
            if self._triton and x.is_cuda and x.dtype != torch.float64 and opts.keys() <= _TRITON_OPTIONS:
                on_device: torch.Tensor = EXECUTORS["triton"](self.graph, x, weight, eps, plan=self.plan, out=out,
                                                              **opts)
                return on_device
            written: torch.Tensor = self._runner(self.graph, x, weight, eps, plan=self.plan, out=out,
                                                 cancel=cancel, **opts)
            return written
        if self.executor == "triton":
            launched: torch.Tensor = self._runner(self.graph, x, weight, eps, plan=self.plan, out=out, **opts)
            return launched
        if self.executor in ASYNC_EXECUTORS:
            y = run_coroutine_sync(functools.partial(self._runner, self.graph, x, weight, eps, **opts))
        elif self.executor == "reference":
            y = self._runner(self.graph, x, weight, eps, cancel=cancel, **opts)
        else:
            y = self._runner(self.graph, x, weight, eps, **opts)
        return y if out is None else out.copy_(y)

    # -- the async face -----------------------------------------------------------

    async def acall(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None,
        out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None,
        residual_out: torch.Tensor | None = None, **options: Any,
    ) -> Any:
        """:meth:`__call__` from async code.  An async executor is awaited on the event
        loop; a sync one runs inline for a small input and on a worker thread for a
        large one, stopped between tiles (or nodes) when the caller is cancelled."""
        if (self.executor not in ASYNC_EXECUTORS and isinstance(x, torch.Tensor)
                and x.numel() < OFFLOAD_NUMEL):
            return self(x, weight, eps, out, residual=residual, residual_out=residual_out, **options)
        x, weight, e = self.check(x, weight, eps, out)
        if self.residual or residual is not None or residual_out is not None:
            r, h = self.check_residual(x, residual, residual_out)
            options = {**options, "residual": r, "residual_out": h}
            y = await self._arun(x, weight, e, out, options)
            return y, h
        return await self._arun(x, weight, e, out, options)

    async def _arun(
        self, x: torch.Tensor, weight: torch.Tensor | None, e: float, out: torch.Tensor | None,
        options: Mapping[str, Any],
    ) -> torch.Tensor:
        if self.executor in ASYNC_EXECUTORS and not (self.hidden_size is not None and x.numel() == 0):
            y: torch.Tensor = await self._runner(self.graph, x, weight, e, **options)
            return y if out is None else out.copy_(y)
        cancel = threading.Event()
        try:
            result: torch.Tensor = await anyio.to_thread.run_sync(
                functools.partial(self.run, x, weight, e, out, options, cancel), abandon_on_cancel=True,
            )
        finally:
            cancel.set()  # a cancelled caller's thread stops before its next tile
        return result


# --- the caches ----------------------------------------------------------------------

_lock = threading.Lock()
_by_config: dict[tuple[Any, ...], Pipeline] = {}
_by_graph: dict[tuple[Graph, str], Pipeline] = {}


def _store(cache: dict[Any, Pipeline], key: Any, pipe: Pipeline) -> Pipeline:
    with _lock:
        pipe = cache.setdefault(key, pipe)
        while len(cache) > CACHE_SIZE:
            cache.pop(next(iter(cache)))
    return pipe


@caches.register
def _clear() -> None:
    with _lock:
        _by_config.clear()
        _by_graph.clear()


def cached(
    hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str, executor: str,
    casting_mode: str = "torch", offset: float = 0.0, residual: bool = False,
) -> Pipeline | None:
    """The configuration's pipeline if one is cached, else ``None``: the faces' warm
    path, one dict lookup (an unhashable option is never cached: ``None``)."""
    try:
        return _by_config.get((hidden_size, chunk_size, topology, leaf, accumulate, executor, casting_mode,
                               offset, residual))
    except TypeError:
        return None


def for_config(
    hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str, executor: str,
    casting_mode: str = "torch", offset: float = 0.0, residual: bool = False,
) -> Pipeline:
    """The pipeline of one ``normalize`` configuration (cached)."""
    pipe = cached(hidden_size, chunk_size, topology, leaf, accumulate, executor, casting_mode, offset, residual)
    if pipe is not None:
        return pipe
    # (an unhashable option: the builder says what is wrong with it before the key is used)
    # One pause of the cyclic collector over build, prove and lower: each pass pauses it
    # itself, and each resume made the next collection walk every node made so far
    # (1.2 s of a 12 s first call at D = 2**19, chunk_size=1, exact).
    with gc_paused():
        graph = build_graph(hidden_size, chunk_size=chunk_size, topology=topology, leaf=leaf,
                            accumulate=accumulate, casting_mode=casting_mode, offset=offset, residual=residual)
        pipe = Pipeline(graph, executor)
    key = (hidden_size, chunk_size, topology, leaf, accumulate, executor, casting_mode, offset, residual)
    return _store(_by_config, key, pipe)


def _semantics(graph: Graph) -> tuple[str, float, bool]:
    """The graph's ``(casting_mode, offset, residual)``, read from its FINALIZE and INPUT nodes."""
    mode, offset, residual = "torch", 0.0, False
    for node in graph.nodes:
        if node.op is Op.FINALIZE:
            mode, offset = node.attrs.get("casting_mode", "torch"), float(node.attrs.get("offset", 0.0))
        elif node.op is Op.INPUT:
            residual = bool(node.attrs.get("residual", False))
    return mode, offset, residual


def for_graph(graph: Graph, executor: str = "auto") -> Pipeline:
    """The pipeline of a graph someone built (cached per graph and executor name)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a taskgraph_norm.Graph, got {type(graph).__name__}")
    key = (graph, executor)
    try:
        pipe = _by_graph.get(key)
    except TypeError:
        raise ConfigError("executor", executor, "a string") from None
    if pipe is not None:
        return pipe
    return _store(_by_graph, key, Pipeline(graph, executor))
