"""Cost of accumulate="exact" against accumulate="float", same shapes, same run.

    python benchmarks/exact_cost.py [--shape 4096x4096] [--repeats 7] [--executor auto]

For each kernel set of the compiled executor (its native C kernels, when a C
compiler is there, and its torch ops, what a machine without one runs), prints
the median time of float and exact normalize and the ratio exact / float for
every topology, into a fresh output and into ``out=``.  The issue's target is
exact <= 1.5x float on (4096, 4096) fp32 with the fastest executor available.
Float and exact are timed interleaved, call by call, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.tools.bench import interleaved_medians  # noqa: E402
from taskgraph_norm.backends.native import loader as native  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--executor", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--topologies", default="tree,linear,cat,race")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x"))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(getattr(torch, args.dtype))
    out = torch.empty_like(x)
    print(f"input {args.shape} {args.dtype}, chunk_size {args.chunk_size}, executor {args.executor}, "
          f"median of {args.repeats} interleaved calls, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    sets = [("native", contextlib.nullcontext)] if native.available() else []
    sets.append(("torch ops", native.disabled))
    for name, ctx in sets:
        with ctx():
            print(f"\n{native.describe(name == 'native')}\n")
            print("| kernels | topology | float ms | exact ms | exact / float | float out= ms | exact out= ms "
                  "| exact / float, out= |")
            print("|---|---|---|---|---|---|---|---|")
            for topology in args.topologies.split(","):
                fns: dict[str, Callable[[], object]] = {}
                for acc in ("float", "exact"):
                    for o in (None, out):
                        fns[f"{acc}{'' if o is None else ' out'}"] = (
                            lambda acc=acc, o=o: tgn.normalize_sync(
                                x, topology=topology, chunk_size=args.chunk_size, accumulate=acc,
                                executor=args.executor, out=o))
                t = interleaved_medians(fns, args.repeats)
                print(f"| {name} | {topology} | {t['float'] * 1e3:.1f} | {t['exact'] * 1e3:.1f} "
                      f"| {t['exact'] / t['float']:.2f}x | {t['float out'] * 1e3:.1f} | {t['exact out'] * 1e3:.1f} "
                      f"| {t['exact out'] / t['float out']:.2f}x |")


if __name__ == "__main__":
    main()
