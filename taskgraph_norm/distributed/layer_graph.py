"""LayerNorm's merge DAGs placed over a hidden dim sharded across ranks, and the plan.

The single-process LayerNorm graph (:func:`taskgraph_norm.topologies.build_layer_graph`)
with a ``placement`` on every node, as :mod:`.graph` places RMSNorm's: chunks stay
global; a ``SUM`` or centered ``SUMSQ`` leaf whose chunk lies in one rank's shard runs
there, a cut chunk's leaf is replicated (every rank sums it, in the leaf's own order,
from the raw elements the ranks gathered); a merge whose operands all live on one
rank runs there, every other merge is replicated; ``MEAN`` is replicated, and
``INPUT``, ``FINALIZE`` and ``OUTPUT`` are sharded.  The float graph at any world size
thus has the single-process graph's nodes, operands and expression.  It takes two
all-gathers: the mean's frontier values with the cut chunks' raw elements, then
(once every rank holds the mean) the variance's frontier values.

In the exact domain order never matters (docs/exact.md): per rank one ``ROWMAX``
and one exact leaf over its whole shard for each reduction, a ``MAX`` and an
``ACCUMULATE`` all-reduce each, and the replicated ``SCALE`` and ``MEAN``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from .. import caches
from ..errors import ConfigError
from ..graph import Attrs, Graph, Node, Op, validate
from ..topologies import INPUT_ID, OUTPUT_ID, build_layer_graph, merge_tree
from ..topologies.layer import MEAN_ID
from .graph import Fragment, _owners, _positive, check_shard_sizes, place, shard_offsets

__all__ = ["LayerPlan", "build_distributed_layer_graph", "layer_plan", "phase"]


def phase(node: Node) -> str:
    """``"var"`` for the variance's nodes (they need the mean), else ``"mean"``."""
    return "var" if node.id.startswith("var.") else "mean"


def build_distributed_layer_graph(
    hidden_size: int,
    shard_sizes: Sequence[int],
    *,
    chunk_size: int = 64,
    topology: str = "tree",
    leaf: str = "pairwise",
    accumulate: str = "float",
) -> Graph:
    """The LayerNorm graph over a last dim split into ``shard_sizes`` across ranks.

    Arguments as :func:`taskgraph_norm.distributed.build_distributed_graph`; the
    options are :func:`~taskgraph_norm.topologies.build_layer_graph`'s.  ``prove`` on
    the result states whether its bits are the single process's at every world size.

    Raises
    ------
    ConfigError (a ValueError)
        for a parameter outside its domain, ``topology="standard"`` included.

    Examples
    --------
    >>> g = build_distributed_layer_graph(256, (128, 128), topology="tree")
    >>> [(n.id, n.attrs["placement"]) for n in g if n.op.name in ("ADD", "MEAN")][:4]
    [('mean.tree1.0', 0), ('mean.tree1.1', 1), ('mean.tree2.0', 'replicated'), ('mean', 'replicated')]
    """
    _positive("hidden_size", hidden_size)
    sizes = check_shard_sizes(hidden_size, shard_sizes)
    if topology == "standard":
        raise ConfigError("topology", topology, "a chunked topology ('tree', 'linear', 'cat' or 'race'): "
                          "torch's opaque layer_norm kernel cannot span ranks")
    single = build_layer_graph(hidden_size, chunk_size=chunk_size, topology=topology, leaf=leaf,
                               accumulate=accumulate)
    return _build_cached(single, sizes)


@functools.lru_cache(maxsize=256)
def _build_cached(single: Graph, sizes: tuple[int, ...]) -> Graph:
    return place(single, sizes, _exact_nodes)


