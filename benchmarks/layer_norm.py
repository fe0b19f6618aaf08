"""LayerNorm's speed on CPU: ``tgn.layer_norm_sync`` against torch's own kernels (issue 23).

    python benchmarks/layer_norm.py [--rounds 15] [--shapes 1,64,1024,4096]

Every ratio is measured side by side in one run of its own (each round calls each of
its methods once; a method too short to time alone is a loop of calls, divided back to
one call; the figure is the median over rounds; torch keeps the thread count it
chose): the float call with torch's, exact with float, exact with torch ops.  Per shape
``(rows, 4096)`` and dtype (fp32, bf16), with a weight and a bias:

* ``layer_norm_sync(x, w, b)`` (float, the default plan: the native C kernel where it
  is built) against the faster of eager ``F.layer_norm`` and
  ``torch.compile(F.layer_norm)`` (compiled once per shape, before timing): target
  at most 1.0x;
* ``layer_norm_sync(..., accumulate="exact")`` (the native C kernel where it is built)
  against the float call: target at most 1.3x;
* the same exact call against the torch-ops backend's exact path (the same bits):
  the C kernel should be faster (at most 1.0x).

Each line gives our time, the baseline's and which baseline it was, the ratio, the
target and whether it is met (benchmarks/common.py's ``target_row``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import TARGET_HEADER, fastest, interleaved_medians, repeated, target_row  # noqa: E402
from taskgraph_norm.backends.native import loader as native  # noqa: E402

D = 4096
EAGER, COMPILED = "eager F.layer_norm", "torch.compile(F.layer_norm)"
FLOAT, EXACT = "layer_norm_sync float", "layer_norm_sync exact"
EXACT_TORCH = "exact on torch ops"


def _compiled() -> Callable[..., torch.Tensor] | None:
    try:
        fn = torch.compile(F.layer_norm)
        fn(torch.ones(2, 8), (8,))
        return fn
    except Exception:  # no C++ compiler, unsupported platform...
        return None


def _on_torch_ops(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with tgn.backends.use("torch_ops"):
        y: torch.Tensor = tgn.layer_norm_sync(x, w, b, accumulate="exact")
        return y


def _calls(rows: int) -> int:
    """Enough calls that one timing is about a millisecond or more of work."""
    return max(1, 256 // rows)


def case(rows: int, dtype: torch.dtype, rounds: int, compiled: Callable[..., torch.Tensor] | None) -> list[str]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, D, generator=g) * 2 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    b = (0.1 * torch.randn(D, generator=g)).to(dtype)
    calls = _calls(rows)
    methods = {
        FLOAT: repeated(lambda: tgn.layer_norm_sync(x, w, b), calls),
        EXACT: repeated(lambda: tgn.layer_norm_sync(x, w, b, accumulate="exact"), calls),
        EAGER: repeated(lambda: F.layer_norm(x, (D,), w, b), calls),
        EXACT_TORCH: repeated(lambda: _on_torch_ops(x, w, b), calls),
    }
    if compiled is not None:
        compiled(x, (D,), w, b)  # compiled for this shape before timing
        methods[COMPILED] = repeated(lambda: compiled(x, (D,), w, b), calls)
    for fn in methods.values():
        fn()

    def timed(*names: str) -> dict[str, float]:
        return {k: v / calls for k, v in interleaved_medians({k: methods[k] for k in names}, rounds).items()}

    # Each ratio from its own interleaved run of its two sides (the float call against
    # torch's, exact against float, exact against torch ops): a 100x slower call in the
    # same rotation (the torch-ops exact path, with its large temporaries) leaves the
    # calls after it a trimmed heap to fault back in and cold caches.
    vs_torch = timed(*(k for k in (FLOAT, EAGER, COMPILED) if k in methods))
    base = fastest(vs_torch, EAGER, COMPILED)
    vs_float = timed(FLOAT, EXACT)
    vs_ops = timed(EXACT, EXACT_TORCH)
    name = f"({rows}, {D}) {str(dtype).removeprefix('torch.')}"
    return [target_row(f"{name} float", vs_torch[FLOAT], vs_torch[base], base, 1.0),
            target_row(f"{name} exact", vs_float[EXACT], vs_float[FLOAT], "float", 1.3),
            target_row(f"{name} exact", vs_ops[EXACT], vs_ops[EXACT_TORCH], EXACT_TORCH, 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", default="1,64,1024,4096", help="row counts, comma-separated")
    args = parser.parse_args()
    compiled = _compiled()
    print(f"# LayerNorm, torch {torch.__version__}, {torch.get_num_threads()} threads; {native.describe()}")
    print(TARGET_HEADER)
    for rows in (int(r) for r in args.shapes.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            for line in case(rows, dtype, args.rounds, compiled):
                print(line, flush=True)


if __name__ == "__main__":
    main()
