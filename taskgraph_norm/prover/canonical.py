"""Read a merge DAG into its canonical expression and the facts the prover needs.

Pure Python over the IR.  Every node gets a canonical expression built only from
what it computes: leaves are named by their chunk bounds (``s[0:64]`` a pairwise
leaf, ``n[0:64]`` a native ``torch.sum`` leaf, ``q[0:64]`` a pre-rounded exact
leaf), ``(a+b)`` is an ordered ADD, ``race{a, b, c}`` an arrival-order
ACCUMULATE (operands sorted: their order means nothing), ``catsum(a, b)`` a
CATSUM.  Node ids never appear, so relabelling a graph never changes its form.

A node may declare ``depends_on=("batch_size", ...)`` (values from
:data:`taskgraph_norm.prover.rules.DEPENDENCIES`): a builder never does, and a hand-made
graph that does is marked ``@batch_size`` in the expression and is never
certified batch-invariant.  Any attribute or operand the reader does not
understand sets :attr:`Reading.problem`: the prover then refuses to certify.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from ..graph import Attrs, Graph, Node, Op
from .forms import Text, form, length, pair, render
from .segments import Value as _Value
from .segments import contains, coverage_note, merged, multiset, segment_text, weighted_segments

__all__ = ["Reading", "read_graph", "read_placement", "DEPENDENCIES", "PLACEMENTS"]

DEPENDENCIES: tuple[str, ...] = ("batch_size", "thread_count", "row_tiling", "device")

#: Attributes each op may carry; ``index`` and ``level`` are labels no executor reads.
_KNOWN_ATTRS: Mapping[Op, frozenset[str]] = {
    Op.INPUT: frozenset({"residual"}),
    Op.SUMSQ: frozenset({"start", "stop", "leaf", "index", "domain"}),
    Op.ADD: frozenset({"level"}),
    Op.ACCUMULATE: frozenset(),
    Op.CATSUM: frozenset(),
    Op.ROWMAX: frozenset({"start", "stop", "index"}),
    Op.MAX: frozenset({"level"}),
    Op.SCALE: frozenset({"hidden_size"}),
    Op.RMSNORM: frozenset({"hidden_size"}),
    Op.FINALIZE: frozenset({"hidden_size", "domain", "casting_mode", "offset"}),
    Op.OUTPUT: frozenset(),
}

#: What kind of value each op needs as operands (``*``: every operand).
_OPERAND_KINDS: Mapping[Op, tuple[str, ...]] = {
    Op.ADD: ("partial", "partial"),
    Op.ACCUMULATE: ("partial*",),
    Op.CATSUM: ("partial*",),
    Op.ROWMAX: ("x",),
    Op.MAX: ("max", "max"),
    Op.SCALE: ("max",),
    Op.RMSNORM: ("x",),
    Op.FINALIZE: ("x", "partial"),
    Op.OUTPUT: ("y",),
}

#: The operand kinds of a node of one or two operands, for the inline check.
_EXPECTED: Mapping[Op, tuple[str, ...]] = {
    op: (kinds[0][:-1],) * 2 if kinds[0].endswith("*") else kinds
    for op, kinds in _OPERAND_KINDS.items()
} | {Op.SUMSQ: ("x", "scale")}

#: Ops whose result is a partial sum; their dependence marks live in the expression.
_PARTIAL_OPS = frozenset({Op.SUMSQ, Op.ADD, Op.ACCUMULATE, Op.CATSUM})

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


class _Unreadable(Exception):
    """Internal: the reader met something it does not understand."""


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
    assumptions: tuple[str, ...] = ()
    why_deterministic: tuple[str, ...] = ()
    row_local: tuple[str, ...] = ()
    batch_blockers: tuple[str, ...] = ()
    node_expressions: Mapping[str, str] = field(default_factory=dict)
    annotated: tuple[Node, ...] = ()  # nodes with a depends_on or placement attribute


def read_graph(graph: Graph) -> Reading:
    """Read a validated graph.  Never raises for a graph it cannot read: see ``problem``.

    Linear in the graph and its expression's length: expressions are built as
    shared :class:`~.forms.Form` pieces and rendered once, segments are walked only
    where they are read.
    """
    values: dict[str, _Value] = {}
    annotated: list[Node] = []
    limit = max(_MAX_EXPRESSION, _MAX_EXPRESSION_PER_NODE * len(graph))
    value_of = values.__getitem__
    try:
        for index, node in enumerate(graph.topological_nodes):
            value = _read_node(node, list(map(value_of, node.inputs)), limit, annotated)
            value.index = index
            values[node.id] = value
    except _Unreadable as exc:
        partial = next((v.expr for v in reversed(values.values()) if v.kind == "partial"), "")
        return Reading(expression=render(partial), problem=str(exc))
    exprs = _Expressions(values)
    try:
        return _conclude(graph, values, exprs, tuple(annotated))
    except _Unreadable as exc:
        return Reading(expression="", problem=str(exc), node_expressions=exprs)


# --- one node ---------------------------------------------------------------------------


def _read_node(node: Node, args: list[_Value], limit: int, annotated: list[Node]) -> _Value:
    op = node.op
    known = _KNOWN_ATTRS.get(op)
    if known is None:
        raise _Unreadable(f"node {node.id!r}: op {op!r} is one the prover does not "
                          "understand")
    # One scan of the node (Node always stores an Attrs); every lookup below is a dict's.
    attrs = dict(cast(Attrs, node.attrs).pairs)
    plain = known.issuperset(attrs)  # no depends_on, no placement, nothing unknown
    if not plain:
        unknown = set(attrs) - known - {"depends_on", "placement"}
        if unknown:
            raise _Unreadable(f"node {node.id!r} ({op.name}) has attributes the prover "
                              f"does not understand: {sorted(unknown)}")
    # The usual operand kinds, checked inline; anything else gets the full check.
    want = _EXPECTED.get(op, ())
    count = len(args)
    if not (count == 0 or (count == 1 and args[0].kind == want[0])
            or (count == 2 and args[0].kind == want[0] and args[1].kind == want[1])):
        _check_operands(node, args)
    mark = ""
    if not plain:
        annotated.append(node)
        _check_placement(node)
        mark = _dependence_mark(node)
    return _READERS[op](node, attrs, args, mark, limit)


def _read_add(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
              limit: int) -> _Value:
    return _merge(pair("(", args[0].expr, "+", args[1].expr, ")" + mark), args, limit)


def _read_accumulate(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                     limit: int) -> _Value:
    # Arrival order is not in the graph, so operands are listed in a canonical
    # order: by the elements they sum, then by form (never by id).
    ordered = sorted(args, key=lambda a: (a.segments(), render(a.expr)))
    return _merge(form(("race{", *_listed(ordered), "}" + mark)), args, limit)


def _read_catsum(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                 limit: int) -> _Value:
    return _merge(form(("catsum(", *_listed(args), ")" + mark)), args, limit)


def _read_rowmax(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                 limit: int) -> _Value:
    start, stop = _bounds(node, attrs)
    return _Value("max", f"m[{start}:{stop}]{mark}", (start, stop))


def _read_max(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
              limit: int) -> _Value:
    return _Value("max", pair("max(", args[0].expr, ", ", args[1].expr, ")" + mark),
                  operands=(args[0], args[1]))


def _read_scale(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                limit: int) -> _Value:
    size = _int_attr(node, attrs, "hidden_size", minimum=1)
    return _Value("scale", form((f"scale[{size}](", args[0].expr, ")" + mark)),
                  operands=(args[0],), scales=frozenset({node.id}), hidden_size=size)


def _read_rmsnorm(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                  limit: int) -> _Value:
    return _Value("y", f"rms_norm(x[0:{_int_attr(node, attrs, 'hidden_size', minimum=1)}]){mark}")


def _read_finalize(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                   limit: int) -> _Value:
    _int_attr(node, attrs, "hidden_size", minimum=1)
    _semantics(node)
    return _Value("y", args[1].expr, operands=(args[1],), scales=args[1].scales)


def _read_output(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                 limit: int) -> _Value:
    return _Value("out", args[0].expr, operands=(args[0],), scales=args[0].scales)


def _read_input(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                limit: int) -> _Value:
    if attrs.get("residual", False) is not False and attrs["residual"] is not True:
        raise _Unreadable(f"node {node.id!r}: residual={attrs['residual']!r} is not True or False")
    return _Value("x", "x" + mark)


def _listed(args: list[_Value]) -> Iterator[Text]:
    """The operands' expressions separated by ``", "``."""
    for k, arg in enumerate(args):
        if k:
            yield ", "
        yield arg.expr


