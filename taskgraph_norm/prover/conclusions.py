"""Read a whole graph: every node in order (:mod:`.readers`), then the conclusion
its kind of graph allows (float, exact or standard) as a :class:`Reading`: the
canonical text, the assumptions, why it is deterministic and row-local, and what
blocks batch invariance.

Pure Python over the IR.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from ..graph import Graph, Node, Op
from ..graph.nodes import Indexed
from .forms import render
from .readers import PARTIAL_OPS, Unreadable, dependence_mark, read_node, semantics
from .segments import Value as _Value
from .segments import contains, coverage_note, merged, multiset, segment_text, weighted_segments

__all__ = ["Reading", "read_graph"]

#: Longest expression the reader accepts: this many characters, or
#: :data:`_MAX_EXPRESSION_PER_NODE` per node of the graph if that is more.  Heavy
#: operand sharing could otherwise blow a small DAG up into an exponentially long
#: tree; a graph without sharing stays far below it (a million leaves need ~22M).
_MAX_EXPRESSION = 4_000_000
_MAX_EXPRESSION_PER_NODE = 64

_ASSUME_NATIVE = (
    "native leaf: torch.sum's order over one contiguous chunk is fixed by the backend "
    "for a given chunk length and does not depend on the number of rows"
)
_ASSUME_CATSUM = (
    "cat topology: torch.sum over the concatenated partials has an order fixed by the "
    "backend for a given number of partials, independent of the number of rows"
)
_ASSUME_STANDARD = (
    "standard topology: torch's opaque rms_norm kernel gives the same bits for the same "
    "input shape, dtype and thread count, run after run"
)
_ASSUME_TWO_WAY = (
    "two-partial ACCUMULATE: a+b and b+a have the same bits; IEEE 754 guarantees it "
    "except when both are NaN, where it does not say whose payload survives"
)
_ASSUME_EXACT = (
    "exact domain: fp64 arithmetic is IEEE round-to-nearest as torch runs it eagerly "
    "(no fast-math reassociation, no flush-to-zero of the pre-rounded squares)"
)


class _Expressions(Mapping[str, str]):
    """Every node's expression by id, rendered when asked for (rendering them all
    would cost the sum of their lengths: quadratic for a left fold)."""

    def __init__(self, values: Mapping[str, _Value]) -> None:
        self._values = values

    def __getitem__(self, node_id: str) -> str:
        return render(self._values[node_id].expr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass(frozen=True)
class Reading:
    """What :func:`read_graph` found; ``problem`` is set when it could not read the graph."""

    expression: str
    canonical: str = ""
    problem: str | None = None
    exact: bool = False
    races: tuple[tuple[str, int], ...] = ()
    race_in: tuple[str, ...] = ()  # LayerNorm: which reduction each race is in ("mean", "variance")
    assumptions: tuple[str, ...] = ()
    why_deterministic: tuple[str, ...] = ()
    row_local: tuple[str, ...] = ()
    batch_blockers: tuple[str, ...] = ()
    node_expressions: Mapping[str, str] = field(default_factory=dict)
    annotated: tuple[Node, ...] = ()  # nodes with a depends_on or placement attribute


def read_graph(graph: Graph, *, conclude: Callable[[_Facts], Reading | None] | None = None) -> Reading:
    """Read a validated graph.  Never raises for a graph it cannot read: see ``problem``.

    ``conclude``: a conclusion tried before RMSNorm's (it returns None for a graph
    that is not its kind); :mod:`.layer` passes LayerNorm's.

    Linear in the graph and its expression's length: expressions are built as
    shared :class:`~.forms.Form` pieces and rendered once, segments are walked only
    where they are read.
    """
    annotated: list[Node] = []
    limit = max(_MAX_EXPRESSION, _MAX_EXPRESSION_PER_NODE * len(graph))
    nodes = graph.topological_nodes
    # Values by node position (operands found through the graph's integer operand
    # arrays: no id dict is built or looked up per node), and in reading order.
    slots: list[_Value] = [None] * len(nodes)  # type: ignore[list-item]
    sources, offsets = graph.operand_positions
    value_at = slots.__getitem__
    if nodes is graph.nodes:
        places: Iterable[int] = range(len(nodes))
        order = slots
    else:
        places = list(map(graph.index.__getitem__, graph.topological_order))
        order = []
    try:
        for index, (node, at) in enumerate(zip(nodes, places)):
            value = read_node(node, list(map(value_at, sources[offsets[at]:offsets[at + 1]])),
                              limit, annotated)
            value.index = index
            slots[at] = value
            if order is not slots:
                order.append(value)
    except Unreadable as exc:
        read = order[:index] if order is slots else order
        partial = next((v.expr for v in reversed(read) if v.kind == "partial"), "")
        return Reading(expression=render(partial), problem=str(exc))
    values = Indexed(graph.index, slots)
    exprs = _Expressions(values)
    try:
        return _conclude(graph, values, tuple(order), exprs, tuple(annotated), conclude)
    except Unreadable as exc:
        return Reading(expression="", problem=str(exc), node_expressions=exprs)


# --- the whole graph --------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """What every conclusion needs about the whole graph."""

    graph: Graph
    values: Mapping[str, _Value]
    order: tuple[_Value, ...]  # every value, operands before their users
    exprs: Mapping[str, str]
    ops: Counter[Op]
    marks: tuple[str, ...]  # dependence marks of nodes outside the expression
    deps: tuple[str, ...]  # every dependence any node declares
    blockers: tuple[str, ...]  # why batch invariance cannot be certified
    annotated: tuple[Node, ...]  # nodes with a depends_on or placement attribute


def _conclude(graph: Graph, values: Mapping[str, _Value], order: tuple[_Value, ...],
              exprs: Mapping[str, str], annotated: tuple[Node, ...],
              conclude: Callable[[_Facts], Reading | None] | None = None) -> Reading:
    declaring = [n for n in annotated if "depends_on" in n.attrs]
    deps = tuple(sorted({d for n in declaring for d in _as_tuple(n.attrs["depends_on"])}))
    facts = _Facts(
        graph, values, order, exprs, Counter(map(_op_of, graph.nodes)),
        marks=tuple(sorted(
            f"{n.op.value}{dependence_mark(n)}" for n in declaring
            if n.attrs["depends_on"] and n.op not in PARTIAL_OPS
        )),
        deps=deps,
        blockers=tuple(
            f"a node declares depends_on={d!r}: the graph is not a function of the "
            "configuration alone, so a row's bits may change with the " + d.replace("_", " ")
            for d in deps
        ),
        annotated=annotated,
    )
    if conclude is not None:
        found = conclude(facts)
        if found is not None:
            return found
    last = _node(graph, _node(graph, graph.output).inputs[0])
    if last.op is Op.RMSNORM:
        return _conclude_standard(facts, last)
    leaves = [n for n in graph.nodes if n.op is Op.SUMSQ]
    kinds = Counter((n.attrs.get("leaf"), n.attrs.get("domain", "float")) for n in leaves)
    domains = {domain for _, domain in kinds}
    if len(domains) != 1 or last.attrs.get("domain", "float") not in domains:
        raise Unreadable("the graph mixes exact-domain and float-domain nodes "
                          f"(leaves: {sorted(domains)}, FINALIZE: "
                          f"{last.attrs.get('domain', 'float')!r})")
    if "exact" in domains:
        return _conclude_exact(facts, last)
    leaf_counts: Counter[str] = Counter()
    for (leaf, _), count in kinds.items():
        leaf_counts[str(leaf)] += count
    return _conclude_float(facts, last, leaf_counts)


_op_of = operator.attrgetter("op")


def _node(graph: Graph, node_id: str) -> Node:
    """The node ``node_id``; the output and FINALIZE are last in a builder's order,
    so look there before building the graph's id index."""
    for node in graph.nodes[-1:-5:-1]:
        if node.id == node_id:
            return node
    return graph.by_id[node_id]


