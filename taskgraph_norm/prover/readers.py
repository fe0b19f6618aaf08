"""Read one node: the attributes each op may carry, the operand kinds it needs, and
one small reader per op that builds the node's value (a :class:`~.segments.Value`:
its canonical expression and what it sums) from its operands' values.

Anything a reader does not understand raises :class:`Unreadable`;
:func:`~.conclusions.read_graph` turns that into :attr:`~.conclusions.Reading.problem`.
Pure Python over the IR.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping

from ..graph import Node, Op
from .forms import Text, form, length, pair, render
from .segments import Value as _Value

__all__ = ["DEPENDENCIES", "PLACEMENTS", "PARTIAL_OPS", "Unreadable", "read_node",
           "dependence_mark", "semantics"]

DEPENDENCIES: tuple[str, ...] = ("batch_size", "thread_count", "row_tiling", "device")

#: Placements a node of a distributed graph may carry (besides an int, one rank).
PLACEMENTS: tuple[str, ...] = ("replicated", "sharded", "all_reduce")

#: Attributes each op may carry; ``index`` and ``level`` are labels no executor reads.
_KNOWN_ATTRS: Mapping[Op, frozenset[str]] = {
    Op.INPUT: frozenset({"residual"}),
    Op.SUMSQ: frozenset({"start", "stop", "leaf", "index", "domain", "centered"}),
    Op.SUM: frozenset({"start", "stop", "leaf", "index", "domain"}),
    Op.MEAN: frozenset({"hidden_size", "domain"}),
    Op.ADD: frozenset({"level"}),
    Op.ACCUMULATE: frozenset(),
    Op.CATSUM: frozenset(),
    Op.ROWMAX: frozenset({"start", "stop", "index", "power", "centered"}),
    Op.MAX: frozenset({"level"}),
    Op.SCALE: frozenset({"hidden_size"}),
    Op.RMSNORM: frozenset({"hidden_size"}),
    Op.LAYERNORM: frozenset({"hidden_size"}),
    Op.FINALIZE: frozenset({"hidden_size", "domain", "casting_mode", "offset", "norm"}),
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
    Op.LAYERNORM: ("x",),
    Op.MEAN: ("sum",),
    Op.FINALIZE: ("x", "partial"),
    Op.OUTPUT: ("y",),
}

#: The operand kinds of the ops whose count varies with their attributes (the
#: reader of each checks the count): SUM exact, ROWMAX centered, LayerNorm's FINALIZE.
_WIDEST: Mapping[Op, tuple[str, ...]] = {
    Op.SUM: ("x", "scale"),
    Op.ROWMAX: ("x", "mean"),
    Op.FINALIZE: ("x", "partial", "mean"),
}

#: The kinds of partial sums: RMSNorm's and the variance's sums of squares
#: (``partial``) and the mean's sums of ``x`` (``sum``); a merge takes one kind.
_PARTIAL_KINDS = frozenset({"partial", "sum"})

#: The operand kinds of a node of one or two operands, for the inline check.
_EXPECTED: Mapping[Op, tuple[str, ...]] = {
    op: (kinds[0][:-1],) * 2 if kinds[0].endswith("*") else kinds
    for op, kinds in _OPERAND_KINDS.items()
} | {Op.SUMSQ: ("x", "scale"), Op.SUM: ("x", "scale"), Op.ROWMAX: ("x", "mean")}

#: Ops whose result is a partial sum; their dependence marks live in the expression.
PARTIAL_OPS = frozenset({Op.SUMSQ, Op.SUM, Op.ADD, Op.ACCUMULATE, Op.CATSUM})


_pairs_of = operator.attrgetter("attrs.pairs")  # Node always stores an Attrs


class Unreadable(Exception):
    """Internal: the reader met something it does not understand."""


def read_node(node: Node, args: list[_Value], limit: int, annotated: list[Node]) -> _Value:
    op = node.op
    known = _KNOWN_ATTRS.get(op)
    if known is None:
        raise Unreadable(f"node {node.id!r}: op {op!r} is one the prover does not "
                          "understand")
    # One scan of the node (Node always stores an Attrs); every lookup below is a dict's.
    attrs: dict[str, object] = dict(_pairs_of(node))
    plain = known.issuperset(attrs)  # no depends_on, no placement, nothing unknown
    if not plain:
        unknown = set(attrs) - known - {"depends_on", "placement"}
        if unknown:
            raise Unreadable(f"node {node.id!r} ({op.name}) has attributes the prover "
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
        mark = dependence_mark(node)
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
    start, stop = attrs.get("start"), attrs.get("stop")
    if not (type(start) is int and type(stop) is int and 0 <= start < stop):
        start, stop = _bounds(node, attrs)  # says what is wrong
    name = "m"
    if len(attrs) > 3 or len(args) != 1:  # LayerNorm's: of |x| (power=1) or (x - mean)^2 (centered)
        centered, power = _flag(node, attrs, "centered"), attrs.get("power", 2)
        if isinstance(power, bool) or power not in (1, 2) or (centered and power != 2):
            raise Unreadable(f"node {node.id!r}: power={power!r} is not 1 or 2 (2 when centered)")
        if len(args) != 1 + centered:
            raise Unreadable(f"node {node.id!r}: ROWMAX takes (x, mean) when centered, else (x,)")
        name = "md" if centered else "mx" if power == 1 else "m"
    return _Value("max", f"{name}[{start}:{stop}]{mark}", (start, stop))


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
    norm = attrs.get("norm", "rms")
    if norm not in ("rms", "layer") or len(args) != (3 if norm == "layer" else 2):
        raise Unreadable(f"node {node.id!r}: norm={norm!r} with {len(args)} operands is not "
                          "'rms' with (x, total) or 'layer' with (x, total, mean)")
    if semantics(node) and norm == "layer":
        raise Unreadable(f"node {node.id!r}: LayerNorm's FINALIZE takes no casting_mode or offset")
    return _Value("y", args[1].expr, operands=(args[1],), scales=args[1].scales)


def _read_mean(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
               limit: int) -> _Value:
    _int_attr(node, attrs, "hidden_size", minimum=1)
    if attrs.get("domain", "float") not in ("float", "exact"):
        raise Unreadable(f"node {node.id!r}: domain={attrs['domain']!r} is not 'float' or 'exact'")
    return _Value("mean", form(("mean(", args[0].expr, ")" + mark)), operands=(args[0],),
                  scales=args[0].scales)


def _read_layernorm(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                    limit: int) -> _Value:
    return _Value("y", f"layer_norm(x[0:{_int_attr(node, attrs, 'hidden_size', minimum=1)}]){mark}")


def _read_output(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                 limit: int) -> _Value:
    return _Value("out", args[0].expr, operands=(args[0],), scales=args[0].scales)


def _read_input(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                limit: int) -> _Value:
    if attrs.get("residual", False) is not False and attrs["residual"] is not True:
        raise Unreadable(f"node {node.id!r}: residual={attrs['residual']!r} is not True or False")
    return _Value("x", "x" + mark)


def _listed(args: list[_Value]) -> Iterator[Text]:
    """The operands' expressions separated by ``", "``."""
    for k, arg in enumerate(args):
        if k:
            yield ", "
        yield arg.expr


