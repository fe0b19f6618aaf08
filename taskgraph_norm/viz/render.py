"""Write a merge DAG to a file: ``.svg``/``.png`` pictures, ``.dot``/``.gv`` or ``.mmd`` text.

Pictures go through Graphviz (the ``graphviz`` Python package driving the
``dot`` program) where both are installed, and otherwise through a layered
matplotlib layout computed here, so a bare ``pip install`` can still draw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingDependencyError
from ..graph import Graph
from ._optional import graphviz_available, require
from .scene import HIGHLIGHT, KIND_STYLE, Box, Scene, build_scene, kinds_in
from .text import scene_to_dot, scene_to_mermaid

__all__ = ["render", "ENGINES", "SUFFIXES"]

ENGINES = ("auto", "graphviz", "matplotlib")
SUFFIXES = (".svg", ".png", ".dot", ".gv", ".mmd")
_GRAPHVIZ_HINT = "pip install graphviz, and the Graphviz program (e.g. apt-get install graphviz)"


def render(
    graph: Graph,
    path: str | os.PathLike[str],
    proof: Any = None,
    *,
    engine: str = "auto",
    collapse: bool | None = None,
    dpi: int = 144,
) -> Path:
    """Draw ``graph`` into ``path``; the file's suffix picks the format.

    Parameters
    ----------
    graph:
        The merge DAG (validated first).
    path:
        Ends in ``.svg`` or ``.png`` (a picture), ``.dot``/``.gv`` (DOT text,
        see :func:`to_dot`) or ``.mmd`` (Mermaid text, see :func:`to_mermaid`).
    proof:
        Optional proof (duck-typed, see :func:`to_dot`): verdict, rule and
        fingerprint in the caption, a refuted race node in red.
    engine:
        ``"auto"`` (Graphviz when the package and the ``dot`` program are both
        installed, else matplotlib), ``"graphviz"`` or ``"matplotlib"``.
    collapse:
        ``None`` collapses graphs above :data:`COLLAPSE_THRESHOLD` chunks.
    dpi:
        Resolution of PNG output.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    ConfigError
        for an unknown suffix or engine.
    MissingDependencyError
        (an ``ImportError``) naming what to install when no engine is available.
    GraphError, CycleError
        if the graph is invalid.

    Examples
    --------
    >>> from taskgraph_norm import build_graph
    >>> render(build_graph(256, chunk_size=64, topology="tree"), "tree.svg")  # doctest: +SKIP
    PosixPath('tree.svg')
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError("path", str(path), "a file name ending in " + ", ".join(SUFFIXES))
    if engine not in ENGINES:
        raise ConfigError("engine", engine, "one of " + ", ".join(repr(e) for e in ENGINES))
    scene = build_scene(graph, proof, collapse=collapse)
    if suffix in (".dot", ".gv"):
        out.write_text(scene_to_dot(scene), encoding="utf-8")
    elif suffix == ".mmd":
        out.write_text(scene_to_mermaid(scene), encoding="utf-8")
    elif engine == "graphviz" or (engine == "auto" and graphviz_available()):
        _render_graphviz(scene, out, suffix[1:], dpi)
    else:
        _render_matplotlib(scene, out, dpi, needed_by=engine)
    return out


def _render_graphviz(scene: Scene, out: Path, fmt: str, dpi: int) -> None:
    graphviz = require("graphviz", "rendering with Graphviz", _GRAPHVIZ_HINT)
    source = graphviz.Source(scene_to_dot(scene, dpi=dpi if fmt == "png" else None))
    try:
        data = source.pipe(format=fmt)
    except graphviz.ExecutableNotFound as exc:
        raise MissingDependencyError("graphviz", "rendering with Graphviz", _GRAPHVIZ_HINT) from exc
    out.write_bytes(data)


# --- matplotlib fallback ---------------------------------------------------

