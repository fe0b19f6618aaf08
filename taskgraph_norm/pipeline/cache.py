"""The pipelines' caches: one per normalize configuration, one per (graph, executor).

One holds a pipeline per normalize configuration (hidden size, chunk size, topology,
leaf, accumulate, executor, casting mode, offset, residual), the other one per
(graph, executor) for ``execute``.  Both are bounded and emptied by
:func:`taskgraph_norm.clear_caches`.
"""

from __future__ import annotations

import threading
from typing import Any

from .. import caches
from ..errors import ConfigError
from ..graph import Graph
from ..graph.nodes import gc_paused
from ..topologies import build_graph
from .core import Pipeline

__all__ = ["CACHE_SIZE", "PIPELINES", "cached", "for_config", "for_graph"]

#: How many pipelines each cache keeps (the oldest goes first).
CACHE_SIZE = 256

_lock = threading.Lock()
#: (hidden, chunk_size, topology, leaf, accumulate, executor, casting_mode, offset,
#: residual) -> pipeline; the C face (backends/native/face.py) looks a call's pipeline up
#: here too.
PIPELINES: dict[tuple[Any, ...], Pipeline] = {}
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
        PIPELINES.clear()
        _by_graph.clear()


def cached(
    hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str, executor: str,
    casting_mode: str = "torch", offset: float = 0.0, residual: bool = False,
) -> Pipeline | None:
    """The configuration's pipeline if one is cached, else ``None``: the faces' warm
    path, one dict lookup (an unhashable option is never cached: ``None``; nor is a
    chunk size that only compares equal to an int, such as ``16.0`` or ``True``, so
    whether an option is accepted never depends on what is cached)."""
    if type(chunk_size) is not int:
        return None
    try:
        return PIPELINES.get((hidden_size, chunk_size, topology, leaf, accumulate, executor, casting_mode,
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
        pipe.options = (chunk_size, topology, leaf, accumulate, pipe.casting_mode, pipe.offset)
    key = (hidden_size, chunk_size, topology, leaf, accumulate, executor, casting_mode, offset, residual)
    return _store(PIPELINES, key, pipe)


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
