"""The merge-DAG IR: frozen nodes with ordered operands, an immutable graph, validation.

This module is pure Python on purpose: it imports neither torch nor anything
else of ours, so the prover and the drawing code can read graphs without
loading a tensor library.  Operand order is semantics (``ADD(a, b)`` is not
``ADD(b, a)`` once rounding is involved), so inputs are tuples, never sets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import itertools
import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import CycleError, GraphError

if TYPE_CHECKING:
    import networkx as nx  # type: ignore[import-untyped]

__all__ = ["Op", "Attrs", "Node", "Graph", "validate", "ancestors", "ARITY", "gc_paused"]


class Op(enum.Enum):
    """The operations a node may perform.  Each value's docstring is its semantics."""

    INPUT = "input"
    """The input tensor ``x`` of shape ``(..., D)``; no operands.  With attr
    ``residual=True`` its value is ``h = x + residual`` rounded to ``x.dtype`` (one
    elementwise add; the executor also hands ``h`` back), and the graph normalises ``h``."""
    SUMSQ = "sumsq"
    """Sum of squares of ``x[..., start:stop]`` per row (attrs ``start``, ``stop``,
    ``leaf``).  ``leaf="pairwise"`` sums by explicit halving (see kernels), so its
    order is fully specified; ``leaf="native"`` calls ``torch.sum``, whose order is
    the backend's.  Operands: ``(x,)``, or ``(x, scale)`` in the exact domain."""
    ADD = "add"
    """Ordered binary merge ``a + b`` of two partial sums; operands ``(a, b)``."""
    ACCUMULATE = "accumulate"
    """``acc += p`` for every operand, in the order the operands *arrive*.  The
    operand tuple lists the partials; it does not fix the order of the additions."""
    CATSUM = "catsum"
    """``torch.sum(torch.cat(parts, -1), -1)``: the order inside is the backend's."""
    ROWMAX = "rowmax"
    """Exact domain: maximum of the squares of ``x[..., start:stop]`` per row."""
    MAX = "max"
    """Exact domain: elementwise maximum of two row maxima (exact in any order)."""
    SCALE = "scale"
    """Exact domain: the power-of-two pre-rounding scale from the row maximum."""
    RMSNORM = "rmsnorm"
    """Opaque ``torch.nn.functional.rms_norm`` over the last dim (the baseline)."""
    FINALIZE = "finalize"
    """``x / sqrt(total / D + eps) * w`` computed in the accumulation dtype and cast
    back to the input dtype; operands ``(x, total)``, attr ``hidden_size``.  Attrs
    ``casting_mode`` (``"torch"`` when absent, ``"llama"``, ``"gemma"``) and
    ``offset`` (``0.0`` when absent; the weight used is ``offset + w``) say how it
    rounds: :func:`taskgraph_norm.kernels.finalize`."""
    OUTPUT = "output"
    """Marks the graph's single result; operand ``(y,)``."""
    CALL = "call"
    """A user function, for general graphs run by the concurrent executor: attr
    ``fn`` is a *name* (a string, so the graph stays hashable and printable) that
    the executor resolves through its ``functions`` mapping, and the result is
    ``functions[fn](*operands)`` with operands in order.  Any number of operands.
    The prover treats it as opaque: nothing about its order is known."""
    ROWSUM = "rowsum"
    """Weight-gradient leaf: for every column, the sum over the rows ``[start, stop)``
    of one backward call of ``dy * x_hat`` (``x_hat = x / rms``, the forward's value
    before the weight); operand ``(x,)``, where INPUT stands for the step's rows.
    Attrs ``start``, ``stop`` (global row indices), ``domain`` and ``index``;
    optional labels ``micro_batch`` and ``rank`` say which backward call and which
    process own the rows.  ``domain="float"``: pairwise halving over the block's rows
    in the accumulation dtype (one block of :func:`taskgraph_norm.kernels.weight_grad_float`);
    ``domain="exact"``: every product added without rounding onto the exact
    accumulator's integer grid (:mod:`taskgraph_norm.kernels.exact_sum`).  ADD and
    ACCUMULATE over exact partials are integer additions of their states."""
    ROUND = "round"
    """Weight gradient: the column sums rounded to the weight's dtype; operand
    ``(total,)``.  Float domain: one cast, after each backward call (then ``.grad +=``
    adds the rounded values); exact domain: the accumulator's state correctly
    rounded once (:func:`taskgraph_norm.kernels.exact_sum.round_state`)."""

    # Members are singletons compared by identity, so identity hashing is exact; it
    # is C-level, where Enum's own __hash__ is a Python call on every dict lookup
    # (readers look ops up a few times per node, for millions of nodes).
    __hash__ = object.__hash__


