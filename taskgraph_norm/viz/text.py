"""Text forms of a drawing: Graphviz DOT and Mermaid.  Pure string building,
no optional dependency: these work everywhere the IR does."""

from __future__ import annotations

from typing import Any

from ..graph import Graph
from .scene import HIGHLIGHT, KIND_STYLE, Box, Scene, build_scene, positions_text

__all__ = ["to_dot", "to_mermaid", "scene_to_dot", "scene_to_mermaid"]


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_box(box: Box) -> str:
    style = HIGHLIGHT if box.highlight else KIND_STYLE[box.kind]
    attrs = {
        "label": "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in box.lines),
        "shape": KIND_STYLE[box.kind].shape,
        "style": "filled,rounded" if KIND_STYLE[box.kind].shape == "box" else "filled",
        "fillcolor": style.fill,
        "color": style.stroke,
        "penwidth": "3" if box.highlight else "1.2",
        "kind": box.kind,
        "op": box.op.name,
    }
    if box.count > 1:
        # Stacked look: a collapsed group is many nodes.
        attrs["peripheries"] = "2"
    body = ", ".join(
        f'{k}="{v}"' if k == "label" else f"{k}={_dot_str(str(v))}" for k, v in attrs.items()
    )
    return f"  {_dot_str(box.key)} [{body}];"


