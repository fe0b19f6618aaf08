"""Draw ``roofline.py``'s figures: achieved GB/s against copy_'s, and the scaling curves.

    python benchmarks/roofline_plot.py roofline.json --out docs/images

writes ``roofline.png`` (one group of bars per shape and dtype: copy_, this
library's four calls and torch's best, under a red dashed line at the dtype's
compute ceiling: the float ``out=`` call's GB/s on an input in cache) and ``scaling.png`` (GB/s against rows and
against hidden size, on one thread and on all, copy_ dashed beside the library's
``out=`` calls).  matplotlib is imported only here, with an install hint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import COPY, EXACT, EXACT_OUT, FLOAT, FLOAT_OUT, ceiling_gbps, gbps, torch_best  # noqa: E402

BARS = (COPY, FLOAT_OUT, EXACT_OUT, FLOAT, EXACT)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the roofline pictures need matplotlib: pip install 'taskgraph-norm[viz]'") from None
    return plt


def _caption(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (f"{m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, {m['date']}, commit {m['commit']}, "
            f"load average {m['load_average']:.1f} at the start")


def draw_roofline(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    cases = result["roofline"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(cases) + 2), 4.8))
    width = 0.8 / (len(BARS) + 1)
    for i, method in enumerate((*BARS, "torch's best")):
        heights = []
        for c in cases:
            name = torch_best(c["seconds"]) if method == "torch's best" else method
            heights.append(gbps(c["bytes"], c["seconds"][name]))
        xs = [k + (i - len(BARS) / 2) * width for k in range(len(cases))]
        style = {"color": "black"} if method == COPY else {}
        ax.bar(xs, heights, width, label=f"{method} (the floor)" if method == COPY else method, **style)
    ceiling = {c["dtype"]: ceiling_gbps(c, FLOAT_OUT) for c in result.get("ceilings", ())}
    for k, c in enumerate(cases):  # the dtype's compute ceiling (float out=, in cache) over its group
        if c["dtype"] in ceiling:
            ax.hlines(ceiling[c["dtype"]], k - 0.45, k + 0.45, colors="red", linestyles="dashed",
                      label="compute ceiling (float out=, in cache, 1 core x threads)" if k == 0 else None)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c['rows']}x{c['hidden']}\n{c['dtype']}" for c in cases], fontsize=7)
    ax.set_yscale("log")  # the ceilings of compute sit far above the bars of memory
    ax.set_ylabel("GB/s (input + output bytes, log scale)")
    ax.set_title("RMSNorm against copy_ and the compute ceiling (higher is better)", fontsize=10)
    ax.text(0, -0.2, _caption(result), transform=ax.transAxes, fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_scaling(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    points = result["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, sweep, axis in ((axes[0], "rows", "rows (hidden 4096, fp32)"),
                            (axes[1], "hidden", "hidden size (1024 rows, fp32)")):
        for threads in sorted({p["threads"] for p in points}):
            line = sorted((p for p in points if p["sweep"] == sweep and p["threads"] == threads),
                          key=lambda p: p[sweep])
            xs = [p[sweep] for p in line]
            for method, style in ((COPY, "--"), (FLOAT_OUT, "-"), (EXACT_OUT, ":")):
                ax.plot(xs, [gbps(p["bytes"], p["seconds"][method]) for p in line], style, marker="o",
                        markersize=3, label=f"{method}, {threads} thread{'s' if threads > 1 else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel("GB/s (input + output bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("RMSNorm out= against copy_ as the input grows\n" + _caption(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw(result: dict[str, Any], directory: Path) -> list[Path]:
    """``roofline.png`` and ``scaling.png`` in ``directory`` (where the JSON has the parts)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    if result.get("roofline"):
        paths.append(draw_roofline(result, directory / "roofline.png"))
    if result.get("scaling"):
        paths.append(draw_scaling(result, directory / "scaling.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="a file written by roofline.py --json")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="folder (default docs/images)")
    args = parser.parse_args(argv)
    for path in draw(json.loads(args.json.read_text()), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
