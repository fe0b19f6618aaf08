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

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..graph import Graph, Node, Op

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

#: Ops whose result is a partial sum; their dependence marks live in the expression.
_PARTIAL_OPS = frozenset({Op.SUMSQ, Op.ADD, Op.ACCUMULATE, Op.CATSUM})

#: Longest expression the reader builds; heavy operand sharing could otherwise
#: blow a small DAG up into an exponentially long tree.
_MAX_EXPRESSION = 4_000_000

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


@dataclass(frozen=True)
class _Value:
    kind: str  # "x", "partial", "max", "scale", "y" or "out"
    expr: str
    segments: tuple[tuple[int, int], ...] = ()  # summed (or maximised) ranges, with repeats
    scales: frozenset[str] = frozenset()  # ids of the SCALE nodes the exact leaves use
    hidden_size: int = 0  # SCALE: the D in its sigma


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


def read_graph(graph: Graph) -> Reading:
    """Read a validated graph.  Never raises for a graph it cannot read: see ``problem``."""
    values: dict[str, _Value] = {}
    try:
        for node_id in graph.topological_order:
            node = graph.by_id[node_id]
            values[node_id] = _read_node(node, [values[i] for i in node.inputs])
    except _Unreadable as exc:
        partial = next((v.expr for v in reversed(values.values()) if v.kind == "partial"), "")
        return Reading(expression=partial, problem=str(exc))
    exprs = {k: v.expr for k, v in values.items()}
    try:
        return _conclude(graph, values, exprs)
    except _Unreadable as exc:
        return Reading(expression="", problem=str(exc), node_expressions=exprs)


# --- one node ---------------------------------------------------------------------------


def _read_node(node: Node, args: list[_Value]) -> _Value:
    if node.op not in _KNOWN_ATTRS:
        raise _Unreadable(f"node {node.id!r}: op {node.op!r} is one the prover does not "
                          "understand")
    unknown = set(node.attrs) - _KNOWN_ATTRS[node.op] - {"depends_on", "placement"}
    if unknown:
        raise _Unreadable(f"node {node.id!r} ({node.op.name}) has attributes the prover "
                          f"does not understand: {sorted(unknown)}")
    _check_operands(node, args)
    _check_placement(node)
    mark = _dependence_mark(node)
    if node.op is Op.SUMSQ:
        return _read_sumsq(node, args, mark)
    if node.op is Op.ADD:
        return _merge(f"({args[0].expr}+{args[1].expr}){mark}", args)
    if node.op is Op.ACCUMULATE:
        # Arrival order is not in the graph, so operands are listed in a canonical
        # order: by the elements they sum, then by form (never by id).
        ordered = sorted(args, key=lambda a: (a.segments, a.expr))
        return _merge("race{" + ", ".join(a.expr for a in ordered) + "}" + mark, args)
    if node.op is Op.CATSUM:
        return _merge("catsum(" + ", ".join(a.expr for a in args) + ")" + mark, args)
    if node.op is Op.ROWMAX:
        start, stop = _bounds(node)
        return _Value("max", f"m[{start}:{stop}]{mark}", ((start, stop),))
    if node.op is Op.MAX:
        return _Value("max", f"max({args[0].expr}, {args[1].expr}){mark}",
                      args[0].segments + args[1].segments)
    if node.op is Op.SCALE:
        size = _int_attr(node, "hidden_size", minimum=1)
        return _Value("scale", f"scale[{size}]({args[0].expr}){mark}", args[0].segments,
                      frozenset({node.id}), size)
    if node.op is Op.RMSNORM:
        return _Value("y", f"rms_norm(x[0:{_int_attr(node, 'hidden_size', minimum=1)}]){mark}")
    if node.op is Op.FINALIZE:
        _int_attr(node, "hidden_size", minimum=1)
        _semantics(node)
        return _Value("y", args[1].expr, args[1].segments, args[1].scales)
    if node.op is Op.OUTPUT:
        return _Value("out", args[0].expr, args[0].segments, args[0].scales)
    if node.attrs.get("residual", False) is not False and node.attrs["residual"] is not True:
        raise _Unreadable(f"node {node.id!r}: residual={node.attrs['residual']!r} is not True or False")
    return _Value("x", "x" + mark)


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
    if node.op is Op.SUMSQ:
        want = ("x", "scale")[: len(args)]
    else:
        spec = _OPERAND_KINDS.get(node.op, ())
        want = (spec[0][:-1],) * len(args) if spec and spec[0].endswith("*") else spec
    for pos, (arg, kind) in enumerate(zip(args, want)):
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
    placed = [n for n in graph.nodes if "placement" in n.attrs]
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