def _exact_nodes(single: Graph, sizes: tuple[int, ...]) -> list[Node]:
    hidden = single.meta["hidden_size"]
    offsets = shard_offsets(sizes)
    ranks = [r for r, size in enumerate(sizes) if size]
    nodes = [Node(INPUT_ID, Op.INPUT, (), Attrs({"placement": "sharded"}))]

    def reduction(prefix: str, leaf_op: Op, reads: tuple[str, ...], kind: dict[str, object]) -> str:
        maxima = [Node(f"{prefix}m@{r}", Op.ROWMAX, reads, Attrs(kind | {
            "start": offsets[r], "stop": offsets[r] + sizes[r], "placement": r})) for r in ranks]
        nodes.extend(maxima)
        max_nodes, max_root = merge_tree([m.id for m in maxima], op=Op.MAX, prefix=f"{prefix}allmax")
        nodes.extend(n.replace(attrs=dict(n.attrs) | {"placement": "all_reduce"}) for n in max_nodes)
        nodes.append(Node(f"{prefix}scale", Op.SCALE, (max_root,),
                          Attrs({"hidden_size": hidden, "placement": "replicated"})))
        extra = {"centered": True} if leaf_op is Op.SUMSQ else {}
        leaves = [Node(f"{prefix}p@{r}", leaf_op, (*reads, f"{prefix}scale"), Attrs(extra | {
            "start": offsets[r], "stop": offsets[r] + sizes[r], "leaf": "pairwise", "domain": "exact",
            "placement": r})) for r in ranks]
        nodes.extend(leaves)
        nodes.append(Node(f"{prefix}allsum", Op.ACCUMULATE, tuple(p.id for p in leaves),
                          Attrs({"placement": "all_reduce"})))
        return f"{prefix}allsum"

    total = reduction("mean.", Op.SUM, (INPUT_ID,), {"power": 1})
    nodes.append(Node(MEAN_ID, Op.MEAN, (total,),
                      Attrs({"hidden_size": hidden, "domain": "exact", "placement": "replicated"})))
    var_total = reduction("var.", Op.SUMSQ, (INPUT_ID, MEAN_ID), {"centered": True})
    nodes.append(Node("finalize", Op.FINALIZE, (INPUT_ID, var_total, MEAN_ID), Attrs({
        "hidden_size": hidden, "domain": "exact", "norm": "layer", "placement": "sharded"})))
    nodes.append(Node(OUTPUT_ID, Op.OUTPUT, ("finalize",), Attrs({"placement": "sharded"})))
    return nodes


@dataclass(frozen=True)
class LayerPlan:
    """What every rank computes, sends and receives for one float LayerNorm graph.

    ``frontier[p][r]``: rank ``r``'s rank-local nodes of phase ``p`` (0: the mean's,
    1: the variance's) whose values others need, in build order; ``fragments[r]``: the
    raw elements of rank ``r``'s cut chunks (sent with the mean's frontier, read by
    both reductions' replicated leaves); ``widths[p]``: the payload columns per row of
    phase ``p``'s all-gather, the same on every rank (shorter payloads are padded).
    """

    graph: Graph
    offsets: tuple[int, ...]
    frontier: tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]
    fragments: tuple[tuple[Fragment, ...], ...]
    widths: tuple[int, int]

    def payload_width(self, which: int, rank: int) -> int:
        """Columns of ``rank``'s phase-``which`` payload before padding."""
        raw = sum(f.stop - f.start for f in self.fragments[rank]) if which == 0 else 0
        return len(self.frontier[which][rank]) + raw


def layer_plan(graph: Graph) -> LayerPlan:
    """The send/receive plan of a float distributed LayerNorm graph (cached per graph)."""
    return _plan_cached(graph, graph.meta["shard_sizes"])


@functools.lru_cache(maxsize=256)
def _plan_cached(graph: Graph, sizes: tuple[int, ...]) -> LayerPlan:
    offsets = shard_offsets(sizes)
    frontier: tuple[list[list[str]], list[list[str]]] = ([[] for _ in sizes], [[] for _ in sizes])
    fragments: list[list[Fragment]] = [[] for _ in sizes]
    for node in graph.nodes:
        placement = node.attrs["placement"]
        if isinstance(placement, int):
            if any(graph[u].attrs["placement"] != placement for u in graph.users[node.id]):
                frontier[phase(node) == "var"][placement].append(node.id)
        elif node.op is Op.SUM:
            start, stop = node.attrs["start"], node.attrs["stop"]
            for r in _owners(start, stop, sizes):
                lo, hi = max(start, offsets[r]), min(stop, offsets[r] + sizes[r])
                fragments[r].append(Fragment(r, lo, hi, (start, stop)))
    front = (tuple(map(tuple, frontier[0])), tuple(map(tuple, frontier[1])))
    plan = LayerPlan(graph, offsets, front, tuple(map(tuple, fragments)), (0, 0))
    widths = tuple(max(plan.payload_width(p, r) for r in range(len(sizes))) for p in (0, 1))
    return LayerPlan(graph, offsets, front, plan.fragments, (widths[0], widths[1]))


for _cached in (_build_cached, _plan_cached):
    caches.register(_cached.cache_clear)
