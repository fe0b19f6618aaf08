"""Builders: RMSNorm merge DAGs for every topology of the original report (and,
in :mod:`.layer`, LayerNorm's two DAGs of the same shape: :func:`build_layer_graph`).

A graph is a function of ``(hidden_size, chunk_size, topology, leaf,
accumulate)`` -- plus the model-facing semantics ``casting_mode``, ``offset`` and
``residual``, attributes of its FINALIZE and INPUT nodes -- and nothing else: never of the batch size, the thread count or
the device.  That is what lets the prover certify batch invariance from the
graph alone.

Chunks are ``[k * chunk_size, min((k + 1) * chunk_size, hidden_size))``; a ragged
last chunk is normal.  The merge topologies over the chunk partials
``p0 .. p(n-1)`` are:

``linear``   left fold ``((p0 + p1) + p2) + ...`` (the report's V1, fixed index order)
``tree``     pairwise levels, an odd element carried up unchanged (the report's V3)
``race``     one ACCUMULATE: ``acc += p`` in arrival order (the report's V2, and its
             unlocked "variant")
``cat``      one CATSUM: ``torch.sum(torch.cat(parts))`` (the report's V4)
``standard`` no chunks: one opaque ``torch.nn.functional.rms_norm`` node
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from itertools import repeat

from .. import caches
from ..constants import BACKWARD_ROW_BLOCK as ROW_BLOCK
from ..errors import ConfigError
from ..graph import Attrs, Graph, Node, Op, gc_paused, validate
from ..graph.nodes import make_attrs, make_nodes

__all__ = [
    "TOPOLOGIES",
    "LEAVES",
    "ACCUMULATES",
    "CASTING_MODES",
    "build_graph",
    "build_layer_graph",
    "build_input_grad_graph",
    "build_weight_grad_graph",
    "check_reduction",
    "check_semantics",
    "chunk_bounds",
    "merge_linear",
    "merge_tree",
]

TOPOLOGIES: tuple[str, ...] = ("standard", "linear", "tree", "race", "cat")
LEAVES: tuple[str, ...] = ("pairwise", "native")
ACCUMULATES: tuple[str, ...] = ("float", "exact")
CASTING_MODES: tuple[str, ...] = ("torch", "llama", "gemma")  # kernels.CASTING_MODES (no torch here)

INPUT_ID = "x"
OUTPUT_ID = "y"


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "an integer >= 1")
    return value


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_semantics(casting_mode: object, offset: object, residual: object) -> tuple[str, float, bool]:
    """``(casting_mode, offset, residual)`` checked: ConfigError (a ValueError) for a
    casting mode outside :data:`CASTING_MODES`, a non-finite or non-number offset,
    or a residual flag that is not a bool.  ``-0.0`` becomes ``0.0`` (no offset)."""
    _check_choice("casting_mode", casting_mode, CASTING_MODES)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ConfigError("offset", offset, "a finite float")
    if not isinstance(residual, bool):
        raise ConfigError("residual", residual, "True or False")
    return str(casting_mode), float(offset) + 0.0, residual


def check_reduction(hidden_size: object, chunk_size: object, topology: object, leaf: object,
                    accumulate: object) -> None:
    """The options every norm's merge DAG takes, checked: ConfigError (a ValueError) for
    a size that is not an integer >= 1, a choice outside its list, or an exact
    ``"standard"`` (torch's own kernel has no exact form)."""
    _check_positive_int("hidden_size", hidden_size)
    _check_positive_int("chunk_size", chunk_size)
    _check_choice("topology", topology, TOPOLOGIES)
    _check_choice("leaf", leaf, LEAVES)
    _check_choice("accumulate", accumulate, ACCUMULATES)
    if topology == "standard" and accumulate != "float":
        raise ConfigError(
            "accumulate", accumulate, "'float' with topology='standard' (torch's own kernel)"
        )


def chunk_bounds(hidden_size: int, chunk_size: int) -> tuple[tuple[int, int], ...]:
    """``[(start, stop), ...]`` of every chunk; the last one may be shorter."""
    _check_positive_int("hidden_size", hidden_size)
    _check_positive_int("chunk_size", chunk_size)
    return tuple(
        (start, min(start + chunk_size, hidden_size))
        for start in range(0, hidden_size, chunk_size)
    )


def merge_linear(parts: Sequence[str], op: Op = Op.ADD, prefix: str = "fold") -> tuple[list[Node], str]:
    """Left fold over ``parts``: returns the new nodes and the id of the root."""
    ids = list(map(f"{prefix}{{}}".format, range(1, len(parts))))
    accs = [parts[0], *ids[:-1]]  # fold k adds part k to fold k-1 (to part 0 for k = 1)
    nodes = make_nodes(ids, op, zip(accs, parts[1:]))
    return nodes, ids[-1] if ids else parts[0]


def merge_tree(parts: Sequence[str], op: Op = Op.ADD, prefix: str = "tree") -> tuple[list[Node], str]:
    """Pairwise levels; an odd last element is carried up unchanged (the report's V3)."""
    nodes: list[Node] = []
    level_ids = list(parts)
    level = 0
    while len(level_ids) > 1:
        level += 1
        attrs = Attrs.from_sorted((("level", level),))  # one per level, shared
        ids = list(map(f"{prefix}{level}.{{}}".format, range(len(level_ids) // 2)))
        nodes += make_nodes(ids, op, zip(level_ids[0::2], level_ids[1::2]), attrs)
        if len(level_ids) % 2:
            ids.append(level_ids[-1])
        level_ids = ids
    return nodes, level_ids[0]


def _merge(topology: str, parts: Sequence[str]) -> tuple[list[Node], str]:
    if topology == "linear":
        return merge_linear(parts)
    if topology == "tree":
        return merge_tree(parts)
    if topology == "race":
        node = Node("accumulate", Op.ACCUMULATE, tuple(parts))
        return [node], node.id
    node = Node("catsum", Op.CATSUM, tuple(parts))
    return [node], node.id


def build_graph(
    hidden_size: int,
    *,
    chunk_size: int = 64,
    topology: str = "tree",
    leaf: str = "pairwise",
    accumulate: str = "float",
    casting_mode: str = "torch",
    offset: float = 0.0,
    residual: bool = False,
) -> Graph:
    """Build the RMSNorm merge DAG for one configuration.

    Parameters
    ----------
    hidden_size:
        ``D``, the length of the normalised (last) dimension; ``>= 1``.
    chunk_size:
        Length of each chunk; ``>= 1``.  ``chunk_size >= hidden_size`` gives one chunk.
    topology:
        ``"tree"`` (default), ``"linear"``, ``"race"``, ``"cat"`` or ``"standard"``.
    leaf:
        ``"pairwise"`` (explicit halving, fully specified order) or ``"native"``
        (``torch.sum``; its order is the backend's).  Ignored by ``"standard"``.
    accumulate:
        ``"float"``: partial sums in the accumulation dtype (fp32, or fp64 for fp64
        inputs).  ``"exact"``: Demmel-Nguyen pre-rounded fp64 sums (docs/exact.md).
    casting_mode, offset:
        How FINALIZE rounds (``"torch"``, ``"llama"`` or ``"gemma"``) and what it adds
        to the weight (:func:`taskgraph_norm.kernels.finalize`); attributes of the
        FINALIZE node, present only when not the defaults (so a default graph is
        what it always was).  ``"standard"`` takes only the defaults.
    residual:
        ``True``: the INPUT node is ``h = x + residual`` (attribute ``residual``), and
        the graph normalises ``h`` (a fused residual add).

    Returns
    -------
    Graph
        Validated and cached: the same arguments return the same object.

    Raises
    ------
    ConfigError (a ValueError)
        for a parameter outside its domain.

    Examples
    --------
    >>> g = build_graph(256, chunk_size=64, topology="tree")
    >>> [n.id for n in g if n.op.name == "ADD"]
    ['tree1.0', 'tree1.1', 'tree2.0']
    """
    check_reduction(hidden_size, chunk_size, topology, leaf, accumulate)
    casting_mode, offset, residual = check_semantics(casting_mode, offset, residual)
    if topology == "standard" and (casting_mode, offset) != ("torch", 0.0):
        raise ConfigError(
            "casting_mode" if casting_mode != "torch" else "offset",
            casting_mode if casting_mode != "torch" else offset,
            "the defaults with topology='standard' (torch's own kernel)",
        )
    return _build_cached(hidden_size, chunk_size, topology, leaf, accumulate, casting_mode, offset, residual)


@functools.lru_cache(maxsize=512)
def _build_cached(
    hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str,
    casting_mode: str = "torch", offset: float = 0.0, residual: bool = False,
) -> Graph:
    with gc_paused():
        return _build(hidden_size, chunk_size, topology, leaf, accumulate, casting_mode, offset, residual)


def _build(
    hidden_size: int, chunk_size: int, topology: str, leaf: str, accumulate: str,
    casting_mode: str, offset: float, residual: bool,
) -> Graph:
    meta: dict[str, object] = {
        "hidden_size": hidden_size,
        "chunk_size": chunk_size,
        "topology": topology,
        "leaf": leaf,
        "accumulate": accumulate,
    }
    # The semantics are written only when not the defaults: a graph with the defaults
    # has no such attributes, so its nodes, equality and proof fingerprint are the
    # plain RMSNorm graph's.
    finalize_attrs: dict[str, object] = {}
    if casting_mode != "torch":
        meta["casting_mode"] = finalize_attrs["casting_mode"] = casting_mode
    if offset:
        meta["offset"] = finalize_attrs["offset"] = offset
    if residual:
        meta["residual"] = True
    x = Node(INPUT_ID, Op.INPUT, (), {"residual": True} if residual else {})
    if topology == "standard":
        meta["chunk_size"] = hidden_size
        nodes = [x, Node("rmsnorm", Op.RMSNORM, (x.id,), {"hidden_size": hidden_size})]
        nodes.append(Node(OUTPUT_ID, Op.OUTPUT, ("rmsnorm",)))
        return validate(Graph(nodes, OUTPUT_ID, meta))

    # The chunks [k C, min((k + 1) C, D)), as chunk_bounds gives them, as columns.
    starts = range(0, hidden_size, chunk_size)
    stops = list(range(chunk_size, hidden_size + chunk_size, chunk_size))
    stops[-1] = hidden_size
    count = len(starts)
    nodes = [x]
    leaf_inputs: tuple[str, ...] = (x.id,)
    if accumulate == "exact":
        maxima = list(map("m{}".format, range(count)))
        nodes += make_nodes(maxima, Op.ROWMAX, repeat((x.id,), count), make_attrs(zip(
            zip(repeat("index"), range(count)), zip(repeat("start"), starts),
            zip(repeat("stop"), stops)), count))
        max_nodes, max_root = merge_tree(maxima, op=Op.MAX, prefix="max")
        nodes += max_nodes
        scale = Node("scale", Op.SCALE, (max_root,), {"hidden_size": hidden_size})
        nodes.append(scale)
        leaf_inputs = (x.id, scale.id)
    # Attrs built sorted (domain, index, leaf, start, stop): a graph has a leaf per chunk.
    leaves = list(map("p{}".format, range(count)))
    nodes += make_nodes(leaves, Op.SUMSQ, repeat(leaf_inputs, count), make_attrs(zip(
        repeat(("domain", accumulate)), zip(repeat("index"), range(count)),
        repeat(("leaf", leaf)), zip(repeat("start"), starts), zip(repeat("stop"), stops)), count))
    merge_nodes, total = _merge(topology, leaves)
    nodes += merge_nodes
    nodes.append(
        Node("finalize", Op.FINALIZE, (x.id, total),
             {"hidden_size": hidden_size, "domain": accumulate, **finalize_attrs})
    )
    nodes.append(Node(OUTPUT_ID, Op.OUTPUT, ("finalize",)))
    return validate(Graph(nodes, OUTPUT_ID, meta))

caches.register(_build_cached.cache_clear)


# --- the backward's merge DAGs (docs/prover.md, "The backward") --------------------------

WEIGHT_GRADS: tuple[str, ...] = ("float", "exact")


def build_input_grad_graph(hidden_size: int, **options: object) -> Graph:
    """The merge DAG of ``dx``'s row sum ``s = sum(dy * w * x)``: the forward's graph
    itself (the same object as ``build_graph(hidden_size, **options)``).  The
    backward runs its leaves over the products instead of the squares, and the
    prover reads only the merges, so ``prove`` of this graph certifies ``dx`` too."""
    return build_graph(hidden_size, **options)  # type: ignore[arg-type]


def build_weight_grad_graph(
    rows: int,
    *,
    weight_grad: str = "float",
    row_block: int = ROW_BLOCK,
    micro_batches: Sequence[int] | None = None,
    world_size: int = 1,
) -> Graph:
    """The merge DAG of the weight gradient ``dW = sum over rows of dy * x_hat``.

    ``rows`` rows of one optimizer step are split into ``world_size`` equal,
    contiguous shares (one per rank); each share into backward calls of
    ``micro_batches`` rows each (``None``: one call).  A call's rows are split into
    blocks of ``row_block`` (the last may be shorter), one ROWSUM leaf each.

    ``weight_grad="float"`` (kernels.weight_grad_float): the blocks of a call merge by
    the fixed tree of ADDs (adjacent pairs, an odd block carried up), ROUNDed to the
    weight's dtype; a rank's calls add by ``.grad +=`` in call order (a left fold of
    ADDs); ranks by an all-reduce (an ACCUMULATE, ``placement="all_reduce"``).
    ``"exact"``: exact leaves, ACCUMULATEs (integer additions of the accumulator's
    states: any order), and one ROUND at the end.

    Raises ConfigError (a ValueError) for a parameter outside its domain, a world
    size that does not divide ``rows`` or micro-batches that do not sum to a share.
    """
    _check_positive_int("rows", rows)
    _check_choice("weight_grad", weight_grad, WEIGHT_GRADS)
    _check_positive_int("row_block", row_block)
    _check_positive_int("world_size", world_size)
    if rows % world_size:
        raise ConfigError("world_size", world_size, f"a divisor of rows={rows}")
    share = rows // world_size
    calls = (share,) if micro_batches is None else tuple(micro_batches)
    for count in calls:
        _check_positive_int("micro_batches", count)
    if not calls or sum(calls) != share:
        raise ConfigError("micro_batches", micro_batches,
                          f"row counts >= 1 summing to each rank's {share} rows")
    return _build_weight_grad(rows, weight_grad, row_block, calls, world_size)


@functools.lru_cache(maxsize=128)
def _build_weight_grad(rows: int, weight_grad: str, row_block: int, calls: tuple[int, ...],
                       world_size: int) -> Graph:
    exact = weight_grad == "exact"
    x = Node(INPUT_ID, Op.INPUT)
    nodes: list[Node] = [x]
    rank_totals: list[str] = []
    for rank in range(world_size):
        at = rank * (rows // world_size)
        rank_tag = f"r{rank}." if world_size > 1 else ""
        call_totals: list[str] = []
        for call, count in enumerate(calls):
            tag = rank_tag + (f"m{call}." if len(calls) > 1 else "")
            leaves = [
                Node(f"{tag}b{k}", Op.ROWSUM, (x.id,), {
                    "start": a, "stop": min(a + row_block, at + count), "domain": weight_grad,
                    "index": k, "micro_batch": call, "rank": rank})
                for k, a in enumerate(range(at, at + count, row_block))
            ]
            nodes += leaves
            at += count
            ids = [n.id for n in leaves]
            if exact and len(ids) > 1:  # the accumulator adds blocks in any order
                merged, total = [Node(f"{tag}accumulate", Op.ACCUMULATE, tuple(ids))], f"{tag}accumulate"
            else:
                merged, total = merge_tree(ids, prefix=f"{tag}tree")
            nodes += merged
            if not exact:
                nodes.append(Node(f"{tag}round", Op.ROUND, (total,)))
                total = f"{tag}round"
            call_totals.append(total)
        if exact and len(call_totals) > 1:
            nodes.append(Node(f"{rank_tag}carry", Op.ACCUMULATE, tuple(call_totals)))
            call_totals = [f"{rank_tag}carry"]
        elif len(call_totals) > 1:  # .grad += g, in call order
            folds, last = merge_linear(call_totals, prefix=f"{rank_tag}grad")
            nodes += folds
            call_totals = [last]
        rank_totals += call_totals
    total = rank_totals[0]
    if world_size > 1:
        nodes.append(Node("all_reduce", Op.ACCUMULATE, tuple(rank_totals), {"placement": "all_reduce"}))
        total = "all_reduce"
    if exact:
        nodes.append(Node("round", Op.ROUND, (total,)))
        total = "round"
    nodes.append(Node("dw", Op.OUTPUT, (total,)))
    meta = {"graph": "weight_grad", "rows": rows, "weight_grad": weight_grad, "row_block": row_block,
            "micro_batches": calls, "world_size": world_size}
    return validate(Graph(nodes, "dw", meta))

caches.register(_build_weight_grad.cache_clear)


# LayerNorm's two merge DAGs (topologies/layer.py; imported last: it uses the above).
from .layer import build_layer_graph as build_layer_graph  # noqa: E402
