"""``taskgraph-norm bench``: the compiled executor against torch's kernels, in one run.

Every ratio compares methods timed in the same process, interleaved round by
round (one call of each method per round, the median over rounds), so noise
from other work on the machine hits all of them alike.  Rows:

* large inputs ``(4096, 4096)`` / ``(16384, 4096)`` in fp32 and bf16: compiled tree
  ``normalize`` against eager ``F.rms_norm`` and ``torch.compile(F.rms_norm)``;
  with ``out=`` against ``out.copy_(x)`` (the memory-bandwidth floor);
  ``accumulate="exact"`` against float;
* a decode-size ``(1, 4096)`` input: ``normalize_sync`` and ``await normalize``;
* peak extra memory beyond the output, measured as the RSS high-water mark of a
  fresh subprocess;
* whether each method is batch-invariant here (a row alone vs in batches of 64
  and of the full size, compared bit for bit).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from ..api import normalize, normalize_sync
from ..backends.native import loader as native
from ..testing import bits_equal
from .progress import ProgressBar, progress_bar

__all__ = ["BenchConfig", "run_bench", "balanced_orders", "interleaved_medians", "interleaved_times",
           "peak_extra_memory"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.  The defaults are the issue's table; ``quick`` shrinks it."""

    shapes: tuple[tuple[int, int], ...] = ((4096, 4096), (16384, 4096))
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batches: tuple[int, ...] = (1, 16, 256, 4096)
    rounds: int = 7
    torch_compile: bool = True
    memory: bool = True
    #: Use the compiled executor's native kernels when they are available; ``False``
    #: measures its torch ops (the path of a machine with no C compiler).
    native: bool = True
    out_dir: Path = field(default_factory=lambda: Path("bench-results"))