def _read_sumsq(node: Node, args: list[_Value], mark: str) -> _Value:
    start, stop = _bounds(node)
    leaf = node.attrs.get("leaf")
    domain = node.attrs.get("domain", "float")
    if leaf not in ("pairwise", "native") or domain not in ("float", "exact"):
        raise _Unreadable(f"node {node.id!r}: leaf={leaf!r}, domain={domain!r} are not "
                          "('pairwise' | 'native', 'float' | 'exact')")
    if (domain == "exact") != (len(args) == 2):
        raise _Unreadable(f"node {node.id!r}: an exact leaf takes (x, scale), a float "
                          "leaf takes (x,) only")
    if domain == "exact":
        return _Value("partial", f"q[{start}:{stop}]{mark}", ((start, stop),),
                      args[1].scales)
    name = "s" if leaf == "pairwise" else "n"
    return _Value("partial", f"{name}[{start}:{stop}]{mark}", ((start, stop),))


def _merge(expr: str, args: list[_Value]) -> _Value:
    if len(expr) > _MAX_EXPRESSION:
        raise _Unreadable(f"the expression grows past {_MAX_EXPRESSION} characters")
    segments = tuple(s for a in args for s in a.segments)
    return _Value("partial", expr, segments, frozenset().union(*(a.scales for a in args)))


def _bounds(node: Node) -> tuple[int, int]:
    start = _int_attr(node, "start", minimum=0)
    stop = _int_attr(node, "stop", minimum=start + 1)
    return start, stop


def _int_attr(node: Node, name: str, *, minimum: int) -> int:
    value = node.attrs.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Unreadable(f"node {node.id!r}: {name}={value!r} is not an integer >= {minimum}")
    return value


# --- the whole graph --------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """What every conclusion needs about the whole graph."""

    graph: Graph
    values: Mapping[str, _Value]
    exprs: dict[str, str]
    ops: Counter[Op]
    marks: tuple[str, ...]  # dependence marks of nodes outside the expression
    deps: tuple[str, ...]  # every dependence any node declares
    blockers: tuple[str, ...]  # why batch invariance cannot be certified


def _conclude(graph: Graph, values: Mapping[str, _Value], exprs: dict[str, str]) -> Reading:
    deps = tuple(sorted({d for n in graph.nodes for d in _as_tuple(n.attrs.get("depends_on", ()))}))
    facts = _Facts(
        graph, values, exprs, Counter(n.op for n in graph.nodes),
        marks=tuple(sorted(
            f"{n.op.value}{_dependence_mark(n)}" for n in graph.nodes
            if n.attrs.get("depends_on") and n.op not in _PARTIAL_OPS
        )),
        deps=deps,
        blockers=tuple(
            f"a node declares depends_on={d!r}: the graph is not a function of the "
            "configuration alone, so a row's bits may change with the " + d.replace("_", " ")
            for d in deps
        ),
    )
    last = graph.by_id[graph.by_id[graph.output].inputs[0]]
    if last.op is Op.RMSNORM:
        return _conclude_standard(facts, last)
    leaves = [n for n in graph.nodes if n.op is Op.SUMSQ]
    domains = {n.attrs.get("domain", "float") for n in leaves}
    if len(domains) != 1 or last.attrs.get("domain", "float") not in domains:
        raise _Unreadable("the graph mixes exact-domain and float-domain nodes "
                          f"(leaves: {sorted(domains)}, FINALIZE: "
                          f"{last.attrs.get('domain', 'float')!r})")
    if "exact" in domains:
        return _conclude_exact(facts, last)
    return _conclude_float(facts, last, leaves)


def _conclude_standard(facts: _Facts, rmsnorm: Node) -> Reading:
    expression = facts.values[rmsnorm.id].expr
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
    )


def _conclude_float(facts: _Facts, finalize: Node, leaves: list[Node]) -> Reading:
    hidden = int(finalize.attrs["hidden_size"])
    total = facts.values[finalize.inputs[1]]
    races = tuple(
        (n.id, len(n.inputs)) for n in facts.graph.nodes
        if n.op is Op.ACCUMULATE and len(n.inputs) >= 3
    )
    assumptions = []
    if any(n.attrs.get("leaf") == "native" for n in leaves):
        assumptions.append(_ASSUME_NATIVE)
    if facts.ops[Op.CATSUM]:
        assumptions.append(_ASSUME_CATSUM)
    if any(n.op is Op.ACCUMULATE and len(n.inputs) == 2 for n in facts.graph.nodes):
        assumptions.append(_ASSUME_TWO_WAY)
    return Reading(
        expression=total.expr,
        canonical="\n".join(["float", f"D={hidden}", total.expr, *facts.marks,
                               *_semantic_lines(facts.graph, finalize)]),
        races=races,
        assumptions=tuple(assumptions),
        why_deterministic=_why_structure(facts.ops, leaves)
        + (_coverage_note(total.segments, hidden),),
        row_local=_row_local(facts.ops),
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
    )


