"""LayerNorm's conclusion: both reductions of a ``norm="layer"`` graph read and
certified together (docs/prover.md, "LayerNorm").

A LayerNorm graph (:func:`taskgraph_norm.topologies.build_layer_graph`) has two
merge DAGs: the mean's (``SUM`` leaves, a ``sum`` value, then ``MEAN``) and the
variance's (centered ``SUMSQ`` leaves that read that ``MEAN``), and a ``FINALIZE``
with ``norm="layer"`` over ``(x, variance total, mean)``.  It is

* ``structure`` when every merge of both DAGs has one fixed order,
* ``exact`` when both are exact-domain sums, each with its own ``SCALE`` from the
  right maximum (``|x|`` for the mean, ``(x - mean)^2`` for the variance),
* ``refuted`` when either DAG has a float race over 3+ partials (the reading says
  which reduction: :attr:`~.conclusions.Reading.race_in`),
* ``unknown`` for anything else (LayerNorm nodes in an RMSNorm graph, leaves that
  read another mean, mixed domains, a maximum of the wrong kind...).

Pure Python over the IR.  :func:`read_any` is the prover's reader of every graph.
"""

from __future__ import annotations

from collections import Counter

from ..graph import Graph, Node, Op
from .conclusions import (
    _ASSUME_CATSUM, _ASSUME_EXACT, _ASSUME_NATIVE, _ASSUME_TWO_WAY, Reading, _Facts, _node, _row_local,
    _semantic_lines, read_graph,
)
from .forms import render
from .readers import Unreadable
from .segments import Value, contains, coverage_note, merged, multiset, segment_text, weighted_segments

__all__ = ["read_any", "conclude_layer"]

_REDUCTIONS = {"sum": "mean", "partial": "variance"}

_ASSUME_STANDARD = (
    "standard topology: torch's opaque layer_norm kernel gives the same bits for the same "
    "input shape, dtype and thread count, run after run"
)


def read_any(graph: Graph) -> Reading:
    """:func:`~.conclusions.read_graph` with LayerNorm's conclusion tried first."""
    return read_graph(graph, conclude=conclude_layer)


def conclude_layer(facts: _Facts) -> Reading | None:
    """LayerNorm's reading of the graph, or None when it is not a LayerNorm graph.

    Raises Unreadable for LayerNorm nodes in another graph, or a LayerNorm graph
    whose pieces do not fit together."""
    graph = facts.graph
    last = _node(graph, _node(graph, graph.output).inputs[0])
    if last.op is Op.LAYERNORM:
        return _standard(facts, last)
    if last.op is not Op.FINALIZE or last.attrs.get("norm") != "layer":
        if facts.ops[Op.SUM] or facts.ops[Op.MEAN] or facts.ops[Op.LAYERNORM]:
            raise Unreadable("the graph has LayerNorm nodes (SUM, MEAN, LAYERNORM) but no "
                             "FINALIZE with norm='layer' at its end")
        return None
    hidden = int(last.attrs["hidden_size"])
    mean = graph.by_id[last.inputs[2]]
    sums, squares = facts.values[mean.inputs[0]], facts.values[last.inputs[1]]
    if facts.ops[Op.MEAN] != 1 or mean.attrs["hidden_size"] != hidden:
        raise Unreadable(f"a LayerNorm graph has one MEAN over D={hidden}; found "
                         f"{facts.ops[Op.MEAN]}, the last over D={mean.attrs['hidden_size']}")
    domains: Counter[str] = Counter()
    leaf_counts: Counter[tuple[Op, str]] = Counter()
    for n in graph.nodes:
        if n.op is Op.SUM or n.op is Op.SUMSQ:
            if n.op is Op.SUMSQ and (not n.attrs.get("centered") or n.inputs[1] != mean.id):
                raise Unreadable(f"node {n.id!r}: a LayerNorm graph's SUMSQ leaves are centered "
                                 f"on its MEAN {mean.id!r}")
            domains[n.attrs.get("domain", "float")] += 1
            leaf_counts[n.op, str(n.attrs.get("leaf"))] += 1
        elif n.op is Op.ROWMAX and n.attrs.get("centered") and n.inputs[1] != mean.id:
            raise Unreadable(f"node {n.id!r}: a centered ROWMAX reads another mean than {mean.id!r}")
    domains.update((str(mean.attrs.get("domain", "float")), str(last.attrs.get("domain", "float"))))
    if len(domains) != 1:
        raise Unreadable(f"the graph mixes exact-domain and float-domain nodes ({sorted(domains)})")
    if "exact" in domains:
        return _exact(facts, last, hidden, sums, squares)
    return _float(facts, last, hidden, sums, squares, leaf_counts)


