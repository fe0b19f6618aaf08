"""LayerNorm's builder: two merge DAGs of RMSNorm's shape, one for the mean, one
for the variance (docs/design.md, "LayerNorm").

``y = (x - mean) / sqrt(var + eps) * w + b`` over the last dim.  The graph holds:

* the **mean's reduction**: a ``SUM`` leaf per chunk (the plain sum of
  ``x[a:b]``), merged by the topology's DAG, then ``MEAN`` (the total over ``D``);
* the **variance's reduction**: a centered ``SUMSQ`` leaf per chunk (the sum of
  ``d * d``, ``d = x[a:b] - mean``, each ``d`` rounded once), merged by a DAG of the
  same shape: two-pass, never ``E[x^2] - E[x]^2``;
* ``FINALIZE`` with ``norm="layer"`` and operands ``(x, variance total, mean)``.

In the exact domain each reduction has its own max phase (``ROWMAX`` leaves, ``MAX``
tree, ``SCALE``): of ``|x|`` (attr ``power=1``) for the mean, of ``d * d`` (attr
``centered=True``) for the variance.  Ids: the mean's nodes start with ``mean.``,
the variance's with ``var.``; the ``MEAN`` node is ``mean``.  ``"standard"`` is one
opaque ``LAYERNORM`` node (``F.layer_norm``), the baseline.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import repeat

from .. import caches
from ..errors import ConfigError
from ..graph import Attrs, Graph, Node, Op, gc_paused, validate
from ..graph.nodes import make_attrs, make_nodes
from . import INPUT_ID, OUTPUT_ID, check_reduction, merge_linear, merge_tree

__all__ = ["build_layer_graph", "MEAN_ID"]

#: The id of the MEAN node (the variance's leaves and FINALIZE read it).
MEAN_ID = "mean"


def build_layer_graph(
    hidden_size: int,
    *,
    chunk_size: int = 64,
    topology: str = "tree",
    leaf: str = "pairwise",
    accumulate: str = "float",
    residual: bool = False,
) -> Graph:
    """Build the LayerNorm graph for one configuration: the mean's and the variance's
    merge DAGs, each of the shape :func:`~taskgraph_norm.topologies.build_graph`
    gives RMSNorm for the same arguments.

    Parameters are those of :func:`~taskgraph_norm.topologies.build_graph` (no
    casting mode or offset: LayerNorm multiplies by ``w`` and adds ``b`` in the
    accumulation dtype).  ``"standard"`` is one opaque ``F.layer_norm`` node and
    takes ``accumulate="float"`` only.

    Returns
    -------
    Graph
        Validated and cached: the same arguments return the same object; its
        ``meta`` has ``norm="layer"``.

    Raises
    ------
    ConfigError (a ValueError)
        for a parameter outside its domain.

    Examples
    --------
    >>> g = build_layer_graph(256, chunk_size=64, topology="tree")
    >>> [n.id for n in g if n.op.name == "ADD"]
    ['mean.tree1.0', 'mean.tree1.1', 'mean.tree2.0', 'var.tree1.0', 'var.tree1.1', 'var.tree2.0']
    """
    check_reduction(hidden_size, chunk_size, topology, leaf, accumulate)
    if not isinstance(residual, bool):
        raise ConfigError("residual", residual, "True or False")
    return _build_cached(hidden_size, chunk_size, topology, leaf, accumulate, residual)


@functools.lru_cache(maxsize=256)
def _build_cached(hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str,
                  residual: bool) -> Graph:
    with gc_paused():
        return _build(hidden_size, chunk_size, topology, leaf, accumulate, residual)


def _build(hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str,
           residual: bool) -> Graph:
    meta: dict[str, object] = {
        "norm": "layer", "hidden_size": hidden_size, "chunk_size": chunk_size,
        "topology": topology, "leaf": leaf, "accumulate": accumulate,
    }
    if residual:
        meta["residual"] = True
    x = Node(INPUT_ID, Op.INPUT, (), {"residual": True} if residual else {})
    if topology == "standard":
        meta["chunk_size"] = hidden_size
        nodes = [x, Node("layernorm", Op.LAYERNORM, (x.id,), {"hidden_size": hidden_size}),
                 Node(OUTPUT_ID, Op.OUTPUT, ("layernorm",))]
        return validate(Graph(nodes, OUTPUT_ID, meta))
    starts = range(0, hidden_size, chunk_size)
    stops = list(range(chunk_size, hidden_size + chunk_size, chunk_size))
    stops[-1] = hidden_size
    shape = (hidden_size, starts, stops, topology, leaf, accumulate)
    nodes = [x]
    mean_nodes, sum_total = _reduction("mean.", Op.SUM, (x.id,), shape)
    nodes += mean_nodes
    nodes.append(Node(MEAN_ID, Op.MEAN, (sum_total,), {"hidden_size": hidden_size, "domain": accumulate}))
    var_nodes, var_total = _reduction("var.", Op.SUMSQ, (x.id, MEAN_ID), shape)
    nodes += var_nodes
    nodes.append(Node("finalize", Op.FINALIZE, (x.id, var_total, MEAN_ID),
                      {"hidden_size": hidden_size, "domain": accumulate, "norm": "layer"}))
    nodes.append(Node(OUTPUT_ID, Op.OUTPUT, ("finalize",)))
    return validate(Graph(nodes, OUTPUT_ID, meta))


def _reduction(prefix: str, op: Op, reads: tuple[str, ...],
               shape: tuple[int, range, list[int], str, str, str]) -> tuple[list[Node], str]:
    """One reduction's nodes (max phase when exact, leaves, merges) and its root's id.
    ``op`` is SUM (the mean's leaves, ``reads == (x,)``) or SUMSQ (the variance's
    centered leaves, ``reads == (x, mean)``)."""
    hidden_size, starts, stops, topology, leaf, accumulate = shape
    count = len(starts)
    centered = op is Op.SUMSQ
    extra = (("centered", True),) if centered else ()
    nodes: list[Node] = []
    leaf_inputs = reads
    if accumulate == "exact":
        # Attrs sorted by name: centered, index, power, start, stop.
        kind = extra if centered else (("power", 1),)
        maxima = list(map(f"{prefix}m{{}}".format, range(count)))
        nodes += make_nodes(maxima, Op.ROWMAX, repeat(reads, count), make_attrs(
            (tuple(sorted((*kind, ("index", k), ("start", a), ("stop", b)))) for k, a, b in
             zip(range(count), starts, stops)), count))
        max_nodes, max_root = merge_tree(maxima, op=Op.MAX, prefix=f"{prefix}max")
        nodes += max_nodes
        scale = Node(f"{prefix}scale", Op.SCALE, (max_root,), {"hidden_size": hidden_size})
        nodes.append(scale)
        leaf_inputs = (*reads, scale.id)
    leaves = list(map(f"{prefix}p{{}}".format, range(count)))
    nodes += make_nodes(leaves, op, repeat(leaf_inputs, count), make_attrs(
        (Attrs.from_sorted((*extra, ("domain", accumulate), ("index", k), ("leaf", leaf),
                            ("start", a), ("stop", b))).pairs
         for k, a, b in zip(range(count), starts, stops)), count))
    merges, total = _merge(topology, leaves, prefix)
    return nodes + merges, total


def _merge(topology: str, parts: Sequence[str], prefix: str) -> tuple[list[Node], str]:
    if topology == "linear":
        return merge_linear(parts, prefix=f"{prefix}fold")
    if topology == "tree":
        return merge_tree(parts, prefix=f"{prefix}tree")
    node = (Node(f"{prefix}accumulate", Op.ACCUMULATE, tuple(parts)) if topology == "race"
            else Node(f"{prefix}catsum", Op.CATSUM, tuple(parts)))
    return [node], node.id


caches.register(_build_cached.cache_clear)