_CHAR_W = 0.085  # inches per character at the label font size below
_LINE_H = 0.19  # inches per label line
_FONT = 8.5
# matplotlib box styles standing in for the Graphviz shapes of each kind.
_BOXSTYLE = {
    "io": "round,pad=0.3,rounding_size=0.8",
    "leaf": "square,pad=0.3",
    "merge": "round,pad=0.3,rounding_size=0.5",
    "race": "sawtooth,pad=0.5,tooth_size=0.12",
    "catsum": "round4,pad=0.3",
    "exact": "roundtooth,pad=0.3",
    "finalize": "round,pad=0.3,rounding_size=0.15",
    "opaque": "square,pad=0.4",
    "rowleaf": "square,pad=0.3",
    "sumleaf": "square,pad=0.3",
    "mean": "round,pad=0.3,rounding_size=0.15",
    "exactmerge": "roundtooth,pad=0.3",
    "round": "round,pad=0.3,rounding_size=0.15",
}


def _fanout(scene: Scene) -> dict[str, int]:
    """How many distinct boxes each box feeds.  Boxes feeding more than two (the
    input, the exact-mode scale) are *broadcast* nodes: they do not pull the
    layout towards them and their long edges run along a bus."""
    users: dict[str, set[str]] = {b.key: set() for b in scene.boxes}
    for link in scene.links:
        if link.src != link.dst:
            users[link.src].add(link.dst)
    return {k: len(v) for k, v in users.items()}


def _layer_positions(scene: Scene) -> dict[str, tuple[float, int]]:
    """``key -> (x, rank)``: x in units of one box width.

    A box's x is the mean x of its non-broadcast predecessors; boxes with none
    are laid out in build order.  Then each rank is swept left to right so
    boxes keep one unit apart.
    """
    fanout = _fanout(scene)
    unit = _unit_width(scene)
    widths = {b.key: _box_inches(b) / unit for b in scene.boxes}
    preds: dict[str, list[str]] = {b.key: [] for b in scene.boxes}
    for link in scene.links:
        if link.src != link.dst and fanout[link.src] <= 2 and link.src not in preds[link.dst]:
            preds[link.dst].append(link.src)
    ranks: dict[int, list[Box]] = {}
    for box in scene.boxes:
        ranks.setdefault(box.rank, []).append(box)
    x: dict[str, float] = {}
    for rank in sorted(ranks):
        row = ranks[rank]
        anchors = [b for b in row if not any(p in x for p in preds[b.key])]
        for i, b in enumerate(anchors):
            x[b.key] = i - (len(anchors) - 1) / 2
        for b in row:
            if b.key not in x:
                placed = [x[p] for p in preds[b.key] if p in x]
                x[b.key] = sum(placed) / len(placed)
        ordered = sorted(row, key=lambda b: x[b.key])
        for left, right in zip(ordered, ordered[1:]):
            gap = max(1.0, (widths[left.key] + widths[right.key]) / 2)
            x[right.key] = max(x[right.key], x[left.key] + gap)
    return {b.key: (x[b.key], b.rank) for b in scene.boxes}


def _rank_depths(scene: Scene, pos: Mapping[str, tuple[float, int]]) -> list[float]:
    """Vertical position of each rank, in rank heights.  Where many edges fan
    into the next rank from far apart (a race over 16 leaves) the gap grows, so
    the edges are steep enough to clear the neighbouring boxes."""
    n_ranks = max(p[1] for p in pos.values()) + 1
    spread = [0.0] * n_ranks
    for link in scene.links:
        (xs, rs), (xd, rd) = pos[link.src], pos[link.dst]
        if rd == rs + 1:
            spread[rd] = max(spread[rd], abs(xs - xd))
    depth = [0.0]
    for r in range(1, n_ranks):
        depth.append(depth[-1] + min(max(spread[r] / 4, 1.0), 2.5))
    return depth


def _box_inches(box: Box) -> float:
    return max(len(line) for line in box.lines) * _CHAR_W + 0.45


def _unit_width(scene: Scene) -> float:
    """Inches per layout unit: the widest box of the most crowded rank, so a
    wide label elsewhere (``16 parts, arrival order``) does not spread the
    leaves apart; wider boxes get extra room in :func:`_layer_positions`."""
    ranks: dict[int, list[Box]] = {}
    for box in scene.boxes:
        ranks.setdefault(box.rank, []).append(box)
    crowded = max(ranks.values(), key=len)
    return max(_box_inches(b) for b in crowded)


