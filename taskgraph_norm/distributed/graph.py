"""The merge DAG of a row whose hidden dim is sharded across ranks, and its plan.

A distributed graph is the single-process graph of :func:`taskgraph_norm.build_graph`
with one attribute added to every node, ``placement``:

``r`` (an int)     computed on rank ``r`` alone, from elements that rank holds
``"replicated"``   computed identically on every rank, from values every rank received
``"sharded"``      elementwise: each rank computes it for its own slice of the last dim
                   (INPUT, FINALIZE, OUTPUT)
``"all_reduce"``   a collective reduction whose order is the backend's (exact domain
                   only: ``ACCUMULATE`` for the sum, ``MAX`` for the row maximum)

Chunks are global (chunk ``k`` is ``[k*C, min((k+1)*C, D))``) whatever the shards are.
A chunk that lies inside one rank's shard is summed there; a chunk that a shard
boundary cuts is summed, with the single-process leaf's own order, on every rank from
its elements, which travel with the gathered payload.  A merge node whose operands all
live on one rank is computed there; every other merge is replicated.  The values a
rank must send (its *frontier*: rank-local nodes consumed by a replicated or sharded
node) and the cut chunks' elements form one all-gather payload per rank.  So the float
graph at any world size has the nodes, operands and expression of the single-process
graph: only where each node runs changes.

In the exact domain the order of the sum never matters (docs/exact.md), so the
graph is the cheap one: per rank one ROWMAX and one exact SUMSQ over its whole shard,
a MAX all-reduce, a replicated SCALE and an ACCUMULATE all-reduce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import caches
from ..errors import ConfigError
from ..graph import Attrs, Graph, Node, Op, validate
from ..topologies import INPUT_ID, OUTPUT_ID, build_graph, chunk_bounds, merge_tree

__all__ = [
    "PLACEMENTS",
    "DistributedPlan",
    "build_distributed_graph",
    "build_naive_graph",
    "distributed_plan",
    "even_shard_sizes",
    "shard_offsets",
]

#: The string placements; an int placement names one rank.
PLACEMENTS: tuple[str, ...] = ("replicated", "sharded", "all_reduce")

Placement = int | str


def even_shard_sizes(hidden_size: int, world_size: int) -> tuple[int, ...]:
    """Shard sizes of ``torch.tensor_split``: the first ``D % W`` ranks get one more.

    Examples
    --------
    >>> even_shard_sizes(10, 4)
    (3, 3, 2, 2)
    """
    _positive("hidden_size", hidden_size)
    _positive("world_size", world_size)
    base, extra = divmod(hidden_size, world_size)
    return tuple(base + (1 if r < extra else 0) for r in range(world_size))


def shard_offsets(shard_sizes: Sequence[int]) -> tuple[int, ...]:
    """Start of each rank's shard in the global last dim."""
    offsets, start = [], 0
    for size in shard_sizes:
        offsets.append(start)
        start += size
    return tuple(offsets)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "an integer >= 1")
    return value


def check_shard_sizes(hidden_size: int, shard_sizes: Sequence[int]) -> tuple[int, ...]:
    """``shard_sizes`` as a tuple, or ConfigError unless they are ints >= 0 summing to D."""
    sizes = tuple(shard_sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes):
        raise ConfigError("shard_sizes", sizes, "one integer >= 0 per rank")
    if sum(sizes) != hidden_size:
        raise ConfigError(
            "shard_sizes", sizes, f"sizes that add up to hidden_size={hidden_size} "
            f"(they add up to {sum(sizes)})",
        )
    return sizes