def _conclude_exact(facts: _Facts, finalize: Node) -> Reading:
    hidden = int(finalize.attrs["hidden_size"])
    total = facts.values[finalize.inputs[1]]
    if len(total.scales) != 1:
        raise _Unreadable("exact leaves must share one SCALE node, found "
                          f"{len(total.scales)}")
    scale = facts.values[next(iter(total.scales))]
    summed = _merged(total.segments)
    maximised = _merged(scale.segments)
    if not _contains(maximised, summed):
        raise _Unreadable("the SCALE's row maximum does not cover every summed element, "
                          "so the pre-rounding grid may be too fine for exact sums")
    count = sum(b - a for a, b in total.segments)
    if count > scale.hidden_size:
        raise _Unreadable(f"{count} summed squares exceed the {scale.hidden_size} the SCALE "
                          "sized its grid for, so a partial sum could round")
    expression = "exact_sum(" + ", ".join(_segment_text(s) for s in _multiset(total.segments))
    if maximised != summed:
        expression += "; max over " + ", ".join(f"x[{a}:{b}]" for a, b in maximised)
    expression += ")" + ("@" + "+".join(facts.deps) if facts.deps else "")
    return Reading(
        expression=expression,
        canonical="\n".join(["exact", f"D={hidden}", f"sigma_D={scale.hidden_size}",
                             expression, *facts.marks, *_semantic_lines(facts.graph, finalize)]),
        exact=True,
        assumptions=(_ASSUME_EXACT,),
        why_deterministic=_WHY_EXACT + (_coverage_note(total.segments, hidden),),
        row_local=_row_local(facts.ops),
        batch_blockers=facts.blockers,
        node_expressions=facts.exprs,
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


def _why_structure(ops: Counter[Op], leaves: list[Node]) -> tuple[str, ...]:
    why = ["every merge has one fixed order, so every valid schedule of the DAG evaluates "
           "the same expression, with the same rounding at every node:"]
    pairwise = sum(1 for n in leaves if n.attrs.get("leaf") == "pairwise")
    if pairwise:
        why.append(f"SUMSQ pairwise leaves ({pairwise}): explicit halving, an order fixed "
                   "by the chunk length alone")
    if len(leaves) - pairwise:
        why.append(f"SUMSQ native leaves ({len(leaves) - pairwise}): torch.sum over one "
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


def _coverage_note(segments: tuple[tuple[int, int], ...], hidden: int) -> str:
    if _multiset(segments) == [(0, hidden, 1)]:
        return f"the leaves cover x[0:{hidden}] exactly once"
    return (f"note: the leaves do not cover x[0:{hidden}] exactly once "
            f"({', '.join(_segment_text(s) for s in _multiset(segments))}); the result is "
            "deterministic but it is not the RMSNorm of x")


def _multiset(segments: tuple[tuple[int, int], ...]) -> list[tuple[int, int, int]]:
    """Ranges with multiplicity ``(start, stop, times)``, sorted, adjacent equal merged."""
    delta: Counter[int] = Counter()
    for a, b in segments:
        delta[a] += 1
        delta[b] -= 1
    out: list[tuple[int, int, int]] = []
    depth, prev = 0, 0
    for pos in sorted(delta):
        if depth and pos > prev:
            if out and out[-1][1] == prev and out[-1][2] == depth:
                out[-1] = (out[-1][0], pos, depth)
            else:
                out.append((prev, pos, depth))
        depth += delta[pos]
        prev = pos
    return out


def _merged(segments: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b, _ in _multiset(segments):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _contains(outer: list[tuple[int, int]], inner: list[tuple[int, int]]) -> bool:
    return all(any(a <= c and d <= b for a, b in outer) for c, d in inner)


def _segment_text(seg: tuple[int, int, int]) -> str:
    a, b, times = seg
    return f"x[{a}:{b}]" if times == 1 else f"{times}*x[{a}:{b}]"


def _as_tuple(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]
