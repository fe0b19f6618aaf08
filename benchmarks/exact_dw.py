"""Cost of the exact weight gradient against a float one, same shapes, same run.

    python benchmarks/exact_dw.py [--shape 4096x4096] [--rounds 9]

Times, interleaved call by call (so machine noise hits every method alike):

* ``float``: one pass computing ``dy * x_hat`` and summing over rows,
  ``(dy * x_hat).sum(0)`` (what a float dW costs; its order is torch's);
* ``row-chunk``: a fixed merge over row chunks (64-row chunk sums, then a left
  fold of the chunk partials): deterministic for one batch, not across splits;
* ``exact``: :meth:`ExactSum.add_products` (the native C kernel when built, split
  by columns with the helper thread like the direct path);
* ``exact x/rms``: :meth:`ExactSum.add_normalized`, what ``tgn.RMSNorm``'s fp32
  backward runs: the same kernel forming ``x_hat = x / rms`` itself;
* ``exact round``: turning the state into fp32 ``grad`` (once per backward).

Prints the medians, the ratios exact / float and exact / row-chunk, and the
state's memory per weight element.  The issue's target: exact <= 2x float at
(4096, 4096) fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taskgraph_norm.backends.native import loader as native  # noqa: E402
from taskgraph_norm.ops.exact_grad import ExactSum  # noqa: E402
from taskgraph_norm.kernels import exact_sum as es  # noqa: E402
from taskgraph_norm.tools.bench import interleaved_medians  # noqa: E402


def row_chunk_dw(dy: torch.Tensor, x_hat: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    rows, cols = dy.shape
    full = rows // chunk * chunk
    partials = (dy[:full] * x_hat[:full]).view(-1, chunk, cols).sum(1)
    total = partials[0].clone()
    for p in partials[1:]:
        total += p
    if full < rows:
        total += (dy[full:] * x_hat[full:]).sum(0)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="rows x hidden (default 4096x4096)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    args = parser.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    dy, x_hat = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    rms = torch.rand(rows, generator=g) + 0.5
    x = x_hat * rms.unsqueeze(1)
    acc = ExactSum(cols)
    acc.add_products(dy, x_hat)  # warm-up (and the library build)
    methods = {
        "float": lambda: (dy * x_hat).sum(0),
        "row-chunk": lambda: row_chunk_dw(dy, x_hat),
        "exact": lambda: acc.add_products(dy, x_hat),
        "exact x/rms": lambda: acc.add_normalized(dy, x, rms),
        "exact round": lambda: acc.result(torch.float32),
    }
    med = interleaved_medians(methods, args.rounds)
    print(f"shape {rows}x{cols} fp32, torch threads {torch.get_num_threads()}, "
          f"{native.describe()}")
    for name, seconds in med.items():
        print(f"  {name:12s} {seconds * 1e3:9.2f} ms")
    print(f"exact / float      = {med['exact'] / med['float']:.2f}x   (target <= 2x)")
    print(f"exact / row-chunk  = {med['exact'] / med['row-chunk']:.2f}x")
    print(f"(exact + round) / float = {(med['exact'] + med['exact round']) / med['float']:.2f}x")
    print(f"state memory: {es.STATE_ROWS * 8} bytes per weight element "
          f"({es.DIGITS} int64 digits + 3 counters; fp32 grad: 4 bytes)")


if __name__ == "__main__":
    main()
