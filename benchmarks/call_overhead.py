"""Per-call overhead against torch, fp32 CPU (issue 22): the two figures and their targets.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/call_overhead.py [--rounds 31] [--profile]

Each case is measured side by side in one run (interleaved rounds, medians; a call
too short to time alone is a loop of calls, divided back to one call):

* ``normalize_sync(x, w)`` on (1, 4096) against torch's faster eager kernel, the
  faster of ``F.rms_norm(x, (D,), w)`` and ``F.rms_norm(x, (D,))``: at most 0.45x;
* forward + backward of ``tgn.RMSNorm(4096)`` (``y = m(x); y.backward(dy)``, ``x``
  requiring grad, the gradients set to ``None`` before each step) against
  ``torch.compile(torch.nn.RMSNorm(4096))`` doing the same, at (64, 4096) and
  (4096, 4096): at most 0.7x.

Both sides run in this process, so they share its OpenMP wait policy: run with
``OMP_WAIT_POLICY=PASSIVE`` on a loaded machine (see ``training_step.py``).
``--profile`` adds a cProfile of warm (1, 4096) training steps: the function calls
per step and the functions with the most own time.  ``versions.py`` compares two
versions of the library on the same cases (``--suite training_step``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import TARGET_HEADER, fastest, interleaved_medians, repeated, target_row, train_step  # noqa: E402

D = 4096


def _inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g),
            torch.randn(rows, D, generator=g))


def small_call(rounds: int) -> str:
    """``normalize_sync`` (1, 4096) against the faster eager ``F.rms_norm``."""
    x, w, _ = _inputs(1)
    calls = 500
    t = interleaved_medians({
        "ours": repeated(lambda: tgn.normalize_sync(x, w), calls),
        "weighted": repeated(lambda: F.rms_norm(x, (D,), w), calls),
        "unweighted": repeated(lambda: F.rms_norm(x, (D,)), calls),
    }, rounds)
    base = fastest(t, "weighted", "unweighted")
    label = "F.rms_norm(x, (D,), w)" if base == "weighted" else "F.rms_norm(x, (D,))"
    return target_row(f"normalize_sync (1, {D}) fp32", t["ours"] / calls, t[base] / calls,
                      f"eager {label}, the faster", 0.45)


def _norms() -> tuple[tgn.RMSNorm, torch.nn.Module]:
    ours, theirs = tgn.RMSNorm(D), torch.nn.RMSNorm(D)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1)))
        theirs.weight.copy_(ours.weight)
    compiled: torch.nn.Module = torch.compile(theirs)  # type: ignore[assignment]
    return ours, compiled


def training_step(rows: int, rounds: int) -> str:
    """Forward + backward of ``tgn.RMSNorm`` against the compiled ``torch.nn.RMSNorm``."""
    ours, theirs = _norms()
    x, _, dy = _inputs(rows)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    calls = max(1, 64 // rows)
    steps = {"ours": repeated(train_step(ours, xo, dy), calls), "torch": repeated(train_step(theirs, xt, dy), calls)}
    for step in steps.values():  # compile (and warm) before timing
        step()
    t = interleaved_medians(steps, rounds)
    return target_row(f"RMSNorm forward+backward ({rows}, {D}) fp32", t["ours"] / calls, t["torch"] / calls,
                      "torch.compile(torch.nn.RMSNorm)", 0.7)


def profile(steps: int = 2000, top: int = 20) -> str:
    """cProfile of ``steps`` warm (1, 4096) training steps of ``tgn.RMSNorm``, as text."""
    ours, _ = _norms()
    x, _, dy = _inputs(1)
    step = train_step(ours, x.requires_grad_(), dy)
    for _ in range(50):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    total_calls = getattr(stats, "total_calls")  # (a plain attribute typeshed does not list)
    return (f"cProfile of {steps} warm (1, {D}) training steps: {total_calls / steps:.1f} function calls per "
            f"step\n" + buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds per case (default 31)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of (1, 4096) training steps")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"{tgn.backends.native.loader.describe()}; medians of {args.rounds} interleaved rounds\n")
    print(TARGET_HEADER)
    print(small_call(args.rounds))
    print(training_step(64, args.rounds))
    print(training_step(D, max(5, args.rounds // 3)))
    if args.profile:
        print()
        print(profile())


if __name__ == "__main__":
    main()