_CASTING_MODES = ("torch", "llama", "gemma")


def semantics(node: Node) -> tuple[str, ...]:
    """FINALIZE's casting mode and offset, as canonical lines (none for the defaults,
    so a default graph's fingerprint is what it always was).  They change only
    the elementwise rounding after the reduction, never its order."""
    mode, offset = node.attrs.get("casting_mode", "torch"), node.attrs.get("offset", 0.0)
    if mode not in _CASTING_MODES:
        raise Unreadable(f"node {node.id!r}: casting_mode={mode!r} is not one of {list(_CASTING_MODES)}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset != offset:
        raise Unreadable(f"node {node.id!r}: offset={offset!r} is not a float")
    lines = []
    if mode != "torch":
        lines.append(f"casting_mode={mode}")
    if offset:
        lines.append(f"offset={float(offset)!r}")
    return tuple(lines)


def _check_operands(node: Node, args: list[_Value]) -> None:
    spec = _WIDEST.get(node.op) or _OPERAND_KINDS.get(node.op, ())
    if node.op is Op.SUMSQ:
        spec = ("x", "mean", "scale") if node.attrs.get("centered") else ("x", "scale")
    elif spec and spec[0].startswith("partial"):  # a merge: one kind of partial sum
        kinds = {arg.kind for arg in args}
        if len(kinds) == 1 and kinds <= _PARTIAL_KINDS:
            return
        if kinds <= _PARTIAL_KINDS:
            raise Unreadable(f"node {node.id!r} ({node.op.name}) merges sums of x with sums "
                              "of squares")
        spec = ("partial",) * len(args)
    elif spec and spec[0].endswith("*"):
        every = spec[0][:-1]
        if all(arg.kind == every for arg in args):
            return
        spec = (every,) * len(args)
    for pos, (arg, kind) in enumerate(zip(args, spec)):
        if arg.kind != kind:
            raise Unreadable(f"node {node.id!r} ({node.op.name}): operand {pos} is a "
                              f"{arg.kind!r} value, the prover expects a {kind!r} value")


def _check_placement(node: Node) -> None:
    """Where a node runs never enters its expression: values cross ranks only as
    copies, except in a collective reduction, whose order is the backend's and so
    must be an op whose operand order means nothing (ACCUMULATE, MAX)."""
    if "placement" not in node.attrs:
        return
    where = node.attrs["placement"]
    is_rank = isinstance(where, int) and not isinstance(where, bool) and where >= 0
    if not is_rank and where not in PLACEMENTS:
        raise Unreadable(f"node {node.id!r}: placement={where!r} is not a rank (int >= 0) "
                          f"or one of {list(PLACEMENTS)}")
    if where == "all_reduce" and node.op not in (Op.ACCUMULATE, Op.MAX):
        raise Unreadable(f"node {node.id!r}: an all_reduce adds in the backend's order, so "
                          f"it must be an ACCUMULATE or a MAX, not {node.op.name}")


def dependence_mark(node: Node) -> str:
    deps = node.attrs.get("depends_on", ())
    if isinstance(deps, str):
        deps = (deps,)
    if not isinstance(deps, tuple) or any(d not in DEPENDENCIES for d in deps):
        raise Unreadable(f"node {node.id!r}: depends_on={deps!r} is not a tuple of "
                          f"{list(DEPENDENCIES)}")
    return "@" + "+".join(sorted(set(deps))) if deps else ""


def _read_sumsq(node: Node, attrs: dict[str, object], args: list[_Value], mark: str,
                limit: int) -> _Value:
    """SUMSQ (``s``/``n``/``q``), its centered form (``sd``/``nd``/``qd``: LayerNorm's
    variance, operands ``(x, mean[, scale])``) and SUM (``sx``/``nx``/``qx``: the
    mean's leaves, a ``sum`` value)."""
    start, stop = attrs.get("start"), attrs.get("stop")
    if not (type(start) is int and type(stop) is int and 0 <= start < stop):
        start, stop = _bounds(node, attrs)  # says what is wrong
    leaf = attrs.get("leaf")
    domain = attrs.get("domain", "float")
    if leaf not in ("pairwise", "native") or domain not in ("float", "exact"):
        raise Unreadable(f"node {node.id!r}: leaf={leaf!r}, domain={domain!r} are not "
                          "('pairwise' | 'native', 'float' | 'exact')")
    centered = len(attrs) > 5 and _flag(node, attrs, "centered")  # builders' RMSNorm leaves have 5
    reads = 2 if centered else 1
    if len(args) != reads + (domain == "exact") or (centered and args[1].kind != "mean"):
        want = "(x, mean" if centered else "(x"
        raise Unreadable(f"node {node.id!r}: an exact leaf takes {want}, scale), a float "
                          f"leaf takes {want}) only")
    kind, suffix = ("sum", "x") if node.op is Op.SUM else ("partial", "d" if centered else "")
    if domain == "exact":
        return _Value(kind, f"q{suffix}[{start}:{stop}]{mark}", (start, stop),
                      scales=args[-1].scales)
    name = "s" if leaf == "pairwise" else "n"
    return _Value(kind, f"{name}{suffix}[{start}:{stop}]{mark}", (start, stop))


def _flag(node: Node, attrs: dict[str, object], name: str) -> bool:
    value = attrs.get(name, False)
    if value is not True and value is not False:
        raise Unreadable(f"node {node.id!r}: {name}={value!r} is not True or False")
    return value


_READERS = {
    Op.INPUT: _read_input, Op.SUMSQ: _read_sumsq, Op.ADD: _read_add,
    Op.ACCUMULATE: _read_accumulate, Op.CATSUM: _read_catsum, Op.ROWMAX: _read_rowmax,
    Op.MAX: _read_max, Op.SCALE: _read_scale, Op.RMSNORM: _read_rmsnorm,
    Op.FINALIZE: _read_finalize, Op.OUTPUT: _read_output, Op.SUM: _read_sumsq,
    Op.MEAN: _read_mean, Op.LAYERNORM: _read_layernorm,
}


def _merge(expr: Text, args: list[_Value], limit: int) -> _Value:
    if (len(expr) if type(expr) is str else length(expr)) > limit:
        raise Unreadable(f"the expression grows past {limit} characters")
    scales = args[0].scales
    for a in args:
        if a.scales is not scales:  # usually one shared set (or none)
            scales = frozenset().union(*(a.scales for a in args))
            break
    return _Value(args[0].kind, expr, operands=tuple(args), scales=scales)


def _bounds(node: Node, attrs: dict[str, object]) -> tuple[int, int]:
    start = _int_attr(node, attrs, "start", minimum=0)
    stop = _int_attr(node, attrs, "stop", minimum=start + 1)
    return start, stop


def _int_attr(node: Node, attrs: dict[str, object], name: str, *, minimum: int) -> int:
    value = attrs.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Unreadable(f"node {node.id!r}: {name}={value!r} is not an integer >= {minimum}")
    return value