def _render_matplotlib(scene: Scene, out: Path, dpi: int, needed_by: str) -> None:
    purpose = (
        "rendering with matplotlib"
        if needed_by == "matplotlib"
        else "drawing a picture without Graphviz (neither the graphviz package and program "
        "nor matplotlib is installed)"
    )
    require("matplotlib", purpose)
    from matplotlib.patches import Patch

    pos = _layer_positions(scene)
    handles = [Patch(facecolor=KIND_STYLE[k].fill, edgecolor=KIND_STYLE[k].stroke,
                     label=KIND_STYLE[k].legend) for k in kinds_in(scene.boxes)]
    if scene.highlighted:
        handles.append(Patch(facecolor=HIGHLIGHT.fill, edgecolor=HIGHLIGHT.stroke,
                             label=HIGHLIGHT.legend))
    depth = _rank_depths(scene, pos)
    fig, ax, unit, ncol = _frame(scene, pos, depth, dpi, len(handles))

    def centre(key: str) -> tuple[float, float]:
        return pos[key][0] * unit[0], -depth[pos[key][1]] * unit[1]

    texts = {}
    for box in scene.boxes:
        style = HIGHLIGHT if box.highlight else KIND_STYLE[box.kind]
        texts[box.key] = ax.text(
            *centre(box.key), "\n".join(box.lines), ha="center", va="center", fontsize=_FONT,
            zorder=3, bbox={"boxstyle": _BOXSTYLE[box.kind], "facecolor": style.fill,
                            "edgecolor": style.stroke, "linewidth": 3 if box.highlight else 1.2},
        )
    _draw_links(ax, scene, texts, centre, pos, unit)
    caption = (scene.title, *scene.caption)
    height = fig.get_figheight()
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, (0.22 * len(caption) + 0.15) / height))
    fig.text(0.5, 0.1 / height, "\n".join(caption), ha="center", va="bottom", fontsize=9.5)
    fig.savefig(out, format=out.suffix[1:].lower())


def _frame(scene: Scene, pos: Mapping[str, tuple[float, int]], depth: list[float], dpi: int,
           n_legend: int) -> tuple[Any, Any, tuple[float, float], int]:
    """Figure and axes sized so one data unit is one inch on both axes (loops
    and bends keep their shape), with room below for the legend and caption.
    Returns ``(figure, axes, (box width, rank height) in inches, legend columns)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = max(len(b.lines) for b in scene.boxes)
    unit_w, unit_h = _unit_width(scene), lines * _LINE_H + 0.55
    xs = [p[0] for p in pos.values()]
    # One extra column on the left is the lane for broadcast edges; one more on
    # the right leaves room for a collapsed fold's self-loop.
    lo, hi = (min(xs) - 1.0) * unit_w, (max(xs) + 1.0) * unit_w
    width = max(hi - lo, 6.5)
    ncol = max(1, min(n_legend, int(width / 3.3)))
    bottom = 0.22 * (1 + len(scene.caption)) + 0.2 * -(-n_legend // ncol) + 0.45
    body = (depth[-1] + 1) * unit_h
    height = body + bottom
    # Agg cannot make an image over 2**16 pixels a side; huge forced-full drawings
    # get a lower resolution rather than an error.
    dpi = max(10, min(dpi, int(30000 / max(width, height))))
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)  # gives the figure a renderer to measure label boxes with
    ax = fig.add_axes((0.0, bottom / height, 1.0, body / height))
    ax.set_axis_off()
    spare = (width - (hi - lo)) / 2
    ax.set_xlim(lo - spare, hi + spare)
    ax.set_ylim(-(depth[-1] + 0.5) * unit_h, 0.5 * unit_h)
    return fig, ax, (unit_w, unit_h), ncol


def _box_extent(ax: Any, text: Any) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of a label's box (text plus padding) in data coordinates."""
    renderer = ax.figure.canvas.get_renderer()
    bbox = text.get_window_extent(renderer)
    # A boxstyle's pad is in font sizes; the race style's sawtooth needs more than the rest.
    pad = getattr(text.get_bbox_patch().get_boxstyle(), "pad", 0.3) * _FONT * ax.figure.dpi / 72
    (x0, y0), (x1, y1) = ax.transData.inverted().transform(
        [(bbox.x0 - pad, bbox.y0 - pad), (bbox.x1 + pad, bbox.y1 + pad)]
    )
    return float(x0), float(y0), float(x1), float(y1)