def balanced_orders(n: int) -> list[list[int]]:
    """The rounds' orders of ``n`` methods: a Williams design, as crossover trials use
    to balance carry-over.  Its first order is 0, 1, n-1, 2, n-2, ...; order ``r`` adds
    ``r`` to each (mod ``n``); for an odd ``n`` the reversed orders follow.  Over the
    ``n`` orders (``2n`` for odd ``n``), each method comes right after each other one
    equally often (once; twice for odd ``n``) and holds each place equally often."""
    if n <= 1:
        return [list(range(n))]
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(f + r) % n for f in first] for r in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def interleaved_times(
    methods: dict[str, Callable[[], object]], rounds: int,
    *, observe: Callable[[str, object], None] | None = None, bar: ProgressBar | None = None,
    settle: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call per method, in round order; each round calls every
    method once, in turn, so round ``r`` of two methods saw the same load.  Round
    ``r`` calls them in the order ``balanced_orders(n)[r % period]``, its entry ``i``
    naming method ``(i + r // period) % n``: over each whole period every method
    follows every other one equally often and sits at every place equally often, and
    from one period to the next each method moves to the next method's entries, so
    over ``n`` periods each also takes each entry of the design (its first place in
    a round, after the last of the round before, which the design does not balance).
    What a call leaves behind (eager's 16 MiB fp32 temporaries, which push the next
    method's input out of the caches and its fresh output onto cold heap blocks; the
    C allocator trimming the heap after a torch.compile call; another pool's threads
    still awake) so falls on every method alike.  (A rotation of one order would
    keep each method's predecessor, and random orders leave one method after eager's
    calls far more often than another, which moves medians apart by a third; with the
    design alone, a method kept in one entry ran 10-20% slower than the same call in
    another, docs/performance.md.)  Pass ``n`` whole periods of rounds
    (``n * len(balanced_orders(n))``) for the full balance.

    ``settle[name]``, when given, is called untimed right before each timed call of
    ``name`` (its result dropped): a call of the same method, so that every timed
    call follows its own method, whatever ran before the settling one.  A timing then
    measures the method's steady state in a loop, with no other method's leftovers.

    ``observe(name, result)``, when given, sees each timed call's result outside
    the timed region (the warm-up call's is not shown); the result is dropped
    before the next call, so no method runs beside a pile of live outputs.

    ``bar``, when given, advances by one per round (a caller's bar over a longer
    job); without it the rounds show a bar of their own on a terminal
    (:func:`.progress.progress_bar`).
    """
    for fn in methods.values():
        fn()  # warm-up: workspaces, dispatch caches, compiled kernels
    times: dict[str, list[float]] = {k: [] for k in methods}
    order = list(methods.items())
    orders = balanced_orders(len(order))
    rounds = rounds if order else 0
    with nullcontext(bar) if bar is not None else progress_bar(rounds, "rounds", unit="round") as shown:
        for r in range(rounds):
            shift = r // len(orders)
            for name, fn in (order[(i + shift) % len(order)] for i in orders[r % len(orders)]):
                if settle is not None and name in settle:
                    settle[name]()
                t0 = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - t0)
                if observe is not None:
                    observe(name, result)
                del result
            shown.update()
    return times


def interleaved_medians(
    methods: dict[str, Callable[[], object]], rounds: int,
    *, observe: Callable[[str, object], None] | None = None, bar: ProgressBar | None = None,
    settle: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per method over :func:`interleaved_times`' rounds."""
    times = interleaved_times(methods, rounds, observe=observe, bar=bar, settle=settle)
    return {k: statistics.median(v) for k, v in times.items()}


def _compiled_rms_norm() -> Callable[..., torch.Tensor] | None:
    try:
        fn = torch.compile(F.rms_norm)
        fn(torch.ones(2, 8), (8,))
        return fn
    except Exception:  # no C++ compiler, unsupported platform...
        return None


def _input(shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tuple(shape), generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, w


def _methods(x: torch.Tensor, w: torch.Tensor, tc: Callable[..., torch.Tensor] | None) -> dict[str, Callable[[], object]]:
    d = x.shape[-1]
    out = torch.empty_like(x)
    methods: dict[str, Callable[[], object]] = {
        "eager F.rms_norm": lambda: F.rms_norm(x, (d,), w),
        "out.copy_(x)": lambda: out.copy_(x),
        "compiled tree": lambda: normalize_sync(x, w),
        "compiled tree, out=": lambda: normalize_sync(x, w, out=out),
        "compiled tree exact, out=": lambda: normalize_sync(x, w, accumulate="exact", out=out),
    }
    if tc is not None:
        methods["torch.compile(F.rms_norm)"] = lambda: tc(x, (d,), w)
    return methods


def _ratio(times: dict[str, float], a: str, b: str) -> str:
    return f"{times[a] / times[b]:.2f}x" if a in times and b in times else "n/a"


def _large_rows(config: BenchConfig, tc: Any, progress: ProgressBar) -> list[str]:
    lines = [
        "| input | eager ms | torch.compile ms | copy_ ms | compiled ms | compiled out= ms | exact out= ms "
        "| compiled / eager (<= 0.6) | compiled / torch.compile (<= 1.0) | out= / copy_ (<= 3) "
        "| exact / float (<= 1.5) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in config.dtypes:
        for shape in config.shapes:
            progress.set_postfix_str(f"{shape[0]}x{shape[1]} {dtype}")
            x, w = _input(shape, DTYPES[dtype])
            t = interleaved_medians(_methods(x, w, tc), config.rounds)
            ms = {k: f"{v * 1e3:.1f}" for k, v in t.items()}
            lines.append(
                f"| {shape[0]}x{shape[1]} {dtype} | {ms['eager F.rms_norm']} | {ms.get('torch.compile(F.rms_norm)', 'n/a')} "
                f"| {ms['out.copy_(x)']} | {ms['compiled tree']} | {ms['compiled tree, out=']} "
                f"| {ms['compiled tree exact, out=']} | {_ratio(t, 'compiled tree', 'eager F.rms_norm')} "
                f"| {_ratio(t, 'compiled tree', 'torch.compile(F.rms_norm)')} "
                f"| {_ratio(t, 'compiled tree, out=', 'out.copy_(x)')} "
                f"| {_ratio(t, 'compiled tree exact, out=', 'compiled tree, out=')} |"
            )
            progress.update()
    return lines


def _decode_rows(config: BenchConfig, progress: ProgressBar) -> list[str]:
    import anyio

    lines = ["| (1, 4096) | eager us | normalize_sync us | await normalize us | sync / eager (<= 2.5) |",
             "|---|---|---|---|---|"]
    calls = 200
    for dtype in config.dtypes:
        progress.set_postfix_str(f"decode {dtype}")
        x, w = _input((1, 4096), DTYPES[dtype])

        def many(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(calls):
                    fn()
            return run

        async def awaited() -> None:
            for _ in range(calls):
                await normalize(x, w)

        t = interleaved_medians(
            {
                "eager": many(lambda: F.rms_norm(x, (4096,), w)),
                "sync": many(lambda: normalize_sync(x, w)),
                "async": lambda: anyio.run(awaited),
            },
            config.rounds,
        )
        us = {k: v / calls * 1e6 for k, v in t.items()}
        lines.append(f"| {dtype} | {us['eager']:.1f} | {us['sync']:.1f} | {us['async']:.1f} "
                     f"| {us['sync'] / us['eager']:.2f}x |")
        progress.update()
    return lines


_MEMORY_PROBE = """
import json, resource, sys, torch, torch.nn.functional as F
import taskgraph_norm as tgn
method, dtype, rows, hidden = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# Made in place, so no temporary raises the high-water mark before we read it.
x = torch.empty(rows, hidden, dtype=dtype).normal_(); w = torch.ones(hidden, dtype=dtype)
out = torch.empty_like(x).fill_(0)
def kb():  # VmHWM: this process's own peak (ru_maxrss would inherit the parent's across fork+exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def run(x, w, out):
    if method == "eager": out.copy_(F.rms_norm(x, (x.shape[-1],), w))
    elif method == "copy": out.copy_(x)
    else: tgn.normalize_sync(x, w, accumulate=method, out=out)
small = torch.ones(4, 64, dtype=dtype)
run(small, torch.ones(64, dtype=dtype), torch.empty_like(small))  # loads the code pages
before = kb()
for _ in range(3):
    run(x, w, out)
print(json.dumps({"extra_kb": kb() - before}))
"""


def peak_extra_memory(method: str, dtype: str, rows: int, hidden: int, native: bool = True) -> float:
    """Peak RSS (VmHWM) growth in MiB of a fresh process running ``method`` into a preallocated
    output (``"float"`` / ``"exact"``: compiled normalize; ``"eager"``; ``"copy"``);
    ``native=False`` runs the compiled executor on its torch ops."""
    env = dict(os.environ)
    if not native:
        env["TGN_NATIVE"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, method, dtype, str(rows), str(hidden)],
        capture_output=True, text=True, check=True, env=env,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["extra_kb"]) / 1024


def _memory_rows(config: BenchConfig, progress: ProgressBar) -> list[str]:
    lines = ["| (4096, 4096) into a preallocated output | extra peak RSS MiB |", "|---|---|"]
    for method, label in (("copy", "out.copy_(x)"), ("eager", "eager F.rms_norm + copy"),
                          ("float", "compiled tree, out="), ("exact", "compiled tree exact, out=")):
        for dtype in config.dtypes:
            progress.set_postfix_str(f"memory {label} {dtype}")
            extra = peak_extra_memory(method, dtype, 4096, 4096, config.native)
            lines.append(f"| {label} {dtype} | {extra:.1f} |")
            progress.update()
    return lines


def batch_invariant(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Rows 0 and -1 alone, in a batch of 64 and in the full batch: identical bits?"""
    full = fn(x)
    for r in (0, x.shape[0] - 1):
        if not bits_equal(fn(x[r : r + 1].clone()), full[r : r + 1]):
            return False
    small = fn(x[:64].clone())
    return bits_equal(small, full[:64])


def _invariance_rows(config: BenchConfig, tc: Any, progress: ProgressBar) -> list[str]:
    x, w = _input((4096, 4096), torch.float32)
    d = x.shape[-1]
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager F.rms_norm": lambda t: F.rms_norm(t, (d,), w),
        "compiled tree (this library)": lambda t: normalize_sync(t, w),
        "compiled tree exact (this library)": lambda t: normalize_sync(t, w, accumulate="exact"),
    }
    if tc is not None:
        methods["torch.compile(F.rms_norm)"] = lambda t: tc(t, (d,), w)
    lines = ["| method (fp32, rows alone vs batch 64 vs 4096) | batch-invariant here |", "|---|---|"]
    progress.set_postfix_str("batch invariance")
    for name, fn in methods.items():
        lines.append(f"| {name} | {'yes' if batch_invariant(fn, x) else 'NO'} |")
    progress.update()
    return lines


def _sweep(config: BenchConfig, tc: Any, progress: ProgressBar) -> dict[str, dict[int, float]]:
    """Seconds per call against batch size, fp32, hidden 4096, for the plot."""
    series: dict[str, dict[int, float]] = {}
    for rows in config.batches:
        progress.set_postfix_str(f"sweep batch {rows}")
        x, w = _input((rows, 4096), torch.float32)
        for name, sec in interleaved_medians(_methods(x, w, tc), config.rounds).items():
            series.setdefault(name, {})[rows] = sec
        progress.update()
    return series


def plot(series: dict[str, dict[int, float]], path: Path) -> None:
    """Time per call against batch size, one line per method (log-log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the bench plot needs matplotlib: pip install 'taskgraph-norm[bench]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[b] * 1e3 for b in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows of 4096, fp32)")
    ax.set_ylabel("ms per call (median)")
    ax.set_title("RMSNorm on this CPU: time vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(config: BenchConfig, stream: TextIO) -> str:
    """Run the suite, print the Markdown report, write ``bench.md`` and ``bench.png``.
    A terminal on stderr shows a progress bar (:func:`.progress.progress_bar`)."""
    if not config.native:
        with native.disabled():
            return _run_bench(config, stream)
    return _run_bench(config, stream)


def _run_bench(config: BenchConfig, stream: TextIO) -> str:
    steps = len(config.dtypes) * (len(config.shapes) + 1) + len(config.batches) + 1
    steps += 4 * len(config.dtypes) if config.memory else 0
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"median of {config.rounds} interleaved rounds; compiled = this library's default "
        "normalize (tree, chunk 64, pairwise leaf, executor auto -> compiled); "
        + native.describe(config.native)
    )
    with progress_bar(steps, "bench") as progress:
        progress.set_postfix_str("torch.compile" if config.torch_compile else "")
        tc = _compiled_rms_norm() if config.torch_compile else None
        parts = [header, "", *_large_rows(config, tc, progress), "", *_decode_rows(config, progress)]
        if config.memory:
            parts += ["", *_memory_rows(config, progress)]
        parts += ["", *_invariance_rows(config, tc, progress)]
        series = _sweep(config, tc, progress)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    png = config.out_dir / "bench.png"
    try:
        plot(series, png)
        parts += ["", f"![time vs batch size]({png.name})"]
    except ImportError as exc:
        parts += ["", f"(no plot: {exc})"]
    text = "\n".join(parts) + "\n"
    (config.out_dir / "bench.md").write_text(text)
    stream.write(text)
    return text
