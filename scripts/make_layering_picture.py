"""Draw docs/images/layering.svg and .png: the pipeline and the package's layers.

The boxes are the package's families (a top-level module or folder), placed in
rows by their depth in the import graph that ``tests/test_layering.py`` reads, and
the arrows are the imports between families as they are in the code today, so
the picture cannot drift from the code.  Above them, the pipeline's four stages
and the family that runs each.  Run from the repository root::

    python scripts/make_layering_picture.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_layering import _family, import_graph  # noqa: E402

#: Families drawn (helpers every family may use are left out to keep it readable).
HIDDEN = {"caches", "errors", "testing", "__main__"}
STAGES = (("build", "topologies"), ("prove", "prover"), ("lower", "lowering"), ("run", "backends"))


def family_graph() -> nx.DiGraph:
    modules = import_graph()
    fam: nx.DiGraph = nx.DiGraph()
    for a, b in modules.edges:
        fa, fb = _family(a), _family(b)
        if a == "taskgraph_norm" or fa == fb or fa in HIDDEN or fb in HIDDEN:
            continue
        fam.add_edge(fa, fb)
    for module in modules.nodes:
        f = _family(module)
        if module != "taskgraph_norm" and f not in HIDDEN:
            fam.add_node(f)
    return fam


def draw(out_stem: Path) -> list[Path]:
    fam = family_graph()
    plain = fam
    # Depth: 0 for families nothing of ours is imported by... rows from the top
    # (entry points) to the bottom (the IR).
    height = {n: 0 for n in plain}
    for n in reversed(list(nx.topological_sort(plain))):
        height[n] = max((height[s] + 1 for s in plain.successors(n)), default=0)
    rows: dict[int, list[str]] = {}
    for n, h in height.items():
        rows.setdefault(h, []).append(n)
    top = max(rows)
    pos: dict[str, tuple[float, float]] = {}
    for h, names in rows.items():
        names.sort()
        for i, n in enumerate(names):
            pos[n] = ((i + 1) / (len(names) + 1), 0.08 + 0.72 * h / max(top, 1))
    fig, ax = plt.subplots(figsize=(11, 7.5))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    for i, (stage, owner) in enumerate(STAGES):
        x = 0.14 + 0.24 * i
        ax.add_patch(FancyBboxPatch((x - 0.08, 0.9), 0.16, 0.07, boxstyle="round,pad=0.005",
                                    fc="#fde9c9", ec="#b07d2b"))
        ax.text(x, 0.935, f"{stage}\n({owner})", ha="center", va="center", fontsize=10)
        if i:
            ax.add_patch(FancyArrowPatch((x - 0.16, 0.935), (x - 0.08, 0.935), arrowstyle="-|>",
                                         mutation_scale=14, color="#b07d2b"))
    ax.text(0.5, 0.875, "one cached Pipeline per configuration holds graph, proof, plan and kernels "
            "(pipeline/)", ha="center", fontsize=9, style="italic")
    for a, b in fam.edges:
        ax.add_patch(FancyArrowPatch(pos[a], pos[b], arrowstyle="-|>", mutation_scale=10,
                                     shrinkA=16, shrinkB=16, lw=0.8, color="#7f8c8d"))
    for n, (x, y) in pos.items():
        ax.add_patch(FancyBboxPatch((x - 0.065, y - 0.025), 0.13, 0.05, boxstyle="round,pad=0.004",
                                    fc="#dbe9f6", ec="#2c5d8a"))
        ax.text(x, y, n, ha="center", va="center", fontsize=9)
    ax.text(0.01, 0.01, "arrows: imports between families, read from the code (tests/test_layering.py)",
            fontsize=8)
    written = []
    for ext in ("svg", "png"):
        path = out_stem.with_suffix("." + ext)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written


if __name__ == "__main__":
    for p in draw(ROOT / "docs" / "images" / "layering"):
        print(f"wrote {p}")