def _clip(inside: tuple[float, float], toward: tuple[float, float],
          box: tuple[float, float, float, float]) -> tuple[float, float]:
    """Where the segment from ``inside`` (a box centre) to ``toward`` leaves ``box``."""
    (x, y), (tx, ty) = inside, toward
    hw, hh = (box[2] - box[0]) / 2 + 0.03, (box[3] - box[1]) / 2 + 0.03
    ddx, ddy = tx - x, ty - y
    scale = min(hw / abs(ddx) if ddx else float("inf"), hh / abs(ddy) if ddy else float("inf"), 1.0)
    return x + ddx * scale, y + ddy * scale


def _path_arrow(ax: Any, verts: list[tuple[float, float]], curve: bool, colour: str,
                style: str) -> None:
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath

    step = MplPath.CURVE4 if curve else MplPath.LINETO
    codes = [MplPath.MOVETO] + [step] * (len(verts) - 1)
    ax.add_patch(FancyArrowPatch(path=MplPath(verts, codes), arrowstyle="-|>", mutation_scale=10,
                                 color=colour, linestyle=style, lw=0.8, zorder=1))


def _label_text(ax: Any, x: float, y: float, text: str, ha: str = "center") -> None:
    ax.text(x, y, text, fontsize=7.5, color="#1c4587", ha=ha, va="center", zorder=4,
            bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none",
                  "alpha": 0.85})


def _draw_links(ax: Any, scene: Scene, texts: Mapping[str, Any], centre: Any,
                pos: Mapping[str, tuple[float, int]], unit: tuple[float, float]) -> None:
    fanout = _fanout(scene)
    n_in: dict[str, int] = {b.key: 0 for b in scene.boxes}
    for link in scene.links:
        n_in[link.dst] += 1
    lane_x = (min(p[0] for p in pos.values()) - 0.7) * unit[0]
    for link in scene.links:
        colour = "#555555" if link.ordered else "#990000"
        style = "-" if link.ordered else "--"
        src, dst = _box_extent(ax, texts[link.src]), _box_extent(ax, texts[link.dst])
        (sx, sy), (dx, dy) = centre(link.src), centre(link.dst)
        if link.src == link.dst:
            # A collapsed left fold feeds itself: a loop on the right of its box.
            h = (dst[3] - dst[1]) / 3
            _path_arrow(ax, [(dst[2], dy + h), (dst[2] + 0.5, dy + 3 * h),
                             (dst[2] + 0.5, dy - 3 * h), (dst[2], dy - h)], True, colour, style)
            if link.label:
                _label_text(ax, dst[2] + 0.45, dy, link.label, ha="left")
        elif (fanout[link.src] > 2 or pos[link.src][1] == 0) and pos[link.dst][1] - pos[link.src][1] > 1:
            # A broadcast edge that skips ranks (input into FINALIZE or into the
            # exact-mode leaves) would cut through the boxes between: run it down
            # a lane left of the drawing and along a bus just above its target row.
            # It drops into the left part of the box, clear of the straight edges
            # that arrive at its centre.
            bus_y, drop_x = dy + 0.5 * unit[1] - 0.12, dst[0] + 0.25 * (dst[2] - dst[0])
            _path_arrow(ax, [(src[0], sy), (lane_x, sy), (lane_x, bus_y), (drop_x, bus_y),
                             (drop_x, dst[3])], False, colour, style)
            if link.label:
                _label_text(ax, drop_x - 0.04, (bus_y + dst[3]) / 2, link.label, ha="right")
        else:
            # Clip to the box outlines ourselves: label boxes get their size only
            # at draw time, too late for matplotlib's own patchA/patchB clipping.
            (ax0, ay0), (ax1, ay1) = _clip((sx, sy), (dx, dy), src), _clip((dx, dy), (sx, sy), dst)
            _path_arrow(ax, [(ax0, ay0), (ax1, ay1)], False, colour, style)
            if link.label:
                # Near the head, so each number sits by the merge it orders; but
                # where many edges converge (a race, a cat) near the tail, where
                # they are still apart.
                t = 0.6 if n_in[link.dst] <= 3 else 0.3
                _label_text(ax, ax0 + t * (ax1 - ax0), ay0 + t * (ay1 - ay0), link.label)
