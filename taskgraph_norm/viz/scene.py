"""What a drawing shows, independent of how it is drawn.

:func:`build_scene` turns a :class:`~taskgraph_norm.graph.Graph` (and optionally
a proof) into a :class:`Scene`: boxes with a *kind* (which decides colour and
shape), links that remember which operand positions they stand for, and a
caption.  The DOT, Mermaid and matplotlib back ends all draw the same scene, so
they cannot disagree about what a node is, which operand comes first, or which
node a refutation blames.

Large graphs are *collapsed*: every group of nodes with the same op and tree
level becomes one box (``SUMSQ x4096``, ``ADD level 1 x2048`` ...), and the links
between two groups become one link that counts its operand edges.

The pieces (the kinds and their styles, :class:`Box`, :class:`Link`,
:class:`Scene`) are defined in ``viz/scene_types.py`` and importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..errors import ConfigError
from ..graph import Graph, Node, Op, validate
from .scene_types import HIGHLIGHT, KIND_OF_OP, KIND_STYLE, Box, KindStyle, Link, Scene

__all__ = [
    "COLLAPSE_THRESHOLD",
    "KIND_OF_OP",
    "KIND_STYLE",
    "Box",
    "Link",
    "Scene",
    "KindStyle",
    "HIGHLIGHT",
    "build_scene",
    "kinds_in",
    "positions_text",
    "should_collapse",
]

#: Graphs with more than this many chunks (``SUMSQ`` leaves), or more than
#: ``6 * COLLAPSE_THRESHOLD`` nodes in all, are drawn collapsed by default.  At 32
#: chunks a full drawing is about 30 inches wide, the most that stays readable
#: when zoomed; beyond it a picture of every node says less than a per-level
#: summary, and Graphviz layout time grows quickly (a 64-chunk linear fold takes
#: seconds, 4096 chunks would take hours).
COLLAPSE_THRESHOLD = 32


def _ranks(graph: Graph) -> dict[str, int]:
    """Longest-path layer of every node (sources are layer 0)."""
    rank: dict[str, int] = {}
    for nid in graph.topological_order:
        node = graph.by_id[nid]
        rank[nid] = 1 + max((rank[s] for s in node.inputs), default=-1)
    return rank


def _chunk_text(node: Node) -> str:
    start, stop = node.attrs.get("start"), node.attrs.get("stop")
    return f"[{start}:{stop})" if start is not None else ""


def _node_lines(node: Node, race_note: bool, caption_leaf: str | None) -> tuple[str, ...]:
    """Label lines of one node: its id, its op and what distinguishes it."""
    lines = [node.id, node.op.name]
    if node.op is Op.ROWSUM:
        lines.append(f"rows {_chunk_text(node)}")
    elif node.op in (Op.SUMSQ, Op.ROWMAX, Op.SUM):
        # The leaf kind is in the caption (graph.meta); name it per node only
        # where a hand-edited node differs from it.
        detail = _chunk_text(node)
        if node.op is not Op.ROWMAX and node.attrs.get("leaf", caption_leaf) != caption_leaf:
            detail = f"{detail} {node.attrs['leaf']}".strip()
        if node.attrs.get("centered"):
            detail += " (x-mean)^2"
        elif node.attrs.get("power") == 1:
            detail += " |x|"
        if detail:
            lines.append(detail)
    elif node.op is Op.ACCUMULATE:
        lines.append(f"{len(node.inputs)} parts, arrival order")
    elif node.op is Op.CATSUM:
        lines.append(f"{len(node.inputs)} parts")
    elif node.op is Op.FINALIZE and ("casting_mode" in node.attrs or "offset" in node.attrs):
        mode, offset = node.attrs.get("casting_mode", "torch"), node.attrs.get("offset", 0.0)
        lines.append(mode + (f", w+{offset:g}" if offset else ""))
    elif node.op is Op.FINALIZE and node.attrs.get("norm") == "layer":
        lines.append("(x-mean)/sqrt(var+eps)*w+b")
    elif node.op is Op.INPUT and node.attrs.get("residual"):
        lines.append("h = x + residual")
    if race_note:
        lines.append("refuted: order varies")
    return tuple(lines)


def _label(consumer: Node | None, positions: Sequence[int], count: int) -> str:
    """Edge label naming operand positions; blank where order cannot be misread: a
    single operand, or an exact-mode leaf's ``(x, scale)``, whose roles differ in
    kind (those labels would crowd every leaf; the DOT ``position`` still says it)."""
    if consumer is not None and (len(consumer.inputs) < 2 or consumer.op in (Op.SUMSQ, Op.SUM, Op.ROWMAX)):
        return ""
    text = positions_text(positions)
    return text if count == 1 else f"{text} \u00d7{count}"


def positions_text(positions: Sequence[int]) -> str:
    """``"0"``, ``"0,1"`` or ``"0..4095"``: short enough for any label or DOT
    attribute (Graphviz rejects quoted strings over 16 KiB)."""
    pos = sorted(set(positions))
    if len(pos) > 2 and pos == list(range(pos[0], pos[-1] + 1)):
        return f"{pos[0]}..{pos[-1]}"
    if len(pos) > 8:
        return ",".join(str(p) for p in pos[:4]) + ",...," + str(pos[-1])
    return ",".join(str(p) for p in pos)


def _blamed(graph: Graph, proof: Any) -> tuple[str, ...]:
    """Nodes a refuting proof is about: the witness's node if it names one,
    else every ACCUMULATE of 3 or more inexact parts (the prover's rule), else
    every ACCUMULATE."""
    if proof is None or getattr(proof, "rule", None) != "refuted":
        return ()
    witness = getattr(proof, "witness", None)
    for attr in ("node", "node_id"):
        named = getattr(witness, attr, None)
        if isinstance(named, str) and named in graph.by_id:
            return (named,)
    races = [n for n in graph.nodes if n.op is Op.ACCUMULATE]
    wide = [n.id for n in races if len(n.inputs) >= 3]
    return tuple(wide) if wide else tuple(n.id for n in races)


def _yes(value: object) -> str:
    return "yes" if value else "NO"


def _caption(graph: Graph, proof: Any, blamed: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    meta = graph.meta
    parts = [str(meta["topology"])] if "topology" in meta else []
    for key, short in (("hidden_size", "D"), ("chunk_size", "chunk")):
        if key in meta:
            parts.append(f"{short}={meta[key]}")
    for key in ("leaf", "accumulate"):
        if key in meta:
            parts.append(f"{key} {meta[key]}")
    if meta.get("graph") == "weight_grad":  # topologies.build_weight_grad_graph
        parts = [f"weight gradient \u00b7 {meta['rows']} rows \u00b7 {meta['weight_grad']}",
                 f"micro_batches {list(meta['micro_batches'])}", f"world_size {meta['world_size']}"]
    title = " \u00b7 ".join(parts) or f"graph of {len(graph)} nodes"
    if proof is None:
        return title, ()
    lines = [
        f"deterministic: {_yes(getattr(proof, 'deterministic', False))}"
        f" \u00b7 {'batch' if getattr(proof, 'micro_batch_invariant', None) is None else 'micro-batch- and world-size'}"
        f"-invariant: {_yes(getattr(proof, 'batch_invariant', False))}"
        f" \u00b7 rule: {getattr(proof, 'rule', '?')}",
        f"fingerprint: {getattr(proof, 'fingerprint', '?')}",
    ]
    if blamed:
        lines.append("reason: arrival-order merge at " + ", ".join(blamed))
    return title, tuple(lines)


def _full_scene(graph: Graph, rank: Mapping[str, int], blamed: Sequence[str]) -> tuple[
    tuple[Box, ...], tuple[Link, ...]
]:
    leaf = graph.meta.get("leaf")
    boxes = tuple(
        Box(
            key=n.id,
            op=n.op,
            kind=_kind(graph, n),
            lines=_node_lines(n, n.id in blamed, leaf),
            rank=rank[n.id],
            highlight=n.id in blamed,
        )
        for n in graph.nodes
    )
    links = tuple(
        Link(src, n.id, (pos,), 1, _label(n, (pos,), 1), n.op is not Op.ACCUMULATE)
        for n in graph.nodes
        for pos, src in enumerate(n.inputs)
    )
    return boxes, links


def _kind(graph: Graph, node: Node) -> str:
    """The node's kind; an exact weight gradient's ACCUMULATEs add integers (any order)."""
    if node.op is Op.ACCUMULATE and graph.meta.get("weight_grad") == "exact":
        return "exactmerge"
    return KIND_OF_OP[node.op]


def _reduction(node: Node) -> str:
    """``"mean "`` or ``"var "`` for a node of one of LayerNorm's two DAGs (their ids
    start so), else ``""``: collapsed boxes never mix the two reductions."""
    head = node.id.split(".", 1)[0]
    return head + " " if head in ("mean", "var") and "." in node.id else ""


def _group_key(node: Node) -> str:
    level = node.attrs.get("level")
    return _reduction(node) + (node.op.name if level is None else f"{node.op.name}.{level}")


def _group_lines(members: Sequence[Node]) -> tuple[str, ...]:
    first = members[0]
    level = first.attrs.get("level")
    head = _reduction(first) + (first.op.name if level is None else f"{first.op.name} level {level}")
    lines = [f"{head} \u00d7{len(members)}" if len(members) > 1 else head]
    if len(members) == 1:
        lines.insert(0, first.id)
    if first.op in (Op.SUMSQ, Op.ROWMAX, Op.ROWSUM, Op.SUM):
        widths = sorted({n.attrs.get("stop", 0) - n.attrs.get("start", 0) for n in members})
        if widths:
            lines.append("width " + "/".join(str(w) for w in widths[::-1][:2]))
        if first.op in (Op.SUMSQ, Op.SUM) and "leaf" in first.attrs:
            lines.append(str(first.attrs["leaf"]))
    elif first.op in (Op.ACCUMULATE, Op.CATSUM):
        lines.append(f"{len(first.inputs)} parts" + (", arrival order" if first.op is Op.ACCUMULATE else ""))
    return tuple(lines)


def _collapsed_scene(graph: Graph, rank: Mapping[str, int], blamed: Sequence[str]) -> tuple[
    tuple[Box, ...], tuple[Link, ...]
]:
    groups: dict[str, list[Node]] = {}
    for n in graph.nodes:
        groups.setdefault(_group_key(n), []).append(n)
    group_of = {n.id: key for key, members in groups.items() for n in members}
    boxes = []
    for key, members in groups.items():
        hit = any(n.id in blamed for n in members)
        lines = _group_lines(members) + (("refuted: order varies",) if hit else ())
        boxes.append(
            Box(key, members[0].op, _kind(graph, members[0]), lines,
                min(rank[n.id] for n in members), len(members), hit)
        )
    # A left fold spans ranks 2..n+1 but is one box: renumber the groups' ranks
    # densely so the boxes after it do not sit n rows further down.
    dense = {r: i for i, r in enumerate(sorted({b.rank for b in boxes}))}
    boxes = [replace(b, rank=dense[b.rank]) for b in boxes]
    # One link per (source group, target group); it keeps every position it covers.
    edges: dict[tuple[str, str], tuple[list[int], list[Node]]] = {}
    for n in graph.nodes:
        for pos, src in enumerate(n.inputs):
            positions, consumers = edges.setdefault((group_of[src], group_of[n.id]), ([], []))
            positions.append(pos)
            consumers.append(n)
    links = []
    for (src, dst), (positions, consumers) in edges.items():
        widest = max(consumers, key=lambda c: len(c.inputs))
        links.append(
            Link(src, dst, tuple(sorted(set(positions))), len(positions),
                 _label(widest, positions, len(positions)), widest.op is not Op.ACCUMULATE)
        )
    boxes.sort(key=lambda b: b.rank)
    return tuple(boxes), tuple(links)


def should_collapse(graph: Graph, threshold: int = COLLAPSE_THRESHOLD) -> bool:
    """True when :func:`build_scene` collapses ``graph`` by default (see
    :data:`COLLAPSE_THRESHOLD`)."""
    leaves = sum(1 for n in graph.nodes if n.op is Op.SUMSQ or n.op is Op.ROWSUM or n.op is Op.SUM)
    return leaves > threshold or len(graph) > 6 * threshold


def build_scene(
    graph: Graph,
    proof: Any = None,
    *,
    collapse: bool | None = None,
    threshold: int = COLLAPSE_THRESHOLD,
) -> Scene:
    """Describe what to draw for ``graph``.

    Parameters
    ----------
    graph:
        Validated first; a broken graph raises instead of drawing half a picture.
    proof:
        Optional, duck-typed: ``deterministic``, ``batch_invariant``, ``rule``,
        ``fingerprint`` and optionally ``witness`` (whose ``node`` or ``node_id``,
        if present, names the node to blame).  With ``rule == "refuted"`` the
        blamed race node is highlighted.
    collapse:
        ``None`` (default) collapses above ``threshold`` chunks; ``True``/``False`` force it.
    threshold:
        Chunk count above which ``collapse=None`` collapses; an integer ``>= 1``.

    Returns
    -------
    Scene

    Raises
    ------
    GraphError, CycleError
        if the graph is invalid.
    ConfigError
        if ``threshold`` is not a positive integer.

    Examples
    --------
    >>> from taskgraph_norm.topologies import build_graph
    >>> build_scene(build_graph(8192, chunk_size=64, topology="tree")).collapsed
    True
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError("threshold", threshold, "an integer >= 1")
    validate(graph)
    if collapse is None:
        collapse = should_collapse(graph, threshold)
    rank = _ranks(graph)
    blamed = _blamed(graph, proof)
    boxes, links = (_collapsed_scene if collapse else _full_scene)(graph, rank, blamed)
    title, caption = _caption(graph, proof, blamed)
    if collapse:
        title += f" \u00b7 collapsed ({len(graph)} nodes)"
    highlighted = tuple(b.key for b in boxes if b.highlight)
    return Scene(boxes, links, title, caption, bool(collapse), highlighted)


def kinds_in(boxes: Iterable[Box]) -> list[str]:
    """The kinds present, in :data:`KIND_STYLE` order (for legends)."""
    present = {b.kind for b in boxes}
    return [k for k in KIND_STYLE if k in present]
