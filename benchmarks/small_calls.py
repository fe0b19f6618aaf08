"""Small and fresh-output calls of ``normalize`` against torch's kernels (issue 12, items 5 and 6).

    python benchmarks/small_calls.py [--rounds 15] [--profile]

Every case is measured side by side in one run: each round calls every method of
the case once (a method too short to time alone is a loop of calls, divided back
to one call), the figure is the median over rounds, and torch keeps the thread
count it chose for this machine.  Each line gives our time, the baseline's and
which baseline it was, the ratio ours / baseline, the target and whether it is met:

* ``normalize_sync(x, w)`` fp32 on (1, 4096) and (64, 4096) against torch's faster
  eager kernel: the faster of ``F.rms_norm(x, (D,), w)`` and ``F.rms_norm(x, (D,))``
  in the same rounds (torch's weighted CPU kernel can be several times slower);
* (256, 4096) and (1024, 4096): against the faster of that eager kernel and
  ``torch.compile(F.rms_norm)`` (compiled once per shape, before timing);
* ``await normalize(x, w)`` on (1, 4096) against ``normalize_sync``: the awaited
  calls run inside one event loop (one ``anyio.run`` of a loop of calls, whose
  start-up is shared by all the calls of the loop);
* a fresh output at (4096, 4096): ``normalize_sync(x, w)`` against
  ``torch.compile(F.rms_norm)``, both allocating their output, with
  ``normalize_sync(x, w, out=out)`` and the cost of faulting in a fresh 64 MiB
  tensor (``torch.empty`` + ``zero_()``) beside them, so the page-fault share shows.

``--profile`` also prints a cProfile of 10,000 warm ``normalize_sync`` calls on
(1, 4096): the top functions by own time and the function calls per call.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import TARGET_HEADER, fastest, interleaved_medians, minor_faults, repeated, target_row  # noqa: E402

D = 4096
EAGER_W, EAGER = "eager F.rms_norm(x, (D,), w)", "eager F.rms_norm(x, (D,))"
COMPILED = "torch.compile(F.rms_norm)"
Methods = dict[str, Callable[[], object]]


def _input(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g)


def _calls_per_timing(rows: int) -> int:
    """Enough calls that one timing is about a millisecond or more of work."""
    return max(1, 256 // rows)


def _eager(x: torch.Tensor, w: torch.Tensor) -> Methods:
    return {EAGER_W: lambda: F.rms_norm(x, (D,), w), EAGER: lambda: F.rms_norm(x, (D,))}


def _per_call(methods: Methods, calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per single call of each method, interleaved round by round."""
    times = interleaved_medians({k: repeated(fn, calls) for k, fn in methods.items()}, rounds)
    return {k: v / calls for k, v in times.items()}


def _faults_per_call(methods: Methods, rounds: int = 3) -> dict[str, float]:
    """Minor page faults per call of each method (median over interleaved rounds): a
    method whose output the C allocator hands back to the OS after every call faults
    it in again on the next (see docs/performance.md, "Page faults")."""
    counts: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            before = minor_faults()
            fn()
            counts[name].append(minor_faults() - before)
    return {k: statistics.median(v) for k, v in counts.items()}


def _against_torch(rows: int, rounds: int, compiled: Callable[..., torch.Tensor] | None, target: float) -> str:
    x, w = _input(rows)
    methods: Methods = {"ours": lambda: tgn.normalize_sync(x, w), **_eager(x, w)}
    if compiled is not None:
        methods[COMPILED] = lambda: compiled(x, (D,), w)
    t = _per_call(methods, _calls_per_timing(rows), rounds)
    faults = _faults_per_call(methods)
    base = fastest(t, EAGER_W, EAGER, COMPILED)
    eager = fastest(t, EAGER_W, EAGER)
    other = EAGER if eager == EAGER_W else EAGER_W
    label = f"{base} (faster than {other}: {t[other] * 1e6:.1f} us"
    if compiled is not None:
        rival = COMPILED if base != COMPILED else eager
        label += f"; than {rival}: {t[rival] * 1e6:.1f} us"
    if faults["ours"] or faults[base]:
        label += f"; page faults per call: ours {faults['ours']:.0f}, baseline {faults[base]:.0f}"
    return target_row(f"normalize_sync ({rows}, {D}) fp32", t["ours"], t[base], label + ")", target)


