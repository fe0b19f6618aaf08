"""How close ``normalize_sync`` comes to the memory-bandwidth floor (issue 22, items 2-4).

    python benchmarks/roofline.py [--rounds 9] [--json roofline.json] [--plot docs/images]
    python benchmarks/roofline.py --quick          # a smaller set, under a minute

RMSNorm reads each input byte once and writes each output byte once, so the floor
is ``out.copy_(x)`` into a preallocated buffer: the bytes moved are input bytes +
output bytes (the weight, one row, is left out).  Three parts, each printed as a
Markdown table and written to ``--json``:

* **roofline**: achieved GB/s of ``normalize_sync(x, w)`` (a fresh output) and
  ``normalize_sync(x, w, out=out)``, float and ``accumulate="exact"``, against
  ``copy_`` and against torch's fastest of eager ``F.rms_norm`` with and without
  the weight and ``torch.compile(F.rms_norm)`` (static shapes, compiled before
  timing), for every shape and dtype, at torch's thread count;
* **scaling**: fp32 ``out=`` float and exact beside ``copy_``, against rows at a
  hidden size of 4096 and against the hidden size at 1024 rows, on one thread and
  on all of them (``torch.set_num_threads``), so the steps where a row or the
  whole input leaves L1 or L2 show;
* **ceilings**: the compute ceiling of each dtype and mode: the GB/s of the same
  ``out=`` calls on one thread on an input whose bytes fit in the caches (rows of 4096
  adding up to :data:`CEILING_BYTES`), where memory bandwidth does not bound them and
  what is left is the arithmetic: the conversions of bf16 and fp16, the exact mode's
  fp64 lanes; times the run's threads.  A call moves at most min(copy_'s GB/s, this
  ceiling);
* **memory**: the peak extra RSS of one warm call, each in a fresh process
  (``roofline_memory.py`` says how and why that is honest).

Every timed method of a case is called once per round, the rounds interleaved (the
order is shuffled) and the figure is the median over rounds, so load from other work
hits all methods of a case alike: read the ratios, which compare methods timed in
the same rounds.  A call too short to time alone is a loop of calls, divided back.
``--plot DIR`` draws ``roofline.png`` and ``scaling.png`` there
(``roofline_plot.py``, which also redraws them from a ``--json`` file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import interleaved_medians, repeated  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COPY = "copy_"
FLOAT, FLOAT_OUT, EXACT, EXACT_OUT = "float", "float, out=", "exact", "exact, out="
EAGER_W, EAGER, COMPILED = "eager F.rms_norm(x, w)", "eager F.rms_norm(x)", "torch.compile(F.rms_norm)(x, w)"
TORCH_METHODS = (EAGER_W, EAGER, COMPILED)
#: Enough bytes per timing that a timing is about a millisecond or more.
BYTES_PER_TIMING = 16 << 20
Methods = dict[str, Callable[[], object]]
#: Input + output bytes of a ceiling's input: well inside L2 (2 MiB per core here) with
#: the rows shared among the threads, so no call waits on memory.
CEILING_BYTES = 512 << 10
QUICK_MEMORY_CASES = ("out.copy_(x) (control: 0)", "torch.empty_like(x).fill_(0) (control: the output)",
                      "normalize_sync(x, w)", "normalize_sync(x, w, out=out)", "forward+backward tgn.RMSNorm(D)")


@dataclass(frozen=True)
class Options:
    """What to measure; the defaults are the issue's set, ``quick()`` a smaller one."""

    shapes: tuple[tuple[int, int], ...] = ((1024, 4096), (4096, 4096), (32768, 128), (8192, 64))
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    rows: tuple[int, ...] = tuple(2**k for k in range(15))  # 1 .. 16384, at hidden 4096
    hidden: tuple[int, ...] = tuple(2**k for k in range(6, 17))  # 64 .. 65536, at 1024 rows
    rounds: int = 9
    compile: bool = True
    memory_shape: tuple[int, int] | None = (4096, 4096)
    #: Labels of ``roofline_memory.CASES`` to probe (``None``: all of them).
    memory_cases: tuple[str, ...] | None = None
    json: Path | None = None
    plot: Path | None = None

    def quick(self) -> Options:
        return replace(self, shapes=((1024, 4096), (8192, 64)), dtypes=("fp32", "bf16"),
                       rows=(1, 16, 256, 4096), hidden=(64, 1024, 16384), rounds=3, compile=False,
                       memory_shape=(1024, 4096), memory_cases=QUICK_MEMORY_CASES)


