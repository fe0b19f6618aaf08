"""The static dependency structure the concurrent executor needs, once per graph.

A graph is immutable, so everything a run derives from it -- operand positions,
users, dependency counts, which nodes start ready -- is computed once (after
validation) and shared by every run of that graph.  Runs copy only the counters
they mutate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from ... import caches
from ...graph import Graph, Op, validate

__all__ = ["RunPlan", "plan_for"]

_INLINE = frozenset({Op.INPUT, Op.OUTPUT})  # identities: not worth a thread hop


@dataclass(frozen=True, slots=True)
class RunPlan:
    """Node positions (indices into ``graph.nodes``) and their wiring.

    ``inputs[i]``: operand positions in order; ``sources[i]``: the distinct ones;
    ``users[i]``: distinct consumers; ``pending[i]``: distinct operands (the
    dependency count a run starts from); ``ready``: nodes with none;
    ``accumulates``: ACCUMULATE nodes; ``inline``: identity nodes the executor
    runs without a worker; ``methods``: the interpreter method name per node;
    ``calls``: a CALL node's ``fn`` attr (None for other nodes);
    ``positions[u][s]``: for an ACCUMULATE ``u``, where operand ``s`` appears.
    """

    graph: Graph
    inputs: tuple[tuple[int, ...], ...]
    sources: tuple[tuple[int, ...], ...]
    users: tuple[tuple[int, ...], ...]
    pending: tuple[int, ...]
    ready: tuple[int, ...]
    accumulates: tuple[int, ...]
    inline: tuple[bool, ...]
    methods: tuple[str, ...]
    calls: tuple[object, ...]
    positions: Mapping[int, Mapping[int, tuple[int, ...]]]
    output: int


def _positions(operands: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    found: dict[int, list[int]] = {}
    for p, s in enumerate(operands):
        found.setdefault(s, []).append(p)
    return {s: tuple(ps) for s, ps in found.items()}


def _build(graph: Graph) -> RunPlan:
    validate(graph)
    nodes = graph.nodes
    index = {n.id: i for i, n in enumerate(nodes)}
    inputs = tuple(tuple(index[s] for s in n.inputs) for n in nodes)
    sources = tuple(tuple(dict.fromkeys(ins)) for ins in inputs)
    users: list[list[int]] = [[] for _ in nodes]
    for i, srcs in enumerate(sources):
        for s in srcs:
            users[s].append(i)
    pending = tuple(len(s) for s in sources)
    return RunPlan(
        graph=graph,
        inputs=inputs,
        sources=sources,
        users=tuple(tuple(u) for u in users),
        pending=pending,
        ready=tuple(i for i, p in enumerate(pending) if p == 0),
        accumulates=tuple(i for i, n in enumerate(nodes) if n.op is Op.ACCUMULATE),
        inline=tuple(n.op in _INLINE for n in nodes),
        methods=tuple(n.op.value for n in nodes),
        calls=tuple(n.attrs.get("fn") if n.op is Op.CALL else None for n in nodes),
        positions={u: _positions(inputs[u]) for u, n in enumerate(nodes) if n.op is Op.ACCUMULATE},
        output=index[graph.output],
    )


_lock = threading.Lock()
_plans: OrderedDict[int, RunPlan] = OrderedDict()
_MAX_PLANS = 64


def plan_for(graph: Graph) -> RunPlan:
    """The validated :class:`RunPlan` of ``graph`` (cached for the last 64 graphs).

    The cache is keyed by object identity and holds the graph, so an id is never
    reused while its entry lives.  Raises what :func:`validate` raises.
    """
    key = id(graph)
    with _lock:
        plan = _plans.get(key)
        if plan is not None and plan.graph is graph:
            _plans.move_to_end(key)
            return plan
    plan = _build(graph)
    with _lock:
        _plans[key] = plan
        while len(_plans) > _MAX_PLANS:
            _plans.popitem(last=False)
    return plan


@caches.register
def _clear() -> None:
    with _lock:
        _plans.clear()
