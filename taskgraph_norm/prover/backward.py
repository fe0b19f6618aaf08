"""Read the weight gradient's merge DAG (``topologies.build_weight_grad_graph``).

Pure Python over the IR, like :mod:`.canonical`.  A weight-gradient graph has ROWSUM
leaves (row blocks), ADD / ACCUMULATE merges, ROUND and OUTPUT.  Its canonical
expression names leaves by their rows: ``r[0:32]`` a float block (pairwise halving
over its rows), ``e[0:32]`` an exact block; ``(a+b)`` an ordered ADD, ``race{...}``
an arrival-order ACCUMULATE, ``all_reduce{...}`` a collective's, ``round(a)`` a
cast to the weight's dtype.  An exact graph's expression is only the rows it sums,
``exact_rows[0:128]``: every grouping of them gives one integer, so one form.

``dx``'s reduction is not here: it runs through the forward's graph (see
:func:`taskgraph_norm.topologies.build_input_grad_graph`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..graph import Graph, Op

__all__ = ["WeightGradReading", "is_weight_grad_graph", "read_weight_grad"]

_KNOWN = {
    Op.INPUT: frozenset(),
    Op.ROWSUM: frozenset({"start", "stop", "domain", "index", "micro_batch", "rank"}),
    Op.ADD: frozenset({"level"}),
    Op.ACCUMULATE: frozenset({"placement"}),
    Op.ROUND: frozenset(),
    Op.OUTPUT: frozenset(),
}

_WHY_EXACT = (
    "every ROWSUM leaf adds its products dy * x_hat exactly onto the accumulator's "
    "fixed-point grid (2^-320 units: every product of two fp32 values is a whole number "
    "of them), so a leaf is an integer per column",
    "every ADD / ACCUMULATE over exact partials is integer addition (the states are "
    "summed and normalised to their one balanced form): associative and commutative, "
    "so arrival order, the .grad carry across backward calls and an all-reduce(SUM) "
    "of the states all give the same integer",
    "ROUND: the integer rounded once, correctly, to the weight's dtype",
)


@dataclass(frozen=True)
class WeightGradReading:
    """What :func:`read_weight_grad` found; ``problem`` is set when it could not read."""

    expression: str
    canonical: str = ""
    problem: str | None = None
    exact: bool = False
    rows: int = 0
    races: tuple[tuple[str, int], ...] = ()  # float ACCUMULATEs of 3+ partials
    why_deterministic: tuple[str, ...] = ()
    why_invariant: tuple[str, ...] = ()  # micro-batch and world-size, same argument
    invariant: bool = False
    assumptions: tuple[str, ...] = ()


def is_weight_grad_graph(graph: Graph) -> bool:
    """Whether ``graph`` is a weight-gradient graph (it has ROWSUM leaves)."""
    return Op.ROWSUM in graph.ops


class _Unreadable(Exception):
    pass


def read_weight_grad(graph: Graph) -> WeightGradReading:
    """Read a validated weight-gradient graph.  Never raises: see ``problem``."""
    try:
        return _read(graph)
    except _Unreadable as exc:
        return WeightGradReading(expression="", problem=str(exc))


def _read(graph: Graph) -> WeightGradReading:
    exprs: dict[str, str] = {}
    domains: set[str] = set()
    rows: list[tuple[int, int]] = []
    rounds_inside = 0
    races: list[tuple[str, int]] = []
    for node in graph.topological_nodes:
        known = _KNOWN.get(node.op)
        if known is None:
            raise _Unreadable(f"node {node.id!r}: op {node.op.name} has no place in a "
                              "weight-gradient graph")
        unknown = set(node.attrs) - known
        if unknown:
            raise _Unreadable(f"node {node.id!r} ({node.op.name}) has attributes the prover "
                              f"does not understand: {sorted(unknown)}")
        args = [exprs[i] for i in node.inputs]
        if node.op is Op.INPUT:
            exprs[node.id] = "x"
            continue
        if "x" in args and node.op is not Op.ROWSUM:
            raise _Unreadable(f"node {node.id!r} ({node.op.name}) reads the rows directly")
        if node.op is Op.ROWSUM:
            start, stop, domain = (node.attrs.get(k) for k in ("start", "stop", "domain"))
            if not (type(start) is int and type(stop) is int and 0 <= start < stop):
                raise _Unreadable(f"node {node.id!r}: rows {start!r}:{stop!r} are not 0 <= start < stop")
            if domain not in ("float", "exact"):
                raise _Unreadable(f"node {node.id!r}: domain={domain!r} is not 'float' or 'exact'")
            domains.add(str(domain))
            rows.append((start, stop))
            exprs[node.id] = f"{'e' if domain == 'exact' else 'r'}[{start}:{stop}]"
        elif node.op is Op.ADD:
            exprs[node.id] = f"({args[0]}+{args[1]})"
        elif node.op is Op.ACCUMULATE:
            where = node.attrs.get("placement")
            if where not in (None, "all_reduce"):
                raise _Unreadable(f"node {node.id!r}: placement={where!r} is not 'all_reduce'")
            if len(args) >= 3:
                races.append((node.id, len(args)))
            exprs[node.id] = ("all_reduce{" if where else "race{") + ", ".join(sorted(args)) + "}"
        elif node.op is Op.ROUND:
            rounds_inside += graph.users[node.id] != (graph.output,)
            exprs[node.id] = f"round({args[0]})"
        else:
            exprs[node.id] = args[0]
    if len(domains) != 1:
        raise _Unreadable(f"the leaves mix domains {sorted(domains)}")
    total = _coverage(rows)
    expression = exprs[graph.output]
    if "exact" in domains:
        if rounds_inside or not expression.startswith("round("):
            raise _Unreadable("an exact weight-gradient graph rounds once, at its output")
        expression = f"round(exact_rows[0:{total}])"
        return WeightGradReading(
            expression=expression, canonical=f"weight_grad\nexact\n{expression}", exact=True,
            rows=total, why_deterministic=_WHY_EXACT, invariant=True,
            why_invariant=("exact: the integer sum of the same rows is the same for any "
                           "grouping of them into row blocks, backward calls (micro-batches) "
                           "and ranks, so the bits are the same at every micro-batching and "
                           "world size (a float all-reduce of rounded gradients would not be: "
                           "the ranks' integer states are summed instead)",),
        )
    ops = Counter(n.op for n in graph.nodes)
    why = ["every merge has one fixed order, so every schedule evaluates one expression:",
           f"ROWSUM float leaves ({ops[Op.ROWSUM]}): pairwise halving over the block's rows, "
           "an order fixed by the block length alone"]
    if ops[Op.ADD]:
        why.append(f"ADD ({ops[Op.ADD]}): the block tree of a backward call and the .grad += "
                   "of its calls in call order, operands fixed in the graph")
    assumptions: tuple[str, ...] = ()
    if ops[Op.ACCUMULATE] and not races:
        why.append("ACCUMULATE (all-reduce over 2 ranks): one float addition commutes")
        assumptions = ("two-partial ACCUMULATE: a+b and b+a have the same bits (IEEE 754, "
                       "except the payload of two NaNs)",)
    why.append("ROUND: a cast, a function of its operand")
    invariant = total <= 2
    reason = ("at most two rows: every grouping makes at most one addition, a+b == b+a"
              if invariant else
              "float: the order of the additions follows the grouping: the row blocks start "
              "at each backward call's first row, a call's sum is rounded before .grad += adds "
              "it, and an all-reduce adds the ranks' rounded sums; another micro-batching or "
              "world size regroups the same rows and rounds differently (a witness shows it)")
    return WeightGradReading(
        expression=expression, canonical=f"weight_grad\nfloat\n{expression}", rows=total,
        races=tuple(races), why_deterministic=tuple(why), invariant=invariant,
        why_invariant=(reason,), assumptions=assumptions,
    )


def _coverage(rows: list[tuple[int, int]]) -> int:
    """The number of rows the leaves cover, which must be ``[0:R)`` exactly once."""
    at = 0
    for start, stop in sorted(rows):
        if start != at:
            raise _Unreadable(f"the leaves do not cover rows [0:{stop}) exactly once "
                              f"(row {min(start, at)} is {'missing' if start > at else 'summed twice'})")
        at = stop
    return at