def _conclude_standard(facts: _Facts, rmsnorm: Node) -> Reading:
    expression = render(facts.values[rmsnorm.id].expr)
    blocker = ("RMSNORM is torch's opaque kernel: torch does not promise batch invariance "
               "(its reduction may be split differently for another number of rows or "
               "threads), so it is not certified")
    return Reading(
        expression=expression,
        canonical="\n".join(["standard", f"D={rmsnorm.attrs['hidden_size']}", expression,
                             *facts.marks, *_semantic_lines(facts.graph, rmsnorm)]),
        assumptions=(_ASSUME_STANDARD,),
        why_deterministic=("RMSNORM: one opaque torch kernel; deterministic only under the "
                           "assumption below",),
        batch_blockers=facts.blockers + (blocker,),
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


def _conclude_float(facts: _Facts, finalize: Node, leaf_counts: Counter[str]) -> Reading:
    hidden = int(finalize.attrs["hidden_size"])
    total = facts.values[finalize.inputs[1]]
    expression = render(total.expr)
    merges = [n for n in facts.graph.nodes if n.op is Op.ACCUMULATE] if facts.ops[
        Op.ACCUMULATE] else []
    races = tuple((n.id, len(n.inputs)) for n in merges if len(n.inputs) >= 3)
    assumptions = []
    if leaf_counts["native"]:
        assumptions.append(_ASSUME_NATIVE)
    if facts.ops[Op.CATSUM]:
        assumptions.append(_ASSUME_CATSUM)
    if any(len(n.inputs) == 2 for n in merges):
        assumptions.append(_ASSUME_TWO_WAY)
    return Reading(
        expression=expression,
        canonical="\n".join(["float", f"D={hidden}", expression, *facts.marks,
                               *_semantic_lines(facts.graph, finalize)]),
        races=races,
        assumptions=tuple(assumptions),
        why_deterministic=_why_structure(facts.ops, leaf_counts)
        + (coverage_note(multiset(weighted_segments(total, facts.order)), hidden),),
        row_local=_row_local(facts.ops),
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


def _conclude_exact(facts: _Facts, finalize: Node) -> Reading:
    hidden = int(finalize.attrs["hidden_size"])
    total = facts.values[finalize.inputs[1]]
    if len(total.scales) != 1:
        raise Unreadable("exact leaves must share one SCALE node, found "
                          f"{len(total.scales)}")
    scale = facts.values[next(iter(total.scales))]
    segments = weighted_segments(total, facts.order)
    ranges = multiset(segments)  # once: a million leaves take a second to sort
    summed = merged(ranges)
    maximised = merged(multiset(weighted_segments(scale, facts.order)))
    if not contains(maximised, summed):
        raise Unreadable("the SCALE's row maximum does not cover every summed element, "
                          "so the pre-rounding grid may be too fine for exact sums")
    count = sum((b - a) * times for (a, b), times in segments)
    if count > scale.hidden_size:
        raise Unreadable(f"{count} summed squares exceed the {scale.hidden_size} the SCALE "
                          "sized its grid for, so a partial sum could round")
    expression = "exact_sum(" + ", ".join(map(segment_text, ranges))
    if maximised != summed:
        expression += "; max over " + ", ".join(f"x[{a}:{b}]" for a, b in maximised)
    expression += ")" + ("@" + "+".join(facts.deps) if facts.deps else "")
    return Reading(
        expression=expression,
        canonical="\n".join(["exact", f"D={hidden}", f"sigma_D={scale.hidden_size}",
                             expression, *facts.marks, *_semantic_lines(facts.graph, finalize)]),
        exact=True,
        assumptions=(_ASSUME_EXACT,),
        why_deterministic=_WHY_EXACT + (coverage_note(ranges, hidden),),
        row_local=_row_local(facts.ops),
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


_WHY_EXACT = (
    "every leaf splits each square v into two pre-rounded folds: q1 = (sigma1 + v) - sigma1 "
    "with sigma1 = 2^ceil(log2(2*D*M)), M the row maximum of the squares, and "
    "q2 = (sigma2 + r) - sigma2 for the exact remainder r = v - q1, with "
    "sigma2 = 2^ceil(log2(D*ulp(sigma1))); the SCALE's maximum covers every summed "
    "element (checked), so every q and every partial sum of a fold is a multiple of its "
    "grid unit ulp(sigma) below 2^53 units",
    "so every addition (ADD, ACCUMULATE in any arrival order, CATSUM, torch.sum "
    "inside a native leaf) is exact, fold by fold: the pair (S1, S2) is the same in every "
    "order, topology, chunking and leaf kind, and the expression ignores them",
    "ROWMAX/MAX: the maximum is exact, so its merge order never matters",
    "FINALIZE: S1 + S2 rounded once, then correctly rounded division and sqrt",
)


def _why_structure(ops: Counter[Op], leaf_counts: Counter[str]) -> tuple[str, ...]:
    why = ["every merge has one fixed order, so every valid schedule of the DAG evaluates "
           "the same expression, with the same rounding at every node:"]
    pairwise = leaf_counts["pairwise"]
    if pairwise:
        why.append(f"SUMSQ pairwise leaves ({pairwise}): explicit halving, an order fixed "
                   "by the chunk length alone")
    if sum(leaf_counts.values()) - pairwise:
        why.append(f"SUMSQ native leaves ({sum(leaf_counts.values()) - pairwise}): torch.sum over one "
                   "chunk; its order is the backend's (see assumptions)")
    if ops[Op.ADD]:
        why.append(f"ADD ({ops[Op.ADD]}): an ordered binary merge, its left and right "
                   "operands fixed in the graph")
    if ops[Op.ACCUMULATE]:
        why.append(f"ACCUMULATE ({ops[Op.ACCUMULATE]}): at most two partials each; one "
                   "float addition commutes exactly (a+b == b+a), so arrival order is moot")
    if ops[Op.CATSUM]:
        why.append("CATSUM: one torch.sum over the partials in operand order; its inside "
                   "order is the backend's (see assumptions)")
    why.append("FINALIZE: division and sqrt are correctly rounded, so its bits are a "
               "function of its operands (in every casting mode: its casts and weight "
               "multiply are elementwise)")
    return tuple(why)


def _row_local(ops: Counter[Op]) -> tuple[str, ...]:
    said = {
        Op.INPUT: "INPUT: rows are independent; no node reads another row (a fused "
                  "residual add h = x + r is elementwise)",
        Op.ROWMAX: "ROWMAX/MAX: maxima of one row's squares (exact)",
        Op.SCALE: "SCALE: a per-row power of two from that row's maximum",
        Op.SUMSQ: "SUMSQ: reads one row's chunk x[a:b]; its order depends only on the "
                  "chunk length, never on the number of rows",
        Op.ADD: "ADD: elementwise on per-row partials",
        Op.ACCUMULATE: "ACCUMULATE: elementwise on per-row partials",
        Op.CATSUM: "CATSUM: concatenates and sums along the row only",
        Op.FINALIZE: "FINALIZE: elementwise on each row, from that row's total",
    }
    lines = [text for op, text in said.items() if ops[op]]
    lines.append("no node declares depends_on: the graph is a function of (hidden_size, "
                 "chunk_size, topology, leaf, accumulate) only, so the same argument holds "
                 "for every batch size, thread count and row tiling")
    return tuple(lines)


def _semantic_lines(graph: Graph, finalize: Node) -> tuple[str, ...]:
    """The canonical lines of the model-facing semantics (docs/design.md, "Casting modes, offset and the fused residual add")."""
    residual = any(n.op is Op.INPUT and n.attrs.get("residual") for n in graph.nodes)
    return (("input=x+residual",) if residual else ()) + (
        semantics(finalize) if finalize.op is Op.FINALIZE else ())


def _as_tuple(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]

