"""LayerNorm's accuracy against fp64 on hard rows: exact vs float vs torch (issue 23).

For each family of fp32 rows (hidden 4096 by default, a weight and a bias near 1 and 0)
it prints, per method, the share of output elements equal to the fp64 result rounded
once to fp32, the max ULP error (in ulps of the magnitude at which the result rounds,
``tools/report_layer.layer_ulp_scale``), and the share of rows whose mean is the
correctly rounded mean of the row (from the exact rational sum):

* ``normal``: N(0, 1);
* ``offset``: 1000 + N(0, 1) -- a mean far from zero, a variance far below its square
  (where ``E[x^2] - E[x]^2`` would cancel);
* ``spread``: N(0, 1) * 2^k, k uniform in [-20, 20];
* ``near-constant``: 1 + N(0, 1) * 2^-20 -- deviations of a few ulps of the mean.

    python benchmarks/layer_accuracy.py [--rows 256] [--hidden 4096] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm import pipeline  # noqa: E402
from taskgraph_norm.tools.report_layer import layer_fp64_reference, layer_ulp_scale  # noqa: E402
from taskgraph_norm.tools.report_rows import ulp_error  # noqa: E402

EPS = 1e-5
METHODS = (
    ("tgn exact (any topology)", dict(topology="tree", accumulate="exact")),
    ("tgn float tree", dict(topology="tree", accumulate="float")),
    ("tgn float linear", dict(topology="linear", accumulate="float")),
)


def family(name: str, rows: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    n = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    if name == "normal":
        return n.float()
    if name == "offset":
        return (1000 + n).float()
    if name == "spread":
        return (n * torch.exp2(torch.randint(-20, 21, (rows, hidden), generator=g).double())).float()
    return (1 + n * 2.0**-20).float()


FAMILIES = ("normal", "offset", "spread", "near-constant")


def correct_means(x: torch.Tensor) -> torch.Tensor:
    """Each row's mean, the exact rational sum / D rounded once to fp32."""
    hidden = x.shape[1]
    out = []
    for row in x.double().tolist():
        exact = sum((Fraction(v) for v in row), Fraction(0)) / hidden
        out.append(_round_fp32(exact))
    return torch.tensor(out, dtype=torch.float32)


def _round_fp32(q: Fraction) -> float:
    """``q`` rounded to nearest even fp32 (via its two fp32 neighbours)."""
    c = torch.tensor(float(q), dtype=torch.float32)  # within one fp32 ulp of q
    below = c if Fraction(float(c)) <= q else torch.nextafter(c, torch.tensor(-float("inf")))
    above = torch.nextafter(below, torch.tensor(float("inf")))
    lo, hi = Fraction(float(below)), Fraction(float(above))
    if q - lo != hi - q:
        return float(below) if q - lo < hi - q else float(above)
    return float(below) if int(below.view(torch.int32)) % 2 == 0 else float(above)


def row_means(y_method: dict[str, object], x: torch.Tensor) -> torch.Tensor:
    """The mean the method subtracts: LayerNorm of ``x`` without weight or bias gives
    ``(x - mean) / den``; the mean is read back from the graph's statistics."""
    pipe = pipeline.layer_pipeline(x.shape[1], 64, str(y_method["topology"]), "pairwise",
                                       str(y_method["accumulate"]))
    forward = pipe.forward(x, None, None, EPS, stats=True)  # (the mean does not depend on w, b)
    assert forward.mean is not None
    return forward.mean.reshape(-1)


def measure(rows: int, hidden: int, seed: int) -> list[tuple[str, str, float, float, float | None]]:
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.1 * torch.randn(hidden, generator=g, dtype=torch.float64)).float()
    b = (0.1 * torch.randn(hidden, generator=g, dtype=torch.float64)).float()
    results = []
    for fam in FAMILIES:
        x = family(fam, rows, hidden, g)
        ref = layer_fp64_reference(x, w, b, EPS)
        scale = layer_ulp_scale(x, w, b, ref)
        rounded = ref.float()
        truth_mean = correct_means(x)
        for name, options in METHODS:
            y = tgn.layer_norm_sync(x, w, b, EPS, **options)  # type: ignore[arg-type]
            means = row_means(options, x)
            results.append((fam, name, float((y == rounded).double().mean()), ulp_error(y, ref, scale),
                            float((means == truth_mean).double().mean())))
        y = F.layer_norm(x, (hidden,), w, b, EPS)
        results.append((fam, "torch F.layer_norm", float((y == rounded).double().mean()), ulp_error(y, ref, scale),
                        None))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"# LayerNorm accuracy, fp32 ({args.rows}, {args.hidden}), eps {EPS}, torch {torch.__version__}")
    print("| rows | method | elements = fp64 rounded | max ULP error | rows with the correctly rounded mean |")
    print("|---|---|---|---|---|")
    for fam, name, same, ulp, mean in measure(args.rows, args.hidden, args.seed):
        mean_text = "n/a" if mean is None else f"{100 * mean:.1f}%"
        print(f"| {fam} | {name} | {100 * same:.1f}% | {ulp:.2f} | {mean_text} |")


if __name__ == "__main__":
    main()
