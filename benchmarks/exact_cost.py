"""Cost of accumulate="exact" against accumulate="float", same shapes, same run.

    python benchmarks/exact_cost.py [--shape 4096x4096] [--repeats 5] [--executor auto]

Prints the median time of each and the ratio exact / float for every topology.
The issue's target is exact <= 1.5x float on (4096, 4096) fp32 with the fastest
executor available.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import median_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--executor", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x"))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(getattr(torch, args.dtype))
    print(f"input {args.shape} {args.dtype}, chunk_size {args.chunk_size}, executor {args.executor}, "
          f"median of {args.repeats}, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print("| topology | float ms | exact ms | exact / float |")
    print("|---|---|---|---|")
    for topology in ("tree", "linear", "cat", "race"):
        times = {}
        for acc in ("float", "exact"):
            times[acc] = median_seconds(
                lambda acc=acc: tgn.normalize_sync(
                    x, topology=topology, chunk_size=args.chunk_size, accumulate=acc, executor=args.executor
                ),
                repeats=args.repeats,
            )
        print(f"| {topology} | {times['float'] * 1e3:.1f} | {times['exact'] * 1e3:.1f} | "
              f"{times['exact'] / times['float']:.2f}x |")


if __name__ == "__main__":
    main()
