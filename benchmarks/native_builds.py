"""What each fallback of the native kernels costs, measured in one run.

    python benchmarks/native_builds.py [--shape 4096x4096] [--rounds 9]

Prints interleaved medians and ratios (docs/reliability.md quotes them):

* the kernels alone (``native.exact_rows`` and ``native.float_rows`` with the fused
  FINALIZE, fp32): the ``-march=native`` host build against the portable one, both
  loaded side by side from the package's folder;
* ``normalize_sync`` float and exact on whatever build loads here, against the
  torch ops the compiled executor runs without the kernels (``native.disabled()``).
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
from taskgraph_norm.backends.native import loader as native  # noqa: E402
from taskgraph_norm.tools.bench import interleaved_medians  # noqa: E402


def _with_library(lib: object, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        native._module = lib  # the kernels look it up on every call
        return fn()
    return run


def kernels(x: torch.Tensor, rounds: int) -> None:
    builds = {v: native._find(v) for v in ("host", "portable")}
    if not native.available() or None in builds.values():
        print(f"kernels: need both builds here ({native.describe()})")
        return
    loaded = native._module
    libs = {v: native._open(p) for v, p in builds.items() if p is not None}
    rows, hidden = x.shape
    plan = tgn.Pipeline(tgn.build_graph(hidden), "compiled").plan
    assert plan is not None
    recipe = native.FloatRecipe(plan.chunk_size, plan.n_chunks, tuple(t for lv in plan.adds for t in lv), plan.root)
    y, pair, total = torch.empty_like(x), torch.empty(rows, 2, dtype=torch.float64), torch.empty(rows, 1)
    calls = {
        "exact": lambda: native.exact_rows(x, pair, y, None, 1e-6),
        "float": lambda: native.float_rows(x, recipe, total, y, None, 1e-6),
    }
    try:
        medians = interleaved_medians(
            {f"{k} {v}": _with_library(lib, fn) for k, fn in calls.items() for v, lib in libs.items()}, rounds)
    finally:
        native._module = loaded
    for k in calls:
        host, portable = medians[f"{k} host"], medians[f"{k} portable"]
        print(f"kernel {k:5s}: host {host * 1e3:7.1f} ms  portable {portable * 1e3:7.1f} ms  "
              f"portable/host {portable / host:.2f}x")


def end_to_end(x: torch.Tensor, rounds: int) -> None:
    def run(acc: str, ctx: Callable[[], contextlib.AbstractContextManager[None]]) -> Callable[[], object]:
        def call() -> object:
            with ctx():
                return tgn.normalize_sync(x, accumulate=acc)
        return call

    methods = {f"{acc} {name}": run(acc, ctx) for acc in ("float", "exact")
               for name, ctx in (("native", contextlib.nullcontext), ("torch-ops", native.disabled))}
    medians = interleaved_medians(methods, rounds)
    for acc in ("float", "exact"):
        fast, slow = medians[f"{acc} native"], medians[f"{acc} torch-ops"]
        print(f"normalize {acc:5s}: native {fast * 1e3:7.1f} ms  torch ops {slow * 1e3:7.1f} ms  "
              f"torch-ops/native {slow / fast:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    rows, hidden = (int(v) for v in args.shape.split("x"))
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(0))
    print(f"({rows}, {hidden}) fp32, {torch.get_num_threads()} threads, median of {args.rounds} interleaved "
          f"rounds; {native.describe()}")
    kernels(x, args.rounds)
    end_to_end(x, args.rounds)


if __name__ == "__main__":
    main()
