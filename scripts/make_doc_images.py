"""Regenerate the merge-DAG pictures committed under docs/images/.

Run from the repository root::

    python scripts/make_doc_images.py            # Graphviz if installed, else matplotlib
    python scripts/make_doc_images.py --engine matplotlib

It draws the four chunked topologies of the original report (hidden size 512,
chunk size 64: eight chunks), each as SVG and PNG, puts the four PNGs side by
side in ``topologies.png`` for the user guide, and draws a 4096-chunk tree to
show the collapsed mode.  It also draws the weight gradient's merge DAG
(``dw-float.png``, ``dw-exact.png``: 192 rows, micro-batches of 64 and 32 rows,
two ranks); ``--backward-only`` draws just those two.  When the prover is available (``taskgraph_norm.prover.rules``)
each picture's caption carries its verdict, rule and fingerprint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.tools.report import traced_run  # noqa: E402

TOPOLOGIES = ("linear", "tree", "race", "cat")
HIDDEN_SIZE = 512
CHUNK_SIZE = 64


def _proof(graph: tgn.Graph) -> Any:
    """The graph's proof, or None until the prover is part of the package."""
    prove = getattr(tgn, "prove", None)
    return prove(graph) if prove is not None else None


def side_by_side(pngs: list[Path], titles: list[str], out: Path) -> None:
    """Place the PNGs in one row at their own scale (all were drawn at the same
    resolution, so equal sizes mean equal text), tops aligned, each under a title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    images = [imread(p) for p in pngs]
    gap, head = 60, 90  # pixels between pictures, and for the titles
    total_w = sum(img.shape[1] for img in images) + gap * (len(images) - 1)
    total_h = max(img.shape[0] for img in images) + head
    fig = Figure(figsize=(total_w / 100, total_h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, total_w)
    ax.set_ylim(total_h, 0)
    ax.set_axis_off()
    x = 0
    for img, title in zip(images, titles):
        h, w = img.shape[:2]
        ax.imshow(img, extent=(x, x + w, head + h, head), interpolation="none")
        ax.text(x + w / 2, head * 0.55, title, ha="center", va="center", fontsize=30,
                fontweight="bold")
        x += w + gap
    fig.savefig(out, metadata={"Software": None})


def backward_images(out: Path, engine: str) -> None:
    """The weight gradient's merge DAG, float and exact, with their proofs."""
    from taskgraph_norm.topologies import build_weight_grad_graph

    for kind in ("float", "exact"):
        graph = build_weight_grad_graph(192, weight_grad=kind, micro_batches=[64, 32], world_size=2)
        path = tgn.render(graph, out / f"dw-{kind}.png", _proof(graph), engine=engine)
        print(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("auto", "graphviz", "matplotlib"), default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--backward-only", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    backward_images(args.out, args.engine)
    if args.backward_only:
        return 0

    pngs = []
    for topology in TOPOLOGIES:
        graph = tgn.build_graph(HIDDEN_SIZE, chunk_size=CHUNK_SIZE, topology=topology)
        proof = _proof(graph)
        for suffix in (".svg", ".png"):
            path = tgn.render(graph, args.out / f"topology-{topology}{suffix}", proof,
                              engine=args.engine)
            print(f"wrote {path.relative_to(ROOT)}")
        pngs.append(args.out / f"topology-{topology}.png")
    combined = args.out / "topologies.png"
    side_by_side(pngs, [f"{t}" for t in TOPOLOGIES], combined)
    print(f"wrote {combined.relative_to(ROOT)}")

    big = tgn.build_graph(4096 * CHUNK_SIZE, chunk_size=CHUNK_SIZE, topology="tree")
    path = tgn.render(big, args.out / "tree-4096-collapsed.png", _proof(big), engine=args.engine)
    print(f"wrote {path.relative_to(ROOT)}")
    exact = tgn.build_graph(HIDDEN_SIZE, chunk_size=CHUNK_SIZE, topology="race", accumulate="exact")
    path = tgn.render(exact, args.out / "race-exact.png", _proof(exact), engine=args.engine)
    print(f"wrote {path.relative_to(ROOT)}")

    # A recorded run of the race on the concurrent executor (timings are this machine's).
    race = tgn.build_graph(1024, chunk_size=CHUNK_SIZE, topology="race")
    trace = traced_run(race, rows=256, max_workers=2, schedule="fifo")
    path = tgn.render_timeline(trace, args.out / "timeline-race.png", race,
                               title="race D=1024 chunk=64: 256 rows, fifo schedule, 2 workers")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