def bytes_moved(rows: int, hidden: int, dtype: str) -> int:
    """Input bytes + output bytes of one call: the least any RMSNorm must move."""
    return 2 * rows * hidden * DTYPES[dtype].itemsize


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def calls_per_timing(nbytes: int) -> int:
    return max(1, min(256, BYTES_PER_TIMING // nbytes))


def torch_best(seconds: dict[str, float]) -> str:
    """The fastest of torch's methods that were timed."""
    return min((m for m in TORCH_METHODS if m in seconds), key=seconds.__getitem__)


def _input(rows: int, hidden: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(DTYPES[dtype])
    return x, (1 + 0.1 * torch.randn(hidden, generator=g)).to(DTYPES[dtype])


def _ours(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, fresh: bool) -> Methods:
    methods: Methods = {
        FLOAT_OUT: lambda: tgn.normalize_sync(x, w, out=out),
        EXACT_OUT: lambda: tgn.normalize_sync(x, w, accumulate="exact", out=out),
    }
    if fresh:
        methods[FLOAT] = lambda: tgn.normalize_sync(x, w)
        methods[EXACT] = lambda: tgn.normalize_sync(x, w, accumulate="exact")
    return methods


def time_case(rows: int, hidden: int, dtype: str, rounds: int, *, torch_too: bool,
              compiled: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
    """Median seconds per call of every method on one input, interleaved; with
    ``torch_too`` the fresh-output calls and torch's kernels too."""
    x, w = _input(rows, hidden, dtype)
    out = torch.empty_like(x).zero_()
    methods: Methods = {COPY: lambda: out.copy_(x), **_ours(x, w, out, fresh=torch_too)}
    if torch_too:
        methods[EAGER_W] = lambda: F.rms_norm(x, (hidden,), w)
        methods[EAGER] = lambda: F.rms_norm(x, (hidden,))
        if compiled is not None:
            methods[COMPILED] = lambda: compiled(x, (hidden,), w)
    nbytes = bytes_moved(rows, hidden, dtype)
    calls = calls_per_timing(nbytes)
    medians = interleaved_medians({k: repeated(fn, calls) for k, fn in methods.items()}, rounds)
    return {"rows": rows, "hidden": hidden, "dtype": dtype, "bytes": nbytes, "calls": calls,
            "seconds": {k: v / calls for k, v in medians.items()}}


def _compiled_rms_norm() -> Callable[..., torch.Tensor] | None:
    """A fresh ``torch.compile(F.rms_norm)`` with static shapes (its kernel is built by
    the warm-up round), or ``None``.  dynamo's caches are reset first: they are kept
    per code object, so after ``recompile_limit`` (8) shapes and dtypes of the one
    ``F.rms_norm`` it would quietly run eager."""
    try:
        torch._dynamo.reset()
        fn = torch.compile(F.rms_norm, dynamic=False)
        fn(torch.ones(2, 8), (8,), torch.ones(8))
        return fn
    except Exception as exc:  # no C++ compiler, unsupported platform...
        print(f"(torch.compile unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def roofline(options: Options) -> list[dict[str, Any]]:
    cases = []
    for dtype in options.dtypes:
        for rows, hidden in options.shapes:
            compiled = _compiled_rms_norm() if options.compile else None
            cases.append(time_case(rows, hidden, dtype, options.rounds, torch_too=True, compiled=compiled))
            print(f"  roofline {rows}x{hidden} {dtype} done", file=sys.stderr)
    return cases


def scaling(options: Options) -> list[dict[str, Any]]:
    """fp32 ``out=`` against rows (hidden 4096) and hidden size (1024 rows), on one
    thread and on all; torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    points = []
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            sweeps = [("rows", r, 4096) for r in options.rows] + [("hidden", 1024, d) for d in options.hidden]
            for sweep, rows, hidden in sweeps:
                case = time_case(rows, hidden, "fp32", options.rounds, torch_too=False)
                points.append({"sweep": sweep, "threads": n, **case})
            print(f"  scaling on {n} thread(s) done", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    return points


def ceilings(options: Options) -> list[dict[str, Any]]:
    """Per dtype: GB/s of ``copy_`` and the ``out=`` calls on a cache-resident input
    (rows of 4096 moving :data:`CEILING_BYTES`), on one thread: one core's compute
    ceiling of each mode.  (On all threads a call this short measures the threads'
    wake-up, not their arithmetic; the rows are independent, so the ceiling of ``n``
    threads is ``n`` times one core's, which the table and the plot use.)"""
    threads = torch.get_num_threads()
    points = []
    try:
        torch.set_num_threads(1)
        for dtype in options.dtypes:
            rows = max(1, CEILING_BYTES // bytes_moved(1, 4096, dtype))
            case = time_case(rows, 4096, dtype, options.rounds, torch_too=False)
            points.append({**case, "threads": threads})
    finally:
        torch.set_num_threads(threads)
    print("  ceilings done", file=sys.stderr)
    return points


def ceiling_gbps(point: dict[str, Any], method: str) -> float:
    """The ceiling of ``method`` at the threads of the run: one core's GB/s times them."""
    return point["threads"] * gbps(point["bytes"], point["seconds"][method])


def ceiling_table(points: Sequence[dict[str, Any]]) -> str:
    """One line per dtype: one core's in-cache GB/s of copy_ and of each ``out=`` mode,
    and the float ceiling at the run's threads."""
    lines = ["| dtype | input (in cache) | copy_ GB/s, 1 core | float, out= GB/s, 1 core "
             "| exact, out= GB/s, 1 core | float ceiling at the run's threads GB/s |",
             "|---|---|---|---|---|---|"]
    for p in points:
        s, nbytes = p["seconds"], p["bytes"]
        lines.append(f"| {p['dtype']} | {p['rows']}x{p['hidden']} | {gbps(nbytes, s[COPY]):.1f} "
                     f"| {gbps(nbytes, s[FLOAT_OUT]):.1f} | {gbps(nbytes, s[EXACT_OUT]):.1f} "
                     f"| {ceiling_gbps(p, FLOAT_OUT):.1f} ({p['threads']} threads) |")
    return "\n".join(lines)


def _ratio(seconds: dict[str, float], a: str, b: str) -> str:
    return f"{seconds[a] / seconds[b]:.2f}x" if a in seconds and b in seconds else "n/a"


def roofline_table(cases: Sequence[dict[str, Any]]) -> str:
    """GB/s per method (bytes = input + output), torch's best named, and time ratios
    (above 1: slower than the method it is divided by)."""
    lines = [
        "| case | MiB moved | copy_ | float, out= | exact, out= | float | exact | torch's best "
        "| float out= / copy_ | exact out= / copy_ | float / torch's best |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        s, nbytes = c["seconds"], c["bytes"]
        rate = {k: f"{gbps(nbytes, v):.1f}" for k, v in s.items()}
        best = torch_best(s)
        lines.append(
            f"| {c['rows']}x{c['hidden']} {c['dtype']} | {nbytes / 2**20:.0f} | {rate[COPY]} | {rate[FLOAT_OUT]} "
            f"| {rate[EXACT_OUT]} | {rate[FLOAT]} | {rate[EXACT]} | {rate[best]} ({best}) "
            f"| {_ratio(s, FLOAT_OUT, COPY)} | {_ratio(s, EXACT_OUT, COPY)} | {_ratio(s, FLOAT, best)} |"
        )
    return "\n".join(lines)


def scaling_table(points: Sequence[dict[str, Any]]) -> str:
    """One line per size and thread count: GB/s of copy_ and ``out=``, and out= / copy_."""
    lines = ["| sweep | threads | rows | hidden | KiB moved | copy_ GB/s | float, out= GB/s | exact, out= GB/s "
             "| float out= / copy_ | exact out= / copy_ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        s, nbytes = p["seconds"], p["bytes"]
        lines.append(
            f"| {p['sweep']} | {p['threads']} | {p['rows']} | {p['hidden']} | {nbytes / 1024:.0f} "
            f"| {gbps(nbytes, s[COPY]):.1f} | {gbps(nbytes, s[FLOAT_OUT]):.1f} | {gbps(nbytes, s[EXACT_OUT]):.1f} "
            f"| {_ratio(s, FLOAT_OUT, COPY)} | {_ratio(s, EXACT_OUT, COPY)} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the figures were taken on, for the JSON and the header."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    from taskgraph_norm.backends.native import loader as native

    return {"cpu": model, "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "load_average": os.getloadavg()[0], "date": datetime.date.today().isoformat(), "commit": commit,
            "kernels": native.describe()}


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, fp32 and bf16, 3 rounds, no "
                        "torch.compile, coarse sweeps, memory at (1024, 4096): under a minute")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (default 9; --quick 3)")
    parser.add_argument("--shapes", nargs="+", metavar="RxD", help="roofline shapes (default: the issue's four)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--rows", nargs="*", type=int, help="rows of the scaling sweep at hidden 4096")
    parser.add_argument("--hidden", nargs="*", type=int, help="hidden sizes of the scaling sweep at 1024 rows")
    parser.add_argument("--memory-shape", metavar="RxD", help="input of the memory probes; 'none' skips them")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the baseline")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="draw roofline.png and scaling.png in DIR")
    args = parser.parse_args(argv)
    options = Options().quick() if args.quick else Options()
    shape = lambda text: tuple(int(n) for n in text.lower().split("x"))  # noqa: E731
    changes: dict[str, Any] = {"json": args.json, "plot": args.plot}
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        changes["rounds"] = args.rounds
    if args.shapes:
        changes["shapes"] = tuple(shape(s) for s in args.shapes)
    for name in ("dtypes", "rows", "hidden"):
        if getattr(args, name) is not None:
            changes[name] = tuple(getattr(args, name))
    if args.memory_shape:
        changes["memory_shape"] = None if args.memory_shape == "none" else shape(args.memory_shape)
    if args.no_compile:
        changes["compile"] = False
    return replace(options, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options = parse_args(argv)
    from roofline_memory import memory, memory_table

    facts = machine()
    print(f"{facts['cpu']}, {facts['cpus']} CPUs, load average {facts['load_average']:.1f}; torch {facts['torch']}, "
          f"{facts['threads']} intra-op threads (OMP_WAIT_POLICY {facts['omp_wait_policy']}); median of {options.rounds} interleaved rounds; {facts['kernels']}\n")
    result: dict[str, Any] = {"machine": facts, "options": {k: str(v) for k, v in asdict(options).items()}}
    result["roofline"] = roofline(options)
    print("GB/s (input + output bytes per second):\n" + roofline_table(result["roofline"]) + "\n")
    result["ceilings"] = ceilings(options)
    print("Compute ceilings (GB/s on an input in cache, one core; times the threads):\n" + ceiling_table(result["ceilings"]) + "\n")
    result["scaling"] = scaling(options)
    print(scaling_table(result["scaling"]) + "\n")
    if options.memory_shape is not None:
        result["memory"] = memory(*options.memory_shape, cases=options.memory_cases)
        print(memory_table(result["memory"]))
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(result, indent=1) + "\n")
    if options.plot is not None:
        from roofline_plot import draw

        for path in draw(result, options.plot):
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