#: Allowed operand counts per op: ``(minimum, maximum)``; ``None`` is unbounded.
ARITY: Mapping[Op, tuple[int, int | None]] = {
    Op.INPUT: (0, 0),
    Op.SUMSQ: (1, 2),
    Op.ADD: (2, 2),
    Op.ACCUMULATE: (1, None),
    Op.CATSUM: (1, None),
    Op.ROWMAX: (1, 1),
    Op.MAX: (2, 2),
    Op.SCALE: (1, 1),
    Op.RMSNORM: (1, 1),
    Op.FINALIZE: (2, 2),
    Op.OUTPUT: (1, 1),
    Op.CALL: (0, None),
    Op.ROWSUM: (1, 1),
    Op.ROUND: (1, 1),
}


class Attrs(Mapping[str, Any]):
    """An immutable, hashable mapping of node attributes (values must be hashable)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        pairs = dict(items)
        self._items: tuple[tuple[str, Any], ...] = tuple(sorted(pairs.items()))
        hash(self._items)  # fail now, not when the node is first put in a set

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    # Mapping's get and `in` go through __getitem__ and a caught KeyError, which
    # costs more than the scan itself; readers ask for absent keys on every node.
    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        return default

    def __contains__(self, key: object) -> bool:
        for k, _ in self._items:
            if k == key:
                return True
        return False

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    @classmethod
    def from_sorted(cls, pairs: tuple[tuple[str, Any], ...]) -> Attrs:
        """Attrs from ``(name, value)`` pairs already sorted by name, with distinct names
        and hashable values: none of that is checked (builders make millions)."""
        attrs = object.__new__(cls)
        attrs._items = pairs
        return attrs

    @property
    def pairs(self) -> tuple[tuple[str, Any], ...]:
        """The ``(name, value)`` pairs, sorted by name (``dict(attrs.pairs)`` is fast)."""
        return self._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attrs):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return "Attrs({" + ", ".join(f"{k!r}: {v!r}" for k, v in self._items) + "})"


#: The attributes of a node that has none (shared: builders make millions of them).
_NO_ATTRS = Attrs()


@dataclass(frozen=True, slots=True)
class Node:
    """One task: ``op`` applied to the results of ``inputs`` (ids, in operand order)."""

    id: str
    op: Op
    inputs: tuple[str, ...] = ()
    # Typed as a Mapping so that builders may pass dicts; __post_init__ always
    # stores an immutable, hashable Attrs.
    attrs: Mapping[str, Any] = _NO_ATTRS

    def __post_init__(self) -> None:
        # Accept lists and dicts from hand-written graphs, but store frozen values.
        if not isinstance(self.inputs, tuple):
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if not isinstance(self.attrs, Attrs):
            object.__setattr__(self, "attrs", Attrs(self.attrs))

    def replace(self, **changes: Any) -> Node:
        """A copy of this node with some fields changed (the node itself is frozen)."""
        return dataclasses.replace(self, **changes)


_node_id = operator.attrgetter("id")
_node_op = operator.attrgetter("op")
_node_inputs = operator.attrgetter("inputs")


class Graph:
    """An immutable merge DAG: nodes in build order and the id of the output node.

    ``meta`` records how a builder made the graph (hidden size, chunk size,
    topology, leaf, accumulate); it is informational and never read by executors,
    which look only at nodes.  Construction does not validate, so that broken
    graphs can be built and reported on: call :func:`validate` (every executor,
    the prover and the drawing code do).
    """

    __slots__ = ("_nodes", "_output", "_meta", "_hash", "__dict__")

    def __init__(
        self, nodes: Iterable[Node], output: str, meta: Mapping[str, Any] | None = None
    ) -> None:
        self._nodes: tuple[Node, ...] = tuple(nodes)
        self._output = output
        self._meta = Attrs(meta or {})
        self._hash: int | None = None

    @property
    def nodes(self) -> tuple[Node, ...]:
        """All nodes, in the order they were added (a valid build order for builders)."""
        return self._nodes

    @property
    def output(self) -> str:
        return self._output

    @property
    def meta(self) -> Attrs:
        return self._meta

    @cached_property
    def by_id(self) -> Mapping[str, Node]:
        """Nodes by id (the last one wins if ids repeat; :func:`validate` rejects that)."""
        return {n.id: n for n in self._nodes}

    def __getitem__(self, node_id: str) -> Node:
        return self.by_id[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.by_id

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return (
            isinstance(other, Graph)
            and self._output == other._output
            and hash(self) == hash(other)
            and self._nodes == other._nodes
        )

    def __hash__(self) -> int:
        # Hashing walks every node; a graph is immutable, so it is done once (caches
        # keyed by a graph -- prove, lower -- would otherwise pay it on every lookup).
        # Ids and operands only, read in C: equal graphs have equal ones, and a graph
        # that differs only in an op or attribute is told apart by __eq__.
        if self._hash is None:
            self._hash = hash((
                tuple(map(_node_id, self._nodes)), tuple(map(_node_inputs, self._nodes)),
                self._output,
            ))
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # String hashes differ between processes: never carry the cached one over.
        return (Graph, (self._nodes, self._output, dict(self._meta)))

    def __repr__(self) -> str:
        desc = ", ".join(f"{k}={v!r}" for k, v in self._meta.items())
        return f"<Graph {len(self._nodes)} nodes, output={self._output!r}{', ' if desc else ''}{desc}>"

    # -- derived views -------------------------------------------------------

    @cached_property
    def users(self) -> Mapping[str, tuple[str, ...]]:
        """For each node id, the ids of the nodes that consume it (in build order)."""
        # Dicts as ordered sets: the input node has one user per leaf, so a list
        # membership test here would be quadratic.
        out: dict[str, dict[str, None]] = {n.id: {} for n in self._nodes}
        for n in self._nodes:
            for src in n.inputs:
                users = out.get(src)
                if users is not None:
                    users[n.id] = None
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def ops(self) -> frozenset[Op]:
        """The set of ops the graph uses (cached: executors ask on every call)."""
        return frozenset(n.op for n in self._nodes)

    @cached_property
    def topological_order(self) -> tuple[str, ...]:
        """Ids in a deterministic topological order (Kahn's algorithm, build order
        breaking ties).  Raises :class:`CycleError` on a cycle."""
        validate(self)
        return _kahn(self)

    @cached_property
    def topological_nodes(self) -> tuple[Node, ...]:
        """The nodes in :attr:`topological_order` (the node tuple itself when the
        build order is topological, as it is for every builder's graph)."""
        order = self.topological_order
        if self.__dict__.get("_forward"):
            return self._nodes
        by_id = self.by_id
        return tuple(by_id[i] for i in order)

    def to_networkx(self) -> nx.DiGraph:
        """A fresh ``networkx.DiGraph``: node attrs ``op``/``attrs``, and one edge per
        operand with ``position`` (its index in the consumer's ``inputs``)."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self._nodes:
            g.add_node(n.id, op=n.op, attrs=n.attrs)
        for n in self._nodes:
            for pos, src in enumerate(n.inputs):
                g.add_edge(src, n.id, position=pos)
        return g

    # -- edits (each returns a new graph) -----------------------------------

    def replace_node(self, node: Node) -> Graph:
        """A new graph in which the node with ``node.id`` is replaced by ``node``."""
        if node.id not in self.by_id:
            raise GraphError(node.id, "no such node to replace")
        return self._with(tuple(node if n.id == node.id else n for n in self._nodes))

    def add_nodes(self, *nodes: Node, output: str | None = None) -> Graph:
        """A new graph with extra nodes appended (and optionally a new output)."""
        return Graph(self._nodes + nodes, output or self._output, self._meta)

    def remove_nodes(self, *node_ids: str) -> Graph:
        """A new graph without the given nodes (their users are left dangling)."""
        drop = set(node_ids)
        return self._with(tuple(n for n in self._nodes if n.id not in drop))

    def relabel(self, mapping: Mapping[str, str]) -> Graph:
        """A new graph whose ids are renamed by ``mapping`` (missing ids are kept)."""

        def new(i: str) -> str:
            return mapping.get(i, i)

        nodes = tuple(
            n.replace(id=new(n.id), inputs=tuple(new(i) for i in n.inputs))
            for n in self._nodes
        )
        return Graph(nodes, new(self._output), self._meta)

    def _with(self, nodes: tuple[Node, ...]) -> Graph:
        return Graph(nodes, self._output, self._meta)


def _kahn(graph: Graph) -> tuple[str, ...]:
    if graph.__dict__.get("_forward"):
        # Every operand is built before its users (builders do this), so build
        # order is the order Kahn's algorithm with build-order ties would give.
        return tuple(n.id for n in graph.nodes)
    pending = {n.id: len(set(n.inputs)) for n in graph.nodes}
    ready = [n.id for n in graph.nodes if pending[n.id] == 0]
    rank = {n.id: i for i, n in enumerate(graph.nodes)}
    order: list[str] = []
    import heapq

    heap = [(rank[i], i) for i in ready]
    heapq.heapify(heap)
    while heap:
        _, nid = heapq.heappop(heap)
        order.append(nid)
        for user in graph.users[nid]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(heap, (rank[user], user))
    return tuple(order)


def _find_cycle(graph: Graph) -> list[str] | None:
    """A cycle as a list of ids ``[a, b, ..., a]`` in edge direction, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n.id: WHITE for n in graph.nodes}
    for root in graph.nodes:
        if colour[root.id] != WHITE:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root.id, iter(graph.users[root.id]))]
        path = [root.id]
        colour[root.id] = GREY
        while stack:
            nid, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                colour[nid] = BLACK
            elif colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                stack.append((nxt, iter(graph.users[nxt])))
                path.append(nxt)
    return None