def scene_to_dot(scene: Scene, *, dpi: int | None = None) -> str:
    """DOT text for a :class:`~taskgraph_norm.viz.scene.Scene` (see :func:`to_dot`)."""
    caption = "\\n".join(
        line.replace("\\", "\\\\").replace('"', '\\"') for line in (scene.title, *scene.caption)
    )
    out = [
        "digraph merge_dag {",
        # ordering=in keeps each node's operands left-to-right in operand order.
        f'  graph [rankdir=TB, ordering=in, concentrate=true, nodesep=0.25, ranksep=0.5, labelloc=b, '
        f'labeljust=c, fontname="Helvetica", fontsize=13, label="{caption}"'
        + (f", dpi={dpi}" if dpi else "")
        + "];",
        '  node [fontname="Helvetica", fontsize=11, margin="0.08,0.04"];',
        '  edge [fontname="Helvetica", fontsize=10, color="#555555", arrowsize=0.6];',
    ]
    out += [_dot_box(b) for b in scene.boxes]
    # Keep all chunk leaves on one row in chunk order; otherwise dot sinks later
    # leaves of a linear fold down next to the merge that uses them.
    for kind in ("leaf", "sumleaf", "exact", "rowleaf"):
        by_rank: dict[int, list[str]] = {}
        for b in scene.boxes:
            if b.kind == kind and b.op.name in ("SUMSQ", "ROWMAX", "ROWSUM", "SUM"):
                by_rank.setdefault(b.rank, []).append(_dot_str(b.key))
        for row in by_rank.values():
            if len(row) > 1:
                out.append("  { rank=same; " + "; ".join(row) + "; }")
    rank = {b.key: b.rank for b in scene.boxes}
    kind_of = {b.key: b.kind for b in scene.boxes}
    fanout: dict[str, int] = {b.key: 0 for b in scene.boxes}
    for link in scene.links:
        fanout[link.src] += 1
    for link in scene.links:
        attrs = [f"position={_dot_str(positions_text(link.positions))}"]
        if link.label:
            # A label sits mid-edge; on an edge that skips ranks (a leaf into a
            # late fold, the input into FINALIZE) that is far from the merge it
            # orders, so put it by the arrowhead instead.
            where = "headlabel" if rank[link.dst] - rank[link.src] > 1 else "label"
            attrs.append(f"{where}={_dot_str(' ' + link.label + ' ')}")
            attrs.append('fontcolor="#1c4587"')
            if where == "headlabel":
                attrs.append("labelfontcolor=\"#1c4587\", labeldistance=1.8, labelangle=-30")
        if link.count > 1:
            attrs.append(f"count={link.count}")
            attrs.append("penwidth=2")
        if not link.ordered:
            attrs.append("style=dashed")
            attrs.append('color="#990000"')
        if kind_of[link.dst] == "leaf" and rank[link.dst] - rank[link.src] > 1 and fanout[link.src] > 2:
            # In exact mode the input also feeds every leaf far below it; letting
            # those long edges pull the layout straight scatters the leaves across the page.
            attrs.append("weight=0")
        out.append(f"  {_dot_str(link.src)} -> {_dot_str(link.dst)} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def to_dot(graph: Graph, proof: Any = None, *, collapse: bool | None = None) -> str:
    """The merge DAG as Graphviz DOT text.

    Every graph node is a DOT node named by its id, with the op, the kind and a
    style per kind; every operand is one edge carrying ``position`` (its index in
    the consumer's inputs) and, where the consumer has two or more operands, the
    same number as its ``label``, so operand order is visible and can be parsed
    back.  ACCUMULATE operands are dashed: their positions do not fix the order
    of the additions.  Collapsed graphs (see :data:`COLLAPSE_THRESHOLD`) have one
    node per op and level and one edge per pair of groups, labelled
    ``positions xcount``.

    Parameters
    ----------
    graph:
        The merge DAG (validated first).
    proof:
        Optional proof, duck-typed (``deterministic``, ``batch_invariant``,
        ``rule``, ``fingerprint``, optional ``witness``): its verdict, rule and
        fingerprint go in the caption; a refuted race node is drawn red.
    collapse:
        ``None`` collapses large graphs automatically; ``True``/``False`` force it.

    Returns
    -------
    str
        DOT source, for ``dot -Tsvg`` or :func:`render`.

    Raises
    ------
    GraphError, CycleError
        if the graph is invalid.

    Examples
    --------
    >>> from taskgraph_norm import build_graph
    >>> print(to_dot(build_graph(128, chunk_size=64, topology="linear")).splitlines()[0])
    digraph merge_dag {
    """
    return scene_to_dot(build_scene(graph, proof, collapse=collapse))


# Mermaid node shapes per kind: (open, close) around the quoted label.
_MERMAID_SHAPE = {
    "io": ("([", "])"),
    "leaf": ("[", "]"),
    "merge": ("(", ")"),
    "race": ("{{", "}}"),
    "catsum": ("[/", "\\]"),
    "exact": ("[[", "]]"),
    "finalize": ("[", "]"),
    "opaque": ("[(", ")]"),
    "rowleaf": ("[", "]"),
    "sumleaf": ("[", "]"),
    "mean": ("[", "]"),
    "exactmerge": ("[[", "]]"),
    "round": ("[", "]"),
}


def _mermaid_str(text: str) -> str:
    # Mermaid has no backslash escapes inside quoted labels; it takes entity codes.
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def scene_to_mermaid(scene: Scene) -> str:
    """Mermaid flowchart text for a :class:`~taskgraph_norm.viz.scene.Scene`."""
    # Graph ids like "tree1.0" are not valid Mermaid ids; number the boxes instead
    # and keep the real id as the first label line.
    mid = {box.key: f"n{i}" for i, box in enumerate(scene.boxes)}
    title = " | ".join((scene.title, *scene.caption))
    out = ["---", f'title: "{_mermaid_str(title)}"', "---", "flowchart TB"]
    for box in scene.boxes:
        open_, close = _MERMAID_SHAPE[box.kind]
        label = "<br/>".join(_mermaid_str(line) for line in box.lines)
        out.append(f'  {mid[box.key]}{open_}"{label}"{close}')
    for link in scene.links:
        arrow = "-->" if link.ordered else "-.->"
        label = f'|"{_mermaid_str(link.label)}"|' if link.label else ""
        out.append(f"  {mid[link.src]} {arrow}{label} {mid[link.dst]}")
    for kind, style in KIND_STYLE.items():
        out.append(f"  classDef {kind} fill:{style.fill},stroke:{style.stroke},color:#000")
    out.append(
        f"  classDef refuted fill:{HIGHLIGHT.fill},stroke:{HIGHLIGHT.stroke},stroke-width:3px,color:#000"
    )
    by_kind: dict[str, list[str]] = {}
    for box in scene.boxes:
        by_kind.setdefault("refuted" if box.highlight else box.kind, []).append(mid[box.key])
    for kind, ids in by_kind.items():
        out.append(f"  class {','.join(ids)} {kind}")
    return "\n".join(out) + "\n"


def to_mermaid(graph: Graph, proof: Any = None, *, collapse: bool | None = None) -> str:
    """The merge DAG as a Mermaid flowchart (renders on GitHub and in most docs tools).

    Nodes are numbered ``n0, n1, ...`` in build order (graph ids are not valid
    Mermaid ids); the first line of each label is the graph id.  Edges into
    nodes of two or more operands are labelled with the operand position;
    ACCUMULATE operands are dotted.  The caption (configuration, and the proof's
    verdict, rule and fingerprint when given) is the diagram title.

    Parameters
    ----------
    graph, proof, collapse:
        As for :func:`to_dot`.

    Returns
    -------
    str
        Mermaid source starting with a ``---`` title block and ``flowchart TB``.

    Raises
    ------
    GraphError, CycleError
        if the graph is invalid.

    Examples
    --------
    >>> from taskgraph_norm import build_graph
    >>> "flowchart TB" in to_mermaid(build_graph(128, chunk_size=64, topology="tree"))
    True
    """
    return scene_to_mermaid(build_scene(graph, proof, collapse=collapse))
