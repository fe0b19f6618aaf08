"""Gantt charts of a traced run: one row per worker or stream, one bar per node.

The concurrent executor records a trace of its run; this module draws it
without importing the executor (layering: viz reads only the IR).  A trace is
duck-typed so that any recorder, including a hand-written one in a test, can be
drawn.

Expected event fields
---------------------
Each event is an object (or a mapping) with:

``node``    id of the graph node that ran (str)
``worker``  the worker thread or stream that ran it (any value with ``str()``);
            ``stream`` is accepted instead
``start``   start time in seconds (float, any common origin); or ``start_ns``
``end``     end time in seconds, ``>= start``; or ``end_ns`` (nanoseconds)
``op``      optional: the :class:`~taskgraph_norm.graph.Op` (or its name / value);
            looked up in the graph when absent (``kind`` is accepted instead)

The trace itself is either an iterable of events or an object with an
``events`` (or ``spans``) attribute; it may carry its ``graph``, which supplies
dependencies for the critical path.  The concurrent executor's
:class:`~taskgraph_norm.executors.concurrent.trace.Trace` is such an object (its ``spans``
are :class:`NodeSpan` records in nanoseconds); pass the graph alongside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..graph import Graph, Op
from ._optional import require
from .scene import KIND_OF_OP, KIND_STYLE

__all__ = ["TimelineEvent", "critical_path", "render_timeline", "timeline_events"]


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One node's execution, normalised from whatever the trace recorded."""

    node: str
    worker: str
    start: float
    end: float
    op: Op | None = None


def _field(event: Any, *names: str) -> Any:
    for name in names:
        if isinstance(event, Mapping) and name in event:
            return event[name]
        if hasattr(event, name):
            return getattr(event, name)
    return None


def _as_op(value: Any) -> Op | None:
    if value is None or isinstance(value, Op):
        return value
    text = str(value)
    for op in Op:
        if text in (op.name, op.value):
            return op
    return None


def timeline_events(trace: Any, graph: Graph | None = None) -> tuple[TimelineEvent, ...]:
    """Normalise a duck-typed trace (see the module docstring) into events.

    Raises
    ------
    ConfigError
        if the trace is empty, an event lacks ``node``/``worker``/``start``/``end``,
        or ends before it starts.
    """
    raw = _field(trace, "events", "spans")
    items: Iterable[Any] = raw if raw is not None else trace
    graph = graph if graph is not None else _field(trace, "graph")
    events = []
    for item in items:
        node, worker = _field(item, "node", "node_id"), _field(item, "worker", "stream")
        start, end = _field(item, "start"), _field(item, "end")
        if start is None and end is None:  # the executor's NodeSpan records nanoseconds
            start_ns, end_ns = _field(item, "start_ns"), _field(item, "end_ns")
            if start_ns is not None and end_ns is not None:
                start, end = start_ns * 1e-9, end_ns * 1e-9
        if node is None or worker is None or start is None or end is None:
            raise ConfigError("trace", item, "events with node, worker (or stream), start and end")
        if end < start:
            raise ConfigError("trace", item, f"end >= start for node {node!r}")
        op = _as_op(_field(item, "op", "kind"))
        if op is None and graph is not None and str(node) in graph.by_id:
            op = graph.by_id[str(node)].op
        events.append(TimelineEvent(str(node), str(worker), float(start), float(end), op))
    if not events:
        raise ConfigError("trace", trace, "at least one event")
    return tuple(events)


def critical_path(events: Iterable[TimelineEvent], graph: Graph | None) -> tuple[str, ...]:
    """The chain of nodes that decided when the run finished.

    Starting from the last event to end, repeatedly step to the operand that
    finished last (the one the node was waiting for).  Without a graph there
    are no dependencies, so the path is just the last node.

    Returns
    -------
    tuple of str
        Node ids, earliest first.

    Examples
    --------
    >>> from taskgraph_norm import build_graph
    >>> g = build_graph(128, chunk_size=64, topology="tree")
    >>> ev = [TimelineEvent(n, "w0", i, i + 1.0) for i, n in enumerate(g.topological_order)]
    >>> critical_path(ev, g)[-2:]
    ('finalize', 'y')
    """
    by_node = {e.node: e for e in events}
    if not by_node:
        return ()
    current = max(by_node.values(), key=lambda e: (e.end, e.start)).node
    path = [current]
    while graph is not None and current in graph.by_id:
        inputs = [by_node[i] for i in graph.by_id[current].inputs if i in by_node]
        if not inputs:
            break
        current = max(inputs, key=lambda e: (e.end, e.start)).node
        path.append(current)
    return tuple(reversed(path))


def render_timeline(
    trace: Any, path: str | os.PathLike[str], graph: Graph | None = None, *, title: str = ""
) -> Path:
    """Draw a traced run as a Gantt chart (``.svg`` or ``.png``).

    Rows are workers or streams; bars are nodes coloured by kind as in
    :func:`render`; bars on the critical path have a red outline and are joined
    by a red line.

    Parameters
    ----------
    trace:
        Duck-typed trace (see the module docstring for the event fields).
    path:
        Output file; the suffix (``.svg`` or ``.png``) picks the format.
    graph:
        The graph that ran (defaults to ``trace.graph``); needed for the
        critical path and for kinds the events do not carry.
    title:
        Optional heading.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ConfigError
        for a bad suffix or a malformed trace.
    MissingDependencyError
        when matplotlib is not installed.
    """
    out = Path(path)
    if out.suffix.lower() not in (".svg", ".png"):
        raise ConfigError("path", str(path), "a file name ending in .svg or .png")
    graph = graph if graph is not None else _field(trace, "graph")
    events = timeline_events(trace, graph)
    critical = set(critical_path(events, graph))
    require("matplotlib", "drawing a timeline")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    workers = sorted({e.worker for e in events})
    row = {w: i for i, w in enumerate(workers)}
    t0 = min(e.start for e in events)
    span = max(e.end for e in events) - t0 or 1.0
    scale, unit = (1e3, "ms") if span < 1 else (1.0, "s")
    fig = Figure(figsize=(11, 1.2 + 0.55 * len(workers)), dpi=144)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for e in sorted(events, key=lambda e: e.start):
        kind = KIND_OF_OP.get(e.op, "opaque") if e.op is not None else "opaque"
        on_path = e.node in critical
        x, w = (e.start - t0) * scale, max((e.end - e.start) * scale, span * scale * 1e-3)
        ax.broken_barh([(x, w)], (row[e.worker] - 0.38, 0.76), facecolors=KIND_STYLE[kind].fill,
                       edgecolors="#cc0000" if on_path else KIND_STYLE[kind].stroke,
                       linewidth=2.2 if on_path else 0.8, zorder=2)
        if w > span * scale * 0.04:  # only where the id fits inside the bar
            ax.text(x + w / 2, row[e.worker], e.node, ha="center", va="center", fontsize=7, zorder=3)
    by_node = {e.node: e for e in events}
    chain = [by_node[n] for n in critical_path(events, graph)]
    if len(chain) > 1:
        ax.plot([(e.start - t0 + (e.end - e.start) / 2) * scale for e in chain],
                [row[e.worker] for e in chain], color="#cc0000", lw=1, alpha=0.7, zorder=4,
                label="critical path")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_yticks(range(len(workers)), workers)
    ax.invert_yaxis()
    ax.set_xlabel(f"time since first start ({unit})")
    ax.set_title(title or f"{len(events)} nodes on {len(workers)} workers", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format=out.suffix[1:].lower())
    return out
