"""Lowering: a certified merge DAG becomes a :class:`Plan` of level-batched steps.

The plan is pure data (no torch): which chunks the row splits into, how the
leaves sum them, how their partials merge, and the exact-domain recipe.  The
compiled executor (:mod:`taskgraph_norm.backends.torch_ops.compiled`) turns it into a handful of tensor ops
per row tile.  Lowering reads only the graph's nodes, never its ``meta``, so a
hand-edited graph is lowered as what it is, or refused.

What lowers
-----------
* leaves: ``SUMSQ`` nodes over a uniform chunking ``[k C, min((k+1) C, D))`` with
  one leaf kind.  All full chunks become one op per halving step over a
  ``(rows, n_full, C)`` view; a ragged last chunk gets its own steps.
* float merges: every ``ADD`` (and an ``ACCUMULATE`` of at most two partials,
  which commutes exactly) becomes a slot triple; the triples are grouped into
  levels (a level's ADDs depend only on earlier levels).  The builder's tree is
  recognised and run as one strided add per level; anything else (a linear fold,
  a hand-made shape) runs one column add per ADD, in level order.  A ``CATSUM``
  over all leaves in index order is one ``torch.sum`` over the partials, exactly
  as :func:`kernels.catsum` does it.
* exact domain: every addition is exact, so the sum of all pre-rounded squares
  is the same in any order and any chunking.  The plan checks that the leaves
  and row maxima cover the row once each and that every leaf reaches the root
  exactly once; it then sums whole rows.

Anything else raises :class:`~taskgraph_norm.errors.GraphError` saying why; the
``auto`` executor then falls back to the reference interpreter.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import Any, Protocol

from .. import caches
from ..errors import ExecutionError, GraphError
from ..graph import Graph, Node, Op, gc_paused, validate
from .plan import Plan

__all__ = ["lower", "lower_certified"]

class _Certificate(Protocol):
    """What lowering reads of a proof (it is handed one; it never proves)."""

    @property
    def certified(self) -> bool: ...
    @property
    def summary(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...


def lower_certified(graph: Graph, proof: _Certificate) -> Plan:
    """The plan of ``graph``, whose ``proof`` (from :func:`taskgraph_norm.prove`) the
    caller hands over: the compiled executor never proves, and runs only what is
    certified.

    Raises
    ------
    ExecutionError
        if the proof does not certify the graph: an uncertified graph is never compiled.
    GraphError
        if the graph is certified but has a shape the plan cannot express.
    """
    if not proof.certified:
        raise ExecutionError(
            f"the compiled executor runs only certified graphs; this one is {proof.summary} "
            "(use executor='reference', or 'auto', which falls back for you)"
        )
    return lower(graph, proof.fingerprint)


def lower(graph: Graph, fingerprint: str = "") -> Plan:
    """Lower a (certified) graph to a :class:`Plan`.

    The caller decides certification (see :class:`taskgraph_norm.pipeline.Pipeline`); lowering
    itself refuses what it cannot run bit-identically to the reference: a race
    over three or more float partials, a non-uniform chunking, an opaque node.

    Raises
    ------
    GraphError
        naming the node that stops the lowering.
    """
    validate(graph)
    return _lower_cached(graph, fingerprint)


@functools.lru_cache(maxsize=256)
def _lower_cached(graph: Graph, fingerprint: str) -> Plan:
    with gc_paused():
        return _lower(graph, fingerprint)


def _lower(graph: Graph, fingerprint: str) -> Plan:
    nodes = graph.nodes
    ops = list(map(_op_of, nodes))
    finalize = _single(graph, ops, Op.FINALIZE)
    inputs = _positions(ops, Op.INPUT)
    residual = bool(inputs and nodes[inputs[0]].attrs.get("residual"))
    if finalize.attrs.get("norm") == "layer":
        return _lower_layer(graph, ops, finalize, fingerprint, residual)
    recipe = _recipe(graph, ops, finalize, Op.SUMSQ, graph.index[finalize.inputs[1]], None)
    return Plan(fingerprint=fingerprint, casting_mode=finalize.attrs.get("casting_mode", "torch"),
                offset=float(finalize.attrs.get("offset", 0.0)), residual=residual, **recipe)


def _lower_layer(graph: Graph, ops: list[Op], finalize: Node, fingerprint: str, residual: bool) -> Plan:
    """LayerNorm: the mean's DAG (SUM leaves up to MEAN's operand) and the variance's
    (centered SUMSQ leaves up to FINALIZE's total) must lower to the same recipe: the
    plan runs both sums with one chunking, one leaf kind and one merge."""
    mean = graph.by_id[finalize.inputs[2]]
    if mean.op is not Op.MEAN or len(finalize.inputs) != 3:
        raise GraphError(finalize.id, "a LayerNorm FINALIZE reads (x, total, mean) with mean a MEAN node")
    recipes = [_recipe(graph, ops, finalize, op, graph.index[root], _merges(graph, ops, graph.index[root]))
               for op, root in ((Op.SUM, mean.inputs[0]), (Op.SUMSQ, finalize.inputs[1]))]
    if recipes[0] != recipes[1]:
        raise GraphError(finalize.id, "the mean's and the variance's DAGs lower to different recipes "
                         f"({recipes[0]} vs {recipes[1]})", "the plan runs both sums with one recipe; "
                         "use executor='reference'")
    return Plan(fingerprint=fingerprint, residual=residual, norm="layer", **recipes[0])


def _merges(graph: Graph, ops: list[Op], root_at: int) -> frozenset[int]:
    """The positions of the merge nodes (ADD, ACCUMULATE, CATSUM) under ``root_at``, down
    to its leaves: one reduction's DAG of a graph that has two."""
    found: set[int] = set()
    stack = [root_at]
    sources, offsets = graph.operand_positions
    while stack:
        at = stack.pop()
        if ops[at] in (Op.ADD, Op.ACCUMULATE, Op.CATSUM) and at not in found:
            found.add(at)
            stack.extend(sources[offsets[at]:offsets[at + 1]])
    return frozenset(found)


def _recipe(graph: Graph, ops: list[Op], finalize: Node, leaf_op: Op, total_at: int,
            within: frozenset[int] | None) -> dict[str, Any]:
    """One reduction's plan fields: its ``leaf_op`` leaves' chunking and kind, and how
    they merge up to ``total_at`` (only through the merges ``within``, when given)."""
    nodes = graph.nodes
    # Positions, not ids, throughout: a graph may have a million leaves, and every
    # dict keyed by its ids costs about a second (the graph's own index is shared).
    found_at = _positions(ops, leaf_op)
    # Each leaf's attributes read once, as a dict.
    found_attrs = list(map(dict, map(_attr_pairs, map(nodes.__getitem__, found_at))))
    starts = list(map(_start_of, found_attrs))
    order = sorted(range(len(found_at)), key=starts.__getitem__)
    leaf_at, leaf_attrs = [found_at[k] for k in order], [found_attrs[k] for k in order]
    leaves = list(map(nodes.__getitem__, leaf_at))
    if not leaves:
        raise GraphError(finalize.id, f"nothing to lower: no {leaf_op.name} leaves")
    hidden = finalize.attrs.get("hidden_size")
    chunk, n_full, tail = _uniform_chunking(leaves, leaf_attrs, hidden)
    leaf_kinds = set(map(_leaf_of, leaf_attrs))
    domains = set(map(_domain_of, leaf_attrs))
    if len(leaf_kinds) != 1 or len(domains) != 1 or not leaf_kinds <= {"pairwise", "native"}:
        raise GraphError(leaves[0].id, "leaves mix kinds or domains; the compiled plan needs one")
    domain = domains.pop()
    common: dict[str, Any] = dict(
        hidden_size=hidden, chunk_size=chunk, n_full=n_full, tail=tail, leaf=leaf_kinds.pop(),
        adds=(), root=0,
    )
    if domain == "exact":
        _check_exact(graph, ops, leaves, total_at, n_full * chunk + tail, leaf_op)
        return dict(accumulate="exact", merge="exact", **common)
    slots = dict(zip(leaf_at, range(len(leaf_at))))  # leaf position -> its slot
    if total_at in slots:
        common["root"] = slots[total_at]
        return dict(accumulate="float", merge="single" if len(leaves) == 1 else "adds", **common)
    root = nodes[total_at]
    if root.op is Op.CATSUM and list(root.inputs) == [n.id for n in leaves]:
        return dict(accumulate="float", merge="cat", **common)
    adds, root_slot = _add_levels(graph, ops, slots, total_at, within)
    common.update(adds=adds, root=root_slot)
    if adds == _builder_tree(len(leaves)) and root_slot == len(leaves) + sum(map(len, adds)) - 1:
        return dict(accumulate="float", merge="tree", **common)
    return dict(accumulate="float", merge="adds", **common)


_op_of = operator.attrgetter("op")
_attr_pairs = operator.attrgetter("attrs.pairs")
_start_of = operator.itemgetter("start")
_bounds_of = operator.itemgetter("start", "stop")
_leaf_of = operator.methodcaller("get", "leaf")
_domain_of = operator.methodcaller("get", "domain", "float")


def _positions(ops: list[Op], op: Op) -> list[int]:
    """The positions of the nodes whose op is ``op`` (in C: no loop over the nodes)."""
    return list(itertools.compress(range(len(ops)), map(operator.is_, ops, itertools.repeat(op))))


def _single(graph: Graph, ops: list[Op], op: Op) -> Node:
    found = _positions(ops, op)
    if len(found) != 1:
        bad = next((n.id for n in graph if n.op is Op.RMSNORM), None)
        raise GraphError(bad, f"the compiled plan needs exactly one {op.name} node, found {len(found)}")
    return graph.nodes[found[0]]


def _uniform_chunking(
    leaves: list[Node], leaf_attrs: list[dict[str, Any]], hidden: object
) -> tuple[int, int, int]:
    if not isinstance(hidden, int) or hidden < 1:
        raise GraphError(leaves[0].id, "FINALIZE has no valid hidden_size")
    bounds = list(map(_bounds_of, leaf_attrs))
    chunk = bounds[0][1] - bounds[0][0]
    expected = [(a, min(a + chunk, hidden)) for a in range(0, hidden, chunk)] if chunk > 0 else []
    if bounds != expected:
        raise GraphError(leaves[0].id, "the leaves are not a uniform chunking of the row",
                         "the compiled plan batches equal chunks; use executor='reference'")
    return chunk, hidden // chunk, hidden % chunk


def _add_levels(
    graph: Graph, ops: list[Op], slots: dict[int, int], root_at: int, within: frozenset[int] | None = None
) -> tuple[tuple[tuple[tuple[int, int, int], ...], ...], int]:
    """The float merge as levels of ``(dst, a, b)`` slot triples (ASAP levels), each
    level in topological order.  One pass: a linear fold has as many levels as ADDs.
    ``slots`` maps each leaf's position to its slot; nodes are named by position."""
    count = len(ops)
    level_of = [-1] * count  # -1: not a partial (yet): an operand no merge may read
    slot_of = [0] * count
    for at, slot in slots.items():
        slot_of[at], level_of[at] = slot, 0
    levels: list[list[tuple[int, int, int]]] = []
    next_slot = len(slots)
    sources, offsets = graph.operand_positions
    skip = (Op.INPUT, Op.SUMSQ, Op.FINALIZE, Op.OUTPUT)
    nodes = graph.nodes
    order = (range(count) if graph.topological_nodes is nodes
             else map(graph.index.__getitem__, graph.topological_order))
    for at in order:
        op = ops[at]
        if op in skip or (within is not None and at not in within):
            continue
        first, end = offsets[at], offsets[at + 1]
        if op is Op.ACCUMULATE and end - first == 1:
            a = _partial(nodes, level_of, sources[first])
            slot_of[at], level_of[at] = slot_of[a], level_of[a]
            continue
        # Two float addends commute exactly: an ACCUMULATE of two is an ADD.
        if (op is not Op.ADD and op is not Op.ACCUMULATE) or end - first != 2:
            raise GraphError(nodes[at].id, f"{op.name} with {end - first} operands cannot be "
                             "lowered in the float domain", "use executor='reference'")
        a, b = _partial(nodes, level_of, sources[first]), _partial(nodes, level_of, sources[first + 1])
        level = max(level_of[a], level_of[b]) + 1
        if level > len(levels):
            levels.append([])
        slot_of[at], level_of[at] = next_slot, level
        levels[level - 1].append((next_slot, slot_of[a], slot_of[b]))
        next_slot += 1
    return tuple(map(tuple, levels)), slot_of[_partial(nodes, level_of, root_at)]


def _partial(nodes: tuple[Node, ...], level_of: list[int], at: int) -> int:
    """``at`` if it holds a partial sum (a leaf, a merge read), else KeyError (its id)."""
    if level_of[at] < 0:
        raise KeyError(nodes[at].id)
    return at


@functools.lru_cache(maxsize=64)
def _builder_tree(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """The slot triples :func:`topologies.merge_tree` builds over ``n`` leaves."""
    level_slots = list(range(n))
    nxt_slot = n
    levels = []
    while len(level_slots) > 1:
        nxt, level = [], []
        for i in range(0, len(level_slots), 2):
            if i + 1 < len(level_slots):
                level.append((nxt_slot, level_slots[i], level_slots[i + 1]))
                nxt.append(nxt_slot)
                nxt_slot += 1
            else:
                nxt.append(level_slots[i])
        levels.append(tuple(level))
        level_slots = nxt
    return tuple(levels)


def _check_exact(graph: Graph, ops: list[Op], leaves: list[Node], total_at: int, hidden: int,
                 leaf_op: Op = Op.SUMSQ) -> None:
    """Whole-row exact sums equal the graph's iff each leaf reaches the root once
    and the row maxima cover the row (the chunking itself was checked)."""
    arity = 3 if leaf_op is Op.SUMSQ and leaves[0].attrs.get("centered") else 2
    scales = {leaf.inputs[-1] for leaf in leaves if len(leaf.inputs) == arity}
    scale = graph.by_id[scales.pop()] if len(scales) == 1 else None
    if scale is None or scale.op is not Op.SCALE or any(len(leaf.inputs) != arity for leaf in leaves):
        raise GraphError(leaves[0].id, "exact leaves must all read one SCALE node")
    reached = list(dict.fromkeys(_walk(graph, ops, graph.index[scale.inputs[0]], (Op.MAX,), Op.ROWMAX)))
    maxima = [dict(_attr_pairs(graph.nodes[at])) for at in reached]
    covered = sorted(map(_bounds_of, maxima), key=operator.itemgetter(0))  # stable, as by start
    if not covered or covered[0][0] != 0 or covered[-1][1] != hidden or any(
        b[0] != a[1] for a, b in zip(covered, covered[1:])
    ):
        first = min(range(len(reached)), key=lambda k: maxima[k]["start"]) if reached else None
        raise GraphError(graph.nodes[reached[first]].id if first is not None else graph.nodes[total_at].id,
                         "the row maxima do not cover the row once", "use executor='reference'")
    uses = _walk(graph, ops, total_at, (Op.ADD, Op.ACCUMULATE, Op.CATSUM), leaf_op)
    if len(set(uses)) != len(leaves) or len(uses) != len(leaves):
        raise GraphError(graph.nodes[total_at].id, "some leaf reaches the total more or less than once")


def _walk(graph: Graph, ops: list[Op], start: int, through: tuple[Op, ...], leaf_op: Op) -> list[int]:
    """The position of every ``leaf_op`` node reached from ``start`` through ``through``
    nodes, once per path (so a leaf used twice appears twice); any other op is refused."""
    found: list[int] = []
    stack = [start]
    sources, offsets = graph.operand_positions
    while stack:
        at = stack.pop()
        op = ops[at]
        if op is leaf_op:
            found.append(at)
        elif op in through:
            stack.extend(sources[offsets[at]:offsets[at + 1]])
        else:
            raise GraphError(graph.nodes[at].id, f"{op.name} inside an exact merge cannot be lowered")
    return found

for _cached in (_lower_cached, _builder_tree):
    caches.register(_cached.cache_clear)