def validate(graph: Graph) -> Graph:
    """Check the structural rules every consumer of a graph relies on.

    Rules: ids are unique non-empty strings; every op is an :class:`Op`; every
    operand names an existing node; operand counts fit :data:`ARITY`; exactly
    one ``INPUT`` node; the output id exists and is the only ``OUTPUT`` node; the
    graph is acyclic; every node is needed by the output.

    Returns the graph itself so calls can be chained.

    Raises
    ------
    GraphError
        naming the first offending node and what to do about it.
    CycleError
        with the cycle's path ``a -> b -> a``.
    """
    if graph.__dict__.get("_validated"):
        return graph  # a graph is immutable: once valid, always valid
    forward = _valid_forward(graph)
    if not forward:
        _validate_in_order(graph)
    graph.__dict__["_forward"] = forward
    graph.__dict__["_validated"] = True
    return graph


def _valid_forward(graph: Graph) -> bool:
    """Whether the graph is valid *and* every operand is built before its user (so
    no cycle is possible): true of every builder's graph.  The checks run over the
    whole graph in C (maps, sets, zips), a few times faster than a loop over the
    nodes; :func:`_validate_in_order` keeps that loop, for the graphs this says no
    to, to name the first offending node."""
    nodes = graph.nodes
    ids = list(map(_node_id, nodes))
    ops = list(map(_node_op, nodes))
    operands = list(map(_node_inputs, nodes))
    if set(map(type, ids)) != {str} or not set(map(type, ops)) <= {Op}:
        return False
    position = dict(zip(ids, range(len(ids))))
    if len(position) != len(ids) or "" in position:
        return False
    op_counts: Counter[Op] = Counter()
    for (op, count), times in Counter(zip(ops, map(len, operands))).items():
        lo, hi = ARITY[op]
        if count < lo or (hi is not None and count > hi):
            return False
        op_counts[op] += times
    at = position.get(graph.output)
    if op_counts[Op.INPUT] != 1 or op_counts[Op.OUTPUT] != 1 or at is None or ops[at] is not Op.OUTPUT:
        return False
    sources = list(itertools.chain.from_iterable(operands))
    try:
        source_at = list(map(position.__getitem__, sources))
    except KeyError:
        return False
    user_at = itertools.chain.from_iterable(map(itertools.repeat, range(len(ids)), map(len, operands)))
    if not all(map(operator.lt, source_at, user_at)):
        return False
    # In a DAG the nodes that do not reach the output include one that no node
    # uses: so all reach it iff every node but the output is some node's operand.
    used = set(sources)
    return len(used) == len(ids) - 1 and graph.output not in used