def _owners(start: int, stop: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """The ranks holding at least one element of ``[start, stop)``, in rank order."""
    return tuple(
        r for r, (off, size) in enumerate(zip(shard_offsets(sizes), sizes))
        if size and off < stop and start < off + size
    )


def build_distributed_graph(
    hidden_size: int,
    shard_sizes: Sequence[int],
    *,
    chunk_size: int = 64,
    topology: str = "tree",
    leaf: str = "pairwise",
    accumulate: str = "float",
) -> Graph:
    """The merge DAG of RMSNorm over a last dim split into ``shard_sizes`` across ranks.

    Parameters
    ----------
    hidden_size:
        ``D``, the global length of the normalised dim.
    shard_sizes:
        Length of each rank's contiguous shard, in rank order (zeros allowed); they
        add up to ``D``.
    chunk_size, topology, leaf, accumulate:
        As in :func:`taskgraph_norm.build_graph`.  ``topology="standard"`` (torch's
        opaque kernel) cannot span ranks.

    Returns
    -------
    Graph
        Validated; every node has a ``placement`` attribute (see the module docstring),
        and ``meta`` adds ``world_size`` and ``shard_sizes`` to the single-process meta.
        ``prove`` on it states whether it is world-size invariant.

    Raises
    ------
    ConfigError (a ValueError)
        for a parameter outside its domain.

    Examples
    --------
    >>> g = build_distributed_graph(256, (128, 128), topology="tree")
    >>> [(n.id, n.attrs["placement"]) for n in g if n.op.name == "ADD"]
    [('tree1.0', 0), ('tree1.1', 1), ('tree2.0', 'replicated')]
    """
    _positive("hidden_size", hidden_size)
    sizes = check_shard_sizes(hidden_size, shard_sizes)
    if topology == "standard":
        raise ConfigError(
            "topology", topology,
            "a chunked topology ('tree', 'linear', 'cat' or 'race'): torch's opaque "
            "rms_norm kernel cannot span ranks",
        )
    single = build_graph(
        hidden_size, chunk_size=chunk_size, topology=topology, leaf=leaf, accumulate=accumulate
    )
    return _build_cached(single, sizes)


@functools.lru_cache(maxsize=256)
def _build_cached(single: Graph, sizes: tuple[int, ...]) -> Graph:
    return place(single, sizes, _exact_nodes)


def place(single: Graph, sizes: tuple[int, ...],
          exact_nodes: Callable[[Graph, tuple[int, ...]], list[Node]]) -> Graph:
    """``single`` with a placement on every node (float domain), or the cheap graph
    ``exact_nodes`` builds (exact domain); ``meta`` gains the world size and shard sizes."""
    meta = dict(single.meta) | {"world_size": len(sizes), "shard_sizes": sizes}
    if single.meta["accumulate"] == "exact":
        return validate(Graph(exact_nodes(single, sizes), OUTPUT_ID, meta))
    placed: dict[str, Placement] = {}
    nodes = []
    for node in single.nodes:
        placement = _float_placement(node, placed, sizes)
        placed[node.id] = placement
        nodes.append(node.replace(attrs=dict(node.attrs) | {"placement": placement}))
    return validate(Graph(nodes, single.output, meta))


def _float_placement(node: Node, placed: dict[str, Placement], sizes: Sequence[int]) -> Placement:
    """A leaf (``SUMSQ``; LayerNorm's ``SUM`` too) where its chunk lies, or replicated when
    a shard boundary cuts it; a merge where its operands all are, else replicated;
    LayerNorm's ``MEAN`` replicated (every rank's variance leaves read it)."""
    if node.op in (Op.INPUT, Op.FINALIZE, Op.OUTPUT):
        return "sharded"
    if node.op in (Op.SUMSQ, Op.SUM):
        owners = _owners(node.attrs["start"], node.attrs["stop"], sizes)
        return owners[0] if len(owners) == 1 else "replicated"
    operands = {placed[i] for i in node.inputs}
    if node.op is not Op.MEAN and len(operands) == 1 and isinstance(next(iter(operands)), int):
        return next(iter(operands))
    return "replicated"


def _exact_nodes(single: Graph, sizes: tuple[int, ...]) -> list[Node]:
    hidden = single.meta["hidden_size"]
    leaf = single.meta["leaf"]
    offsets = shard_offsets(sizes)
    ranks = [r for r, size in enumerate(sizes) if size]
    nodes = [Node(INPUT_ID, Op.INPUT, (), Attrs({"placement": "sharded"}))]
    maxima = [
        Node(f"m@{r}", Op.ROWMAX, (INPUT_ID,),
             Attrs({"start": offsets[r], "stop": offsets[r] + sizes[r], "placement": r}))
        for r in ranks
    ]
    nodes += maxima
    max_nodes, max_root = merge_tree([m.id for m in maxima], op=Op.MAX, prefix="allmax")
    nodes += [n.replace(attrs=dict(n.attrs) | {"placement": "all_reduce"}) for n in max_nodes]
    nodes.append(Node("scale", Op.SCALE, (max_root,),
                      Attrs({"hidden_size": hidden, "placement": "replicated"})))
    leaves = [
        Node(f"p@{r}", Op.SUMSQ, (INPUT_ID, "scale"),
             Attrs({"start": offsets[r], "stop": offsets[r] + sizes[r], "leaf": leaf,
              "domain": "exact", "placement": r}))
        for r in ranks
    ]
    nodes += leaves
    nodes.append(Node("allsum", Op.ACCUMULATE, tuple(p.id for p in leaves),
                      Attrs({"placement": "all_reduce"})))
    nodes.append(Node("finalize", Op.FINALIZE, (INPUT_ID, "allsum"),
                      Attrs({"hidden_size": hidden, "domain": "exact", "placement": "sharded"})))
    nodes.append(Node(OUTPUT_ID, Op.OUTPUT, ("finalize",), Attrs({"placement": "sharded"})))
    return nodes


def build_naive_graph(hidden_size: int, shard_sizes: Sequence[int]) -> Graph:
    """The usual tensor-parallel RMSNorm as a graph: the negative control.

    Each rank sums its own shard's squares with ``torch.sum`` and one
    ``all_reduce(SUM)`` adds the per-rank sums in the backend's order.  The leaves
    follow the shard boundaries, so the expression (and the bits) change with the
    world size; with three or more ranks the all-reduce is a race over inexact
    partials, which ``prove`` refutes.
    """
    _positive("hidden_size", hidden_size)
    sizes = check_shard_sizes(hidden_size, shard_sizes)
    offsets = shard_offsets(sizes)
    ranks = [r for r, size in enumerate(sizes) if size]
    nodes = [Node(INPUT_ID, Op.INPUT, (), Attrs({"placement": "sharded"}))]
    nodes += [
        Node(f"p@{r}", Op.SUMSQ, (INPUT_ID,),
             Attrs({"start": offsets[r], "stop": offsets[r] + sizes[r], "leaf": "native",
              "placement": r}))
        for r in ranks
    ]
    nodes.append(Node("allsum", Op.ACCUMULATE, tuple(f"p@{r}" for r in ranks),
                      Attrs({"placement": "all_reduce"})))
    nodes.append(Node("finalize", Op.FINALIZE, (INPUT_ID, "allsum"),
                      Attrs({"hidden_size": hidden_size, "placement": "sharded"})))
    nodes.append(Node(OUTPUT_ID, Op.OUTPUT, ("finalize",), Attrs({"placement": "sharded"})))
    meta = {"hidden_size": hidden_size, "topology": "naive-all-reduce",
            "world_size": len(sizes), "shard_sizes": sizes}
    return validate(Graph(nodes, OUTPUT_ID, meta))


# --- the plan each rank follows ---------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, stop)`` (global positions) that ``rank`` sends raw, because a
    shard boundary cuts the chunk they belong to."""

    rank: int
    start: int
    stop: int
    chunk: tuple[int, int]  # the cut chunk's global bounds


@dataclass(frozen=True)
class DistributedPlan:
    """What every rank computes, sends and receives for one float-domain graph.

    Attributes
    ----------
    graph:
        The distributed graph (placements set).
    offsets:
        Start of each rank's shard.
    frontier:
        Per rank, the ids of its rank-local nodes whose values others need, in
        build order: they lead that rank's payload, one column each.
    fragments:
        Per rank, the raw elements of its cut chunks; they follow the frontier.
    batched:
        Per rank, its run of consecutive full-length pairwise leaves
        ``(global start, count, chunk length, leaf ids)``, summed in one kernel call.
    width:
        Payload columns per row, the same on every rank (shorter payloads are padded).
    """

    graph: Graph
    offsets: tuple[int, ...]
    frontier: tuple[tuple[str, ...], ...]
    fragments: tuple[tuple[Fragment, ...], ...]
    batched: tuple[tuple[int, int, int, tuple[str, ...]] | None, ...]
    width: int

    @property
    def world_size(self) -> int:
        return len(self.offsets)

    def payload_width(self, rank: int) -> int:
        """Columns of ``rank``'s payload before padding."""
        return len(self.frontier[rank]) + sum(f.stop - f.start for f in self.fragments[rank])


def distributed_plan(graph: Graph) -> DistributedPlan:
    """The send/receive plan of a float-domain distributed graph (cached per graph)."""
    # Graph equality ignores meta, and two layouts can place every node alike
    # ((1,) and (1, 0)), so the shard sizes are part of the key.
    return _plan_cached(graph, graph.meta["shard_sizes"])


@functools.lru_cache(maxsize=256)
def _plan_cached(graph: Graph, sizes: tuple[int, ...]) -> DistributedPlan:
    offsets = shard_offsets(sizes)
    frontier: list[list[str]] = [[] for _ in sizes]
    fragments: list[list[Fragment]] = [[] for _ in sizes]
    for node in graph.nodes:
        placement = node.attrs["placement"]
        if isinstance(placement, int):
            if any(graph[u].attrs["placement"] != placement for u in graph.users[node.id]):
                frontier[placement].append(node.id)
        elif node.op is Op.SUMSQ:
            start, stop = node.attrs["start"], node.attrs["stop"]
            for r in _owners(start, stop, sizes):
                lo, hi = max(start, offsets[r]), min(stop, offsets[r] + sizes[r])
                fragments[r].append(Fragment(r, lo, hi, (start, stop)))
    batched = tuple(_leaf_run(graph, r) for r in range(len(sizes)))
    plan = DistributedPlan(
        graph, offsets, tuple(map(tuple, frontier)), tuple(map(tuple, fragments)), batched, 0
    )
    width = max(plan.payload_width(r) for r in range(len(sizes)))
    return DistributedPlan(graph, offsets, plan.frontier, plan.fragments, batched, width)


def _leaf_run(graph: Graph, rank: int) -> tuple[int, int, int, tuple[str, ...]] | None:
    """Rank ``rank``'s pairwise leaves of the full chunk length, if there are two or more
    (they are consecutive: chunks are global and a shard is contiguous)."""
    length = graph.meta["chunk_size"]
    leaves = [n for n in graph.nodes if n.op is Op.SUMSQ and n.attrs["placement"] == rank
              and n.attrs["leaf"] == "pairwise"
              and n.attrs["stop"] - n.attrs["start"] == length]
    if len(leaves) < 2:
        return None
    return leaves[0].attrs["start"], len(leaves), length, tuple(n.id for n in leaves)


for _cached in (_build_cached, _plan_cached):
    caches.register(_cached.cache_clear)