_CASTING_MODES = ("torch", "llama", "gemma")


def _semantics(node: Node) -> tuple[str, ...]:
    """FINALIZE's casting mode and offset, as canonical lines (none for the defaults,
    so a default graph's fingerprint is what it always was).  They change only
    the elementwise rounding after the reduction, never its order."""
    mode, offset = node.attrs.get("casting_mode", "torch"), node.attrs.get("offset", 0.0)
    if mode not in _CASTING_MODES:
        raise _Unreadable(f"node {node.id!r}: casting_mode={mode!r} is not one of {list(_CASTING_MODES)}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset != offset:
        raise _Unreadable(f"node {node.id!r}: offset={offset!r} is not a float")
    lines = []
    if mode != "torch":
        lines.append(f"casting_mode={mode}")
    if offset:
        lines.append(f"offset={float(offset)!r}")
    return tuple(lines)


def _semantic_lines(graph: Graph, finalize: Node) -> tuple[str, ...]:
    """The canonical lines of the model-facing semantics (section 10 of the design)."""
    residual = any(n.op is Op.INPUT and n.attrs.get("residual") for n in graph.nodes)
    return (("input=x+residual",) if residual else ()) + (
        _semantics(finalize) if finalize.op is Op.FINALIZE else ())


def _check_operands(node: Node, args: list[_Value]) -> None:
    spec = _OPERAND_KINDS.get(node.op, ())
    if node.op is Op.SUMSQ:
        spec = ("x", "scale")
    elif spec and spec[0].endswith("*"):
        every = spec[0][:-1]
        if all(arg.kind == every for arg in args):
            return
        spec = (every,) * len(args)
    for pos, (arg, kind) in enumerate(zip(args, spec)):
        if arg.kind != kind:
            raise _Unreadable(f"node {node.id!r} ({node.op.name}): operand {pos} is a "
                              f"{arg.kind!r} value, the prover expects a {kind!r} value")


#: Placements a node of a distributed graph may carry (besides an int, one rank).
PLACEMENTS: tuple[str, ...] = ("replicated", "sharded", "all_reduce")


def _check_placement(node: Node) -> None:
    """Where a node runs never enters its expression: values cross ranks only as
    copies, except in a collective reduction, whose order is the backend's and so
    must be an op whose operand order means nothing (ACCUMULATE, MAX)."""
    if "placement" not in node.attrs:
        return
    where = node.attrs["placement"]
    is_rank = isinstance(where, int) and not isinstance(where, bool) and where >= 0
    if not is_rank and where not in PLACEMENTS:
        raise _Unreadable(f"node {node.id!r}: placement={where!r} is not a rank (int >= 0) "
                          f"or one of {list(PLACEMENTS)}")
    if where == "all_reduce" and node.op not in (Op.ACCUMULATE, Op.MAX):
        raise _Unreadable(f"node {node.id!r}: an all_reduce adds in the backend's order, so "
                          f"it must be an ACCUMULATE or a MAX, not {node.op.name}")


#: What a placed graph takes on trust about the collectives.
ASSUME_COLLECTIVES = (
    "distributed: the collectives deliver every byte unchanged (all-gather, broadcast) and "
    "an all-reduce combines with IEEE operations (max; fp64 round-to-nearest addition), as "
    "gloo and nccl do; no compression or reduced-precision transport"
)


def read_placement(graph: Graph, reading: Reading, rule: str) -> tuple[bool | None, tuple[str, ...]]:
    """Is the graph's result the same at every world size, and why.

    ``(None, ())`` for a graph without ``placement`` attributes (one process).  A
    placed graph is world-size invariant when its reduction does not depend on where
    nodes run: always in the exact domain, and in the float domain when its
    expression is that of the single-process graph its ``meta`` names.
    """
    # A reading that stopped early has not seen every node: look at them all.
    seen = graph.nodes if reading.problem is not None else reading.annotated
    placed = [n for n in seen if "placement" in n.attrs]
    if not placed:
        return None, ()
    ranks = sorted({n.attrs["placement"] for n in placed if isinstance(n.attrs["placement"], int)})
    world = graph.meta.get("world_size", (ranks[-1] + 1) if ranks else 1)
    collectives = sum(1 for n in placed if n.attrs["placement"] == "all_reduce")
    where = (f"the graph spans {world} rank(s); placement says where each node runs, and "
             "values cross ranks as copies (an all-gather moves partials and raw elements "
             f"bit for bit)" + (f" or through {collectives} all-reduce node(s)" if collectives else ""))
    if rule in ("refuted", "unknown"):
        return False, (where, "the graph is not certified deterministic, so the world size "
                              "cannot be shown not to matter")
    if rule == "exact":
        return True, (where, "exact domain: the MAX all-reduce is exact in any order and the "
                      "SUM all-reduce adds pre-rounded pairs whose every partial sum is a "
                      "multiple of the row's grid unit below 2^53 units (the scale is sized for "
                      "the global D and maximum), so every addition is exact whichever rank or "
                      "collective algorithm makes it: the bits are the single-process bits at "
                      "every world size")
    reference = _single_process_expression(graph.meta)
    if reference is None:
        return False, (where, "meta names no single-process configuration (hidden_size, "
                       "chunk_size, topology, leaf, accumulate) whose expression this graph "
                       "would have to equal")
    if reference != reading.expression:
        return False, (where, "the expression differs from the single-process graph's for the "
                       "same options: the reduction follows the shard boundaries, so its "
                       "rounding changes with the world size")
    return True, (where, "the expression is exactly the single-process graph's for the same "
                  "(hidden_size, chunk_size, topology, leaf, accumulate): chunks are global, "
                  "and every merge keeps its operands and their order wherever it runs, so "
                  "every rank gets the single-process bits at every world size")


def _single_process_expression(meta: Mapping[str, object]) -> str | None:
    from ..topologies import ACCUMULATES, LEAVES, TOPOLOGIES, build_graph

    try:
        hidden, chunk = meta["hidden_size"], meta["chunk_size"]
        topology, leaf, accumulate = meta["topology"], meta["leaf"], meta["accumulate"]
    except KeyError:
        return None
    if (topology not in TOPOLOGIES or leaf not in LEAVES or accumulate not in ACCUMULATES
            or not isinstance(hidden, int) or not isinstance(chunk, int)):
        return None
    single = build_graph(hidden, chunk_size=chunk, topology=str(topology), leaf=str(leaf),
                         accumulate=str(accumulate))
    return read_graph(single).expression


def _dependence_mark(node: Node) -> str:
    deps = node.attrs.get("depends_on", ())
    if isinstance(deps, str):
        deps = (deps,)
    if not isinstance(deps, tuple) or any(d not in DEPENDENCIES for d in deps):
        raise _Unreadable(f"node {node.id!r}: depends_on={deps!r} is not a tuple of "
                          f"{list(DEPENDENCIES)}")
    return "@" + "+".join(sorted(set(deps))) if deps else ""


def _read_sumsq(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                limit: int) -> _Value:
    start, stop = attrs.get("start"), attrs.get("stop")
    if not (type(start) is int and type(stop) is int and 0 <= start < stop):
        start, stop = _bounds(node, attrs)  # says what is wrong
    leaf = attrs.get("leaf")
    domain = attrs.get("domain", "float")
    if leaf not in ("pairwise", "native") or domain not in ("float", "exact"):
        raise _Unreadable(f"node {node.id!r}: leaf={leaf!r}, domain={domain!r} are not "
                          "('pairwise' | 'native', 'float' | 'exact')")
    if (domain == "exact") != (len(args) == 2):
        raise _Unreadable(f"node {node.id!r}: an exact leaf takes (x, scale), a float "
                          "leaf takes (x,) only")
    if domain == "exact":
        return _Value("partial", f"q[{start}:{stop}]{mark}", (start, stop),
                      scales=args[1].scales)
    name = "s" if leaf == "pairwise" else "n"
    return _Value("partial", f"{name}[{start}:{stop}]{mark}", (start, stop))


_READERS = {
    Op.INPUT: _read_input, Op.SUMSQ: _read_sumsq, Op.ADD: _read_add,
    Op.ACCUMULATE: _read_accumulate, Op.CATSUM: _read_catsum, Op.ROWMAX: _read_rowmax,
    Op.MAX: _read_max, Op.SCALE: _read_scale, Op.RMSNORM: _read_rmsnorm,
    Op.FINALIZE: _read_finalize, Op.OUTPUT: _read_output,
}


def _merge(expr: Text, args: list[_Value], limit: int) -> _Value:
    if length(expr) > limit:
        raise _Unreadable(f"the expression grows past {limit} characters")
    scales = args[0].scales
    for a in args:
        if a.scales is not scales:  # usually one shared set (or none)
            scales = frozenset().union(*(a.scales for a in args))
            break
    return _Value("partial", expr, operands=tuple(args), scales=scales)


def _bounds(node: Node, attrs: dict[str, object]) -> tuple[int, int]:
    start = _int_attr(node, attrs, "start", minimum=0)
    stop = _int_attr(node, attrs, "stop", minimum=start + 1)
    return start, stop


def _int_attr(node: Node, attrs: dict[str, object], name: str, *, minimum: int) -> int:
    value = attrs.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Unreadable(f"node {node.id!r}: {name}={value!r} is not an integer >= {minimum}")
    return value


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


def _conclude(graph: Graph, values: Mapping[str, _Value], exprs: Mapping[str, str],
              annotated: tuple[Node, ...]) -> Reading:
    declaring = [n for n in annotated if "depends_on" in n.attrs]
    deps = tuple(sorted({d for n in declaring for d in _as_tuple(n.attrs["depends_on"])}))
    facts = _Facts(
        graph, values, tuple(values.values()), exprs, Counter(map(_op_of, graph.nodes)),
        marks=tuple(sorted(
            f"{n.op.value}{_dependence_mark(n)}" for n in declaring
            if n.attrs["depends_on"] and n.op not in _PARTIAL_OPS
        )),
        deps=deps,
        blockers=tuple(
            f"a node declares depends_on={d!r}: the graph is not a function of the "
            "configuration alone, so a row's bits may change with the " + d.replace("_", " ")
            for d in deps
        ),
        annotated=annotated,
    )
    last = _node(graph, _node(graph, graph.output).inputs[0])
    if last.op is Op.RMSNORM:
        return _conclude_standard(facts, last)
    leaves = [n for n in graph.nodes if n.op is Op.SUMSQ]
    kinds = Counter((n.attrs.get("leaf"), n.attrs.get("domain", "float")) for n in leaves)
    domains = {domain for _, domain in kinds}
    if len(domains) != 1 or last.attrs.get("domain", "float") not in domains:
        raise _Unreadable("the graph mixes exact-domain and float-domain nodes "
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
        + (coverage_note(weighted_segments(total, facts.order), hidden),),
        row_local=_row_local(facts.ops),
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
        annotated=facts.annotated,
    )


def _conclude_exact(facts: _Facts, finalize: Node) -> Reading:
    hidden = int(finalize.attrs["hidden_size"])
    total = facts.values[finalize.inputs[1]]
    if len(total.scales) != 1:
        raise _Unreadable("exact leaves must share one SCALE node, found "
                          f"{len(total.scales)}")
    scale = facts.values[next(iter(total.scales))]
    segments = weighted_segments(total, facts.order)
    summed = merged(segments)
    maximised = merged(weighted_segments(scale, facts.order))
    if not contains(maximised, summed):
        raise _Unreadable("the SCALE's row maximum does not cover every summed element, "
                          "so the pre-rounding grid may be too fine for exact sums")
    count = sum((b - a) * times for (a, b), times in segments)
    if count > scale.hidden_size:
        raise _Unreadable(f"{count} summed squares exceed the {scale.hidden_size} the SCALE "
                          "sized its grid for, so a partial sum could round")
    expression = "exact_sum(" + ", ".join(segment_text(s) for s in multiset(segments))
    if maximised != summed:
        expression += "; max over " + ", ".join(f"x[{a}:{b}]" for a, b in maximised)
    expression += ")" + ("@" + "+".join(facts.deps) if facts.deps else "")
    return Reading(
        expression=expression,
        canonical="\n".join(["exact", f"D={hidden}", f"sigma_D={scale.hidden_size}",
                             expression, *facts.marks, *_semantic_lines(facts.graph, finalize)]),
        exact=True,
        assumptions=(_ASSUME_EXACT,),
        why_deterministic=_WHY_EXACT + (coverage_note(segments, hidden),),
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


def _as_tuple(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]