def _validate_in_order(graph: Graph) -> None:
    """The rules of :func:`validate`, node by node, raising for the first offence."""
    seen: set[str] = set()
    for n in graph.nodes:
        if not isinstance(n.id, str) or not n.id:
            raise GraphError(repr(n.id), "node ids must be non-empty strings")
        if n.id in seen:
            raise GraphError(n.id, "duplicate node id", "every id must be unique")
        seen.add(n.id)
        if not isinstance(n.op, Op):
            raise GraphError(n.id, f"unknown op {n.op!r}", f"use one of {[o.name for o in Op]}")
    for n in graph.nodes:
        lo, hi = ARITY[n.op]
        if len(n.inputs) < lo or (hi is not None and len(n.inputs) > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
            raise GraphError(n.id, f"{n.op.name} takes {want} operands, got {len(n.inputs)}")
        for src in n.inputs:
            if src not in seen:
                raise GraphError(n.id, f"operand {src!r} does not exist")
    inputs = [n.id for n in graph.nodes if n.op is Op.INPUT]
    if len(inputs) != 1:
        raise GraphError(None, f"a graph needs exactly one INPUT node, found {inputs}")
    if graph.output not in seen:
        raise GraphError(graph.output, "the output node does not exist")
    outputs = [n.id for n in graph.nodes if n.op is Op.OUTPUT]
    if outputs != [graph.output]:
        raise GraphError(
            graph.output, f"the output must be the graph's only OUTPUT node, found {outputs}"
        )
    cycle = _find_cycle(graph)
    if cycle is not None:
        raise CycleError(cycle)
    needed = ancestors(graph, graph.output)
    for n in graph.nodes:
        if n.id not in needed:
            raise GraphError(n.id, "does not contribute to the output", "remove it or wire it in")


def ancestors(graph: Graph, node_id: str) -> set[str]:
    """``node_id`` and every node it depends on, directly or not."""
    found = {node_id}
    stack = [node_id]
    by_id = graph.by_id
    while stack:
        for src in by_id[stack.pop()].inputs:
            if src not in found:
                found.add(src)
                stack.append(src)
    return found


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a pass makes millions of objects.

    Building, reading and lowering a graph allocate a few objects per node and free
    none of them: every collection in between would walk them all again for
    nothing (about 40% of the time of a million-leaf graph).  Collection resumes
    afterwards, if it was on, and finds everything it would have found.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
