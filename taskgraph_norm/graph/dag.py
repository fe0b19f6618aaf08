"""The immutable merge DAG (:class:`Graph`: nodes in build order, derived views,
edits that return new graphs) and :func:`validate`, the structural rules every
consumer relies on.  They share a module because a graph's topological order
validates it first.  Pure Python.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ..errors import CycleError, GraphError
from .nodes import Attrs, Indexed, Node
from .ops import ARITY, Op

if TYPE_CHECKING:
    import networkx as nx  # type: ignore[import-untyped]

__all__ = ["Graph", "validate", "ancestors"]

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
    def index(self) -> Mapping[str, int]:
        """Each id's position in :attr:`nodes` (the last one wins if ids repeat;
        :func:`validate` rejects that).  One dict per graph: a million-node graph's
        id dict costs about a second, so validation, the prover and the lowering
        share this one (validation leaves it here)."""
        return dict(zip(map(_node_id, self._nodes), range(len(self._nodes))))

    @cached_property
    def by_id(self) -> Mapping[str, Node]:
        """Nodes by id: a view over :attr:`index` (the last one wins if ids repeat)."""
        return Indexed(self.index, self._nodes)

    @cached_property
    def operand_positions(self) -> tuple[array[int], array[int]]:
        """``(sources, offsets)``: node ``k``'s operands are the nodes at positions
        ``sources[offsets[k]:offsets[k + 1]]`` of :attr:`nodes`, in operand order
        (two flat integer arrays: readers index operands without looking ids up).
        Raises KeyError if an operand does not exist (:func:`validate` first)."""
        sources = self.__dict__.pop("_sources", None)
        if sources is None:
            sources = array("q", map(self.index.__getitem__,
                                     itertools.chain.from_iterable(map(_node_inputs, self._nodes))))
        offsets = array("q", itertools.accumulate(map(len, map(_node_inputs, self._nodes)), initial=0))
        return sources, offsets

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
    graph.__dict__["index"] = position  # valid or not, this is Graph.index
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
    # uses: so all reach it iff every node but the output is some node's operand
    # (positions, not ids: a set of ints is built without touching the strings).
    used = set(source_at)
    if len(used) != len(ids) - 1 or at in used:
        return False
    graph.__dict__["_sources"] = array("q", source_at)  # for Graph.operand_positions
    return True


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

