"""Accuracy of the sum of squares and of the output, exact vs float vs torch.

For rows with a wide exponent spread (Gaussian values times 2**k, k uniform in
[-spread, spread]) it prints, per method:

* the fraction of rows whose fp32 sum of squares equals the correctly rounded
  value (an exact integer sum of the fp64 squares, rounded once);
* the max ULP error of the normalised fp32 output against an fp64 reference.

    python benchmarks/accuracy.py [--rows 256] [--hidden 4096] [--spread 60] [--chunk-size 64]
"""

from __future__ import annotations

import argparse

import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors import reference_sum_of_squares
from taskgraph_norm.tools.report import fp64_reference, ulp_error
from taskgraph_norm.testing import correctly_rounded_sumsq

METHODS = (
    ("exact (any topology)", "tree", "exact"),
    ("float tree", "tree", "float"),
    ("float linear", "linear", "float"),
    ("float cat", "cat", "float"),
)


def spread_rows(rows: int, hidden: int, spread: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-spread, spread + 1, (rows, hidden), generator=g).double()
    return (torch.randn(rows, hidden, generator=g, dtype=torch.float64) * torch.exp2(k)).float()


def measure(rows: int, hidden: int, spread: int, chunk: int, seed: int) -> list[tuple[str, float, float]]:
    x = spread_rows(rows, hidden, spread, seed)
    truth = correctly_rounded_sumsq(x)
    eps = torch.finfo(torch.float32).eps
    ref = fp64_reference(x, None, eps)
    results = []
    for name, topology, acc in METHODS:
        g = tgn.build_graph(hidden, chunk_size=chunk, topology=topology, accumulate=acc)
        total = reference_sum_of_squares(g, x)
        y = tgn.normalize_sync(x, topology=topology, chunk_size=chunk, accumulate=acc)
        results.append((name, float((total == truth).float().mean()), ulp_error(y, ref)))
    torch_sum = (x * x).sum(-1, keepdim=True)
    torch_y = torch.nn.functional.rms_norm(x, (hidden,))
    results.append(("torch (x*x).sum / F.rms_norm", float((torch_sum == truth).float().mean()), ulp_error(torch_y, ref)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--spread", type=int, nargs="+", default=[0, 20, 60])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.rows} rows x {args.hidden}, fp32, chunk_size {args.chunk_size}, seed {args.seed}\n")
    print("| exponent spread | method | rows with correctly rounded sum of squares | max ULP error of output |")
    print("|---|---|---|---|")
    for spread in args.spread:
        for name, frac, ulp in measure(args.rows, args.hidden, spread, args.chunk_size, args.seed):
            print(f"| ±{spread} | {name} | {100 * frac:.1f}% | {ulp:.2f} |")


if __name__ == "__main__":
    main()
