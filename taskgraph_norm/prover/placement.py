"""Where a distributed graph's nodes run, and whether that can change its bits.

A node's ``placement`` attribute is checked where every attribute is
(:func:`~.readers.read_node`, against :data:`~.readers.PLACEMENTS`) and never
enters its expression; :func:`read_placement` says, for the whole graph, whether
its result is the same at every world size.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..graph import Graph
from .conclusions import Reading, read_graph
from .layer import read_any

__all__ = ["ASSUME_COLLECTIVES", "read_placement"]

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
    from ..topologies import ACCUMULATES, LEAVES, TOPOLOGIES, build_graph, build_layer_graph

    try:
        hidden, chunk = meta["hidden_size"], meta["chunk_size"]
        topology, leaf, accumulate = meta["topology"], meta["leaf"], meta["accumulate"]
    except KeyError:
        return None
    if (topology not in TOPOLOGIES or leaf not in LEAVES or accumulate not in ACCUMULATES
            or not isinstance(hidden, int) or not isinstance(chunk, int)):
        return None
    if meta.get("norm") == "layer":  # LayerNorm's reading: both reductions' expression
        layer = build_layer_graph(hidden, chunk_size=chunk, topology=str(topology), leaf=str(leaf),
                                  accumulate=str(accumulate))
        return read_any(layer).expression
    single = build_graph(hidden, chunk_size=chunk, topology=str(topology), leaf=str(leaf),
                         accumulate=str(accumulate))
    return read_graph(single).expression