def _float(facts: _Facts, finalize: Node, hidden: int, sums: Value, squares: Value,
           leaf_counts: Counter[tuple[Op, str]]) -> Reading:
    merges = [n for n in facts.graph.nodes if n.op is Op.ACCUMULATE] if facts.ops[Op.ACCUMULATE] else []
    races = tuple((n.id, len(n.inputs)) for n in merges if len(n.inputs) >= 3)
    assumptions = []
    if leaf_counts[Op.SUM, "native"] or leaf_counts[Op.SUMSQ, "native"]:
        assumptions.append(_ASSUME_NATIVE)
    if facts.ops[Op.CATSUM]:
        assumptions.append(_ASSUME_CATSUM)
    if any(len(n.inputs) == 2 for n in merges):
        assumptions.append(_ASSUME_TWO_WAY)
    expression = f"mean={render(sums.expr)}; var={render(squares.expr)}"
    return Reading(
        expression=expression,
        canonical="\n".join(["layer", "float", f"D={hidden}", expression, *facts.marks,
                             *_semantic_lines(facts.graph, finalize)]),
        races=races,
        race_in=tuple(_REDUCTIONS[facts.values[node].kind] for node, _ in races),
        assumptions=tuple(assumptions),
        why_deterministic=_why_structure(facts.ops, leaf_counts) + tuple(
            f"{label}: " + coverage_note(multiset(weighted_segments(total, facts.order)), hidden)
            for label, total in (("mean", sums), ("variance", squares))),
        row_local=_row_local(facts.ops) + _ROW_LOCAL,
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


def _exact(facts: _Facts, finalize: Node, hidden: int, sums: Value, squares: Value) -> Reading:
    parts, sigmas, notes = [], [], []
    for label, total, want in (("mean", sums, "mx["), ("var", squares, "md[")):
        expression, sigma_d, ranges = _exact_sum(facts, total, label, want)
        parts.append(f"{label}=" + expression)
        sigmas.append(f"sigma_D={sigma_d}")
        notes.append(f"{'variance' if label == 'var' else label}: " + coverage_note(ranges, hidden))
    expression = "; ".join(parts) + ("@" + "+".join(facts.deps) if facts.deps else "")
    return Reading(
        expression=expression,
        canonical="\n".join(["layer", "exact", f"D={hidden}", *sigmas, expression, *facts.marks,
                             *_semantic_lines(facts.graph, finalize)]),
        exact=True,
        assumptions=(_ASSUME_EXACT,),
        why_deterministic=_WHY_EXACT + tuple(notes),
        row_local=_row_local(facts.ops) + _ROW_LOCAL,
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


def _exact_sum(facts: _Facts, total: Value, label: str, want: str) -> tuple[str, int, list[tuple[int, int, int]]]:
    """One exact reduction checked as RMSNorm's is (one SCALE whose maximum covers
    every summed element, at most ``sigma_D`` summands), and that its maxima are of
    the right kind (``want``: ``mx[`` for ``|x|``, ``md[`` for ``(x - mean)^2``)."""
    if len(total.scales) != 1:
        raise Unreadable(f"the {label}'s exact leaves must share one SCALE node, found {len(total.scales)}")
    scale = facts.values[next(iter(total.scales))]
    stack = [scale]
    while stack:
        value = stack.pop()
        if value.leaf is not None and not render(value.expr).startswith(want):
            raise Unreadable(f"the {label}'s SCALE is sized from {render(value.expr)!r}, not from "
                             f"maxima {want}a:b] of the values it sums")
        stack.extend(value.operands)
    segments = weighted_segments(total, facts.order)
    ranges = multiset(segments)
    summed, maximised = merged(ranges), merged(multiset(weighted_segments(scale, facts.order)))
    if not contains(maximised, summed):
        raise Unreadable(f"the {label}'s SCALE maximum does not cover every summed element, so "
                         "the pre-rounding grid may be too fine for exact sums")
    count = sum((b - a) * times for (a, b), times in segments)
    if count > scale.hidden_size:
        raise Unreadable(f"{count} summed values of the {label} exceed the {scale.hidden_size} its "
                         "SCALE sized its grid for, so a partial sum could round")
    what = "x" if label == "mean" else "(x-mean)^2"
    expression = f"exact_sum({what}: " + ", ".join(map(segment_text, ranges))
    if maximised != summed:
        expression += "; max over " + ", ".join(f"x[{a}:{b}]" for a, b in maximised)
    return expression + ")", scale.hidden_size, ranges


def _standard(facts: _Facts, node: Node) -> Reading:
    expression = render(facts.values[node.id].expr)
    return Reading(
        expression=expression,
        canonical="\n".join(["standard", "layer", f"D={node.attrs['hidden_size']}", expression,
                             *facts.marks, *_semantic_lines(facts.graph, node)]),
        assumptions=(_ASSUME_STANDARD,),
        why_deterministic=("LAYERNORM: one opaque torch kernel; deterministic only under the "
                           "assumption below",),
        batch_blockers=facts.blockers + (
            "LAYERNORM is torch's opaque kernel: torch does not promise batch invariance (its "
            "reductions may be split differently for another number of rows or threads), so it "
            "is not certified",),
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


def _why_structure(ops: Counter[Op], leaf_counts: Counter[tuple[Op, str]]) -> tuple[str, ...]:
    why = ["every merge of both reductions (the mean's sum of x, the variance's sum of squared "
           "deviations) has one fixed order, so every valid schedule evaluates the same two "
           "expressions, with the same rounding at every node:"]
    for op, what in ((Op.SUM, "SUM (x)"), (Op.SUMSQ, "centered SUMSQ ((x - mean)^2)")):
        if leaf_counts[op, "pairwise"]:
            why.append(f"{what} pairwise leaves ({leaf_counts[op, 'pairwise']}): explicit halving, "
                       "an order fixed by the chunk length alone")
        if leaf_counts[op, "native"]:
            why.append(f"{what} native leaves ({leaf_counts[op, 'native']}): torch.sum over one "
                       "chunk; its order is the backend's (see assumptions)")
    if ops[Op.ADD]:
        why.append(f"ADD ({ops[Op.ADD]}): an ordered binary merge, its operands fixed in the graph")
    if ops[Op.ACCUMULATE]:
        why.append(f"ACCUMULATE ({ops[Op.ACCUMULATE]}): at most two partials each; one float "
                   "addition commutes exactly (a+b == b+a), so arrival order is moot")
    if ops[Op.CATSUM]:
        why.append(f"CATSUM ({ops[Op.CATSUM]}): one torch.sum over the partials in operand order; "
                   "its inside order is the backend's (see assumptions)")
    why.append("MEAN: the total divided by D, one correctly rounded division; every deviation "
               "x - mean is one correctly rounded subtraction")
    why.append("FINALIZE (norm=layer): the variance rounded once, / D + eps, a correctly rounded "
               "sqrt and division, * w, + b: IEEE operations of its operands")
    return tuple(why)


_WHY_EXACT = (
    "both reductions are exact sums (docs/exact.md, LayerNorm): the mean's values x and the "
    "variance's squares (x - mean)^2 are pre-rounded onto two fixed grids each, from their "
    "own SCALE (max |x|, max (x - mean)^2; checked), so every addition of either reduction "
    "(ADD, ACCUMULATE in any arrival order, CATSUM, torch.sum inside a leaf) is exact: both "
    "pairs (S1, S2) are the same in every order, topology, chunking and leaf kind",
    "ROWMAX/MAX: maxima are exact, so their merge order never matters",
    "MEAN: the exact pair over D, correctly rounded once; each deviation x - mean rounded once",
    "FINALIZE (norm=layer): the variance's pair correctly rounded once, then / D + eps, a "
    "correctly rounded sqrt and division, * w, + b",
)

_ROW_LOCAL = (
    "SUM, MEAN: one row's chunk sums and that row's mean; centered leaves and FINALIZE read "
    "only their own row's mean",
)
