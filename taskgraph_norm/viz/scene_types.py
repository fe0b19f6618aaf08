"""The pieces a scene is made of (viz/scene.py builds them): the kinds of box and how
each looks (colour and Graphviz shape, one legend line), the boxes, the links between
them and the scene itself.  Every back end (DOT, Mermaid, matplotlib, the timeline)
reads the same kinds and styles from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..graph import Op

__all__ = ["KIND_OF_OP", "KIND_STYLE", "HIGHLIGHT", "Box", "KindStyle", "Link", "Scene"]


@dataclass(frozen=True, slots=True)
class KindStyle:
    """How one kind of box looks; ``shape`` is a Graphviz shape name."""

    fill: str
    stroke: str
    shape: str
    legend: str


#: Node kinds, chosen so the questions a reader asks are answered by colour:
#: where the sums start, which merges have a fixed order, which do not.
KIND_OF_OP: Mapping[Op, str] = {
    Op.INPUT: "io",
    Op.OUTPUT: "io",
    Op.SUMSQ: "leaf",
    Op.SUM: "sumleaf",
    Op.MEAN: "mean",
    Op.ADD: "merge",
    Op.ACCUMULATE: "race",
    Op.CATSUM: "catsum",
    Op.ROWMAX: "exact",
    Op.MAX: "exact",
    Op.SCALE: "exact",
    Op.FINALIZE: "finalize",
    Op.RMSNORM: "opaque",
    Op.LAYERNORM: "opaque",
    Op.ROWSUM: "rowleaf",
    Op.ROUND: "round",
}

KIND_STYLE: Mapping[str, KindStyle] = {
    "io": KindStyle("#eeeeee", "#666666", "oval", "input / output"),
    "leaf": KindStyle("#cfe2f3", "#3d85c6", "box", "SUMSQ leaf (chunk sum of squares)"),
    "sumleaf": KindStyle("#d0e0e3", "#45818e", "box", "SUM leaf (LayerNorm: chunk sum of x)"),
    "mean": KindStyle("#fce5cd", "#b45f06", "box", "MEAN: total / D (LayerNorm)"),
    "merge": KindStyle("#d9ead3", "#38761d", "ellipse", "ADD: ordered merge (0 + 1)"),
    "race": KindStyle("#f4cccc", "#990000", "doubleoctagon", "ACCUMULATE: arrival-order merge"),
    "catsum": KindStyle("#fff2cc", "#bf9000", "invtrapezium", "CATSUM: sum(cat(parts)), backend order"),
    "exact": KindStyle("#d9d2e9", "#674ea7", "hexagon", "exact domain: ROWMAX / MAX / SCALE"),
    "finalize": KindStyle("#fce5cd", "#b45f06", "box", "FINALIZE: x / sqrt(total/D + eps) * w"),
    "opaque": KindStyle("#cccccc", "#434343", "box3d", "opaque torch kernel"),
    "rowleaf": KindStyle("#cfe2f3", "#3d85c6", "box", "ROWSUM leaf (a row block's sum of dy * x_hat)"),
    "exactmerge": KindStyle("#d9d2e9", "#674ea7", "hexagon", "exact merge: integer addition, any order"),
    "round": KindStyle("#fce5cd", "#b45f06", "box", "ROUND: to the weight's dtype"),
}

#: Colours of a node the proof blames (a race that breaks determinism).
HIGHLIGHT = KindStyle("#ea9999", "#cc0000", "doubleoctagon", "refuted: the reason")


@dataclass(frozen=True, slots=True)
class Box:
    """One drawn node: a graph node, or in collapsed mode a group of nodes.

    ``key`` is unique within the scene; ``rank`` is the layer (longest path
    from a source), used by layouts that do not compute their own.
    """

    key: str
    op: Op
    kind: str
    lines: tuple[str, ...]
    rank: int
    count: int = 1
    highlight: bool = False


@dataclass(frozen=True, slots=True)
class Link:
    """One drawn edge ``src -> dst``.

    ``positions`` are the operand positions in ``dst``'s inputs this link stands
    for (one position in a full drawing, several in a collapsed one) and
    ``count`` how many operand edges it stands for.  ``label`` is empty when
    order cannot matter (single-operand consumers).  ``ordered`` is False for
    operands of an ACCUMULATE, whose positions do not fix the order of the
    additions; back ends draw those dashed.
    """

    src: str
    dst: str
    positions: tuple[int, ...]
    count: int
    label: str
    ordered: bool = True


@dataclass(frozen=True, slots=True)
class Scene:
    """Everything a back end needs to draw a graph."""

    boxes: tuple[Box, ...]
    links: tuple[Link, ...]
    title: str
    caption: tuple[str, ...]
    collapsed: bool
    highlighted: tuple[str, ...] = ()
