"""Where a training step's time goes with ``weight_grad="exact"`` against ``"float"``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/exact_dw_step.py [--rows 64 1024] [--rounds 12]

``tgn.RMSNorm(4096)``'s step as ``benchmarks/targets.py`` times it (grads cleared to
``None``, then ``module(x).backward(dy)``), both modes interleaved round by round.  Each
round also records the time inside the backward's C call (``backward_exact_dw`` or
``backward_rows``, wrapped where the backend calls them) and the page faults a step
took (``resource.getrusage``), so the table separates the kernels from the rest of
the step (Python, autograd, the exact mode's hooks), and rounds whose fresh tensors
were faulted in from the others: the medians are printed over all rounds and over the
rounds with no faults in either mode.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.backends import registry  # noqa: E402

HIDDEN = 4096
MODES = ("exact", "float")
KERNELS = {"exact": "backward_exact_dw", "float": "backward_rows"}


def _timed(name: str, spent: dict[str, float]) -> Callable[..., Any]:
    real = getattr(registry._native_grads, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    return call


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(rows: int, rounds: int, calls: int | None = None) -> dict[str, list[tuple[float, float, float]]]:
    """Per mode, per round: (us a step, us of it in the backward's C call, faults a
    step), over ``calls`` steps a round (default: about 50 MiB of ``x`` a round)."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, HIDDEN, generator=g)
    w = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    modules = {mode: tgn.RMSNorm(HIDDEN, weight_grad=mode) for mode in MODES}
    inputs = {mode: x.clone().requires_grad_() for mode in MODES}
    for module in modules.values():
        with torch.no_grad():
            module.weight.copy_(w)
    spent: dict[str, float] = {}
    real = {name: getattr(registry._native_grads, name) for name in KERNELS.values()}
    for name in KERNELS.values():
        setattr(registry._native_grads, name, _timed(name, spent))
    calls = calls or max(3, 12800 // rows)
    found: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
    try:
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for mode in MODES:
                module, xm = modules[mode], inputs[mode]
                spent.clear()
                faults, start = _faults(), time.perf_counter()
                for _ in range(calls):
                    xm.grad = None
                    module.zero_grad(set_to_none=True)
                    module(xm).backward(dy)
                step = (time.perf_counter() - start) / calls
                found[mode].append((step * 1e6, spent.get(KERNELS[mode], 0.0) / calls * 1e6,
                                    (_faults() - faults) / calls))
    finally:
        for name, fn in real.items():
            setattr(registry._native_grads, name, fn)
    return {mode: timings[1:] for mode, timings in found.items()}


def table(rows: int, found: dict[str, list[tuple[float, float, float]]]) -> list[str]:
    quiet = [i for i in range(len(found["exact"])) if all(found[m][i][2] < 1 for m in MODES)]
    lines = []
    for label, picked in (("all rounds", range(len(found["exact"]))), ("rounds without faults", quiet)):
        if not picked:
            lines.append(f"| ({rows}, {HIDDEN}) | {label}: none | | | | | |")
            continue
        med = {m: [statistics.median(found[m][i][k] for i in picked) for k in range(3)] for m in MODES}
        e, f = med["exact"], med["float"]
        lines.append(f"| ({rows}, {HIDDEN}) | {label} ({len(picked)}) | {e[0]:.0f} | {f[0]:.0f} | {e[0] / f[0]:.2f}x "
                     f"| {e[1] - f[1]:+.0f} | {(e[0] - e[1]) - (f[0] - f[1]):+.0f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    print(f"# exact dW training step: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} interleaved rounds")
    print("| input | rounds | exact step us | float step us | exact / float "
          "| exact - float, in the C call us | exact - float, the rest us |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        for line in table(rows, measure(rows, args.rounds)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