def _async_row(rounds: int) -> str:
    x, w = _input(1)
    calls = 500

    async def awaited() -> None:
        for _ in range(calls):
            await tgn.normalize(x, w)

    times = interleaved_medians(
        {"sync": repeated(lambda: tgn.normalize_sync(x, w), calls), "async": lambda: anyio.run(awaited)}, rounds
    )
    return target_row(f"await normalize (1, {D}) fp32, {calls} calls per event loop",
                      times["async"] / calls, times["sync"] / calls, "normalize_sync (1, 4096)", 1.5)


def _fresh_output_rows(rounds: int, compiled: Callable[..., torch.Tensor] | None) -> list[str]:
    x, w = _input(4096)
    out = torch.empty_like(x).zero_()
    methods: Methods = {
        "ours": lambda: tgn.normalize_sync(x, w),
        "ours, out=": lambda: tgn.normalize_sync(x, w, out=out),
        "fresh 64 MiB": lambda: torch.empty_like(x).zero_(),
        "warm 64 MiB": lambda: out.zero_(),
        **_eager(x, w),
    }
    if compiled is not None:
        methods[COMPILED] = lambda: compiled(x, (D,), w)
    t = _per_call(methods, 1, rounds)
    base = COMPILED if compiled is not None else fastest(t, EAGER_W, EAGER)
    case = f"normalize_sync ({x.shape[0]}, {D}) fp32, fresh output"
    return [
        target_row(case, t["ours"], t[base], f"{base}, also allocating", 1.0),
        target_row(f"normalize_sync ({x.shape[0]}, {D}) fp32, out=", t["ours, out="], t[base],
                   f"{base}, allocating (for scale)", None),
        f"\nfresh output at ({x.shape[0]}, {D}) fp32: torch.empty + zero_() {t['fresh 64 MiB'] * 1e6:.0f} us, "
        f"zero_() of a warm tensor {t['warm 64 MiB'] * 1e6:.0f} us: about "
        f"{(t['fresh 64 MiB'] - t['warm 64 MiB']) * 1e6:.0f} us of page faults per fresh 64 MiB output "
        f"(normalize_sync {t['ours'] * 1e6:.0f} us fresh, {t['ours, out='] * 1e6:.0f} us out=; "
        f"eager with weight {t[EAGER_W] * 1e6:.0f} us, without {t[EAGER] * 1e6:.0f} us)",
    ]


def _compiled_rms_norm() -> Callable[..., torch.Tensor] | None:
    """``torch.compile(F.rms_norm)`` with static shapes (a kernel per shape, as a
    model with fixed shapes gets), or ``None`` where it cannot build."""
    try:
        fn = torch.compile(F.rms_norm, dynamic=False)
        fn(torch.ones(2, 8), (8,), torch.ones(8))
        return fn
    except Exception as exc:  # no C++ compiler, unsupported platform...
        print(f"(torch.compile unavailable: {type(exc).__name__}: {exc})")
        return None


def profile(calls: int = 10_000, top: int = 25) -> str:
    """cProfile of ``calls`` warm ``normalize_sync`` calls on (1, 4096), as text."""
    x, w = _input(1)
    for _ in range(100):
        tgn.normalize_sync(x, w)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        tgn.normalize_sync(x, w)
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    # Stats' totals are plain attributes that typeshed does not list.
    total_calls, total_tt = getattr(stats, "total_calls"), getattr(stats, "total_tt")
    head = (f"cProfile of {calls} warm normalize_sync calls on (1, {D}) fp32: "
            f"{total_calls / calls:.1f} function calls per normalize_sync call, "
            f"{total_tt / calls * 1e6:.1f} us per call under the profiler")
    return head + "\n" + buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (default 15)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of 10,000 warm normalize_sync calls on (1, 4096)")
    args = parser.parse_args(argv)
    from taskgraph_norm.backends.native import loader as native

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads "
          f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (torch's threads stall when it passes "
          f"the CPU count); median of "
          f"{args.rounds} interleaved rounds; {native.describe()}\n")
    compiled = _compiled_rms_norm()
    lines = [
        TARGET_HEADER,
        _against_torch(1, args.rounds, None, 1.2),
        _against_torch(64, args.rounds, None, 1.0),
        _against_torch(256, args.rounds, compiled, 1.0),
        _against_torch(1024, args.rounds, compiled, 1.0),
        _async_row(args.rounds),
        *_fresh_output_rows(args.rounds, compiled),
    ]
    print("\n".join(lines))
    if args.profile:
        print()
        print(profile())


if __name__ == "__main__":
    main()
