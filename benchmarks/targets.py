"""Every CPU speed target of issue 22 in one run, each against its baseline timed in
the same interleaved rounds.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/targets.py [--rounds 16] [--quick] [--only GROUP ...]
                                                         [--processes N]

Groups (``--only`` picks some; ``--quick`` runs each on its smaller shapes with 3
rounds and no ``torch.compile``, a check that the script runs, not figures to quote):

* ``out``: ``normalize_sync(x, w, out=out)`` against ``out.copy_(x)`` into the same
  preallocated buffer (the memory floor: RMSNorm reads and writes each byte once), at
  (1024, 4096) and (4096, 4096); at most 1.1x in fp32, 1.5x in bf16 and fp16;
* ``fresh``: a fresh output through ``normalize_sync(x, w)`` and through
  ``tgn.RMSNorm`` under ``no_grad``, each in rounds of its own against the faster of
  eager ``F.rms_norm`` (with and without the weight: torch's weighted CPU kernel can be
  the slower) and ``torch.compile(F.rms_norm)`` (static shapes, compiled before
  timing), at (1024, 4096) and (4096, 4096) and on QK-norm's short rows (32768, 128)
  and (8192, 64), fp32, bf16 and fp16: at most 1.0x;
* ``exact``: ``accumulate="exact"`` against the same call with ``"float"`` (fp32,
  ``out=`` and fresh alike, each pair in rounds of its own), at most 1.25x at (1, 4096)
  and (64, 4096) and 1.1x at (1024, 4096) and (4096, 4096);
* ``exact_dw``: forward + backward of ``tgn.RMSNorm(4096, weight_grad="exact")``
  against ``weight_grad="float"`` at 64, 1024 and 4096 rows: at most 1.3x;
* ``train``: forward + backward of ``tgn.RMSNorm(4096)`` against
  ``torch.compile(torch.nn.RMSNorm(4096))`` at 64 and 4096 rows: at most 0.7x;
* ``small``: ``normalize_sync`` on (1, 4096) fp32 against torch's faster eager kernel:
  at most 0.45x.

Each timing makes at least MIN_CALLS calls in a row, as a loop over one method does,
right after one untimed call of the same method (``settle``): each method is timed in
its own steady state, not in what the method before it left. The interleaving frees
one method's large tensors where the next allocates, so the first call after a switch
may fault in heap blocks glibc returned to the OS in between (docs/performance.md,
"Page faults"), and eager's fp32 temporaries push the next method's input and Python
objects out of the caches; timed, that first call charged those costs to whichever
method came next. The rounds call the methods in the orders of ``balanced_orders``
(tools/bench.py), each method moving to the next one's place from one period of the
design to the next: 16 rounds are the whole cycle for four methods (the ``fresh``
group's: a face and three baselines) and four cycles for two.

``--processes N`` runs the whole set in N fresh interpreters, one after the other, and
takes each line from the process whose ratio is the median of the N (listing every
process's ratio under the table): a process draws its heap layout and its tensors'
physical pages once, and some lines fall into a slower or faster mode for a whole
process (glibc's page faults, below), as pyperf runs its benchmarks in several
processes for the same reason.

Each line: our median time, the baseline's and which it was, the ratio and whether the
target is met; then the count of targets met, and the lines whose method or baseline
took minor page faults in its timed calls, with their number per call (glibc may give
a freed 16 MiB block back to the OS and fault it in again on the next call, in some
processes and not others: docs/performance.md, "Page faults").  torch's OpenMP threads spin
between ops, which stalls them on a loaded machine: run with
``OMP_WAIT_POLICY=PASSIVE`` (printed in the header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from common import (  # noqa: E402
    TARGET_HEADER, fastest, interleaved_medians, minor_faults, repeated, target_row, train_step,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GROUPS = ("out", "fresh", "exact", "exact_dw", "train", "small")
#: Bytes one timing should move at least, so each timing is about a millisecond.
BYTES_PER_TIMING = 16 << 20
#: Calls one timing makes at least (the module docstring says why).
MIN_CALLS = 3
#: A line whose ours or baseline took this many minor page faults per timed call or
#: more gets a note under the table.
NOTED_FAULTS = 1.0
Methods = dict[str, Callable[[], object]]


@dataclass(frozen=True)
class Result:
    """One target line: ours and the baseline in seconds per call."""

    case: str
    ours: float
    base: float
    baseline: str
    target: float | None
    #: Minor page faults per timed call of ours and of the baseline.
    faults: tuple[float, float] = (0.0, 0.0)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ours / self.base <= self.target

    def row(self) -> str:
        return target_row(self.case, self.ours, self.base, self.baseline, self.target)


def _input(rows: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    return x, (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)


def _calls(nbytes: int) -> int:
    return max(MIN_CALLS, min(256, BYTES_PER_TIMING // max(nbytes, 1)))


class Timings(dict[str, float]):
    """Median seconds per call of each method (the dict), and ``faults``: each method's
    minor page faults per timed call."""

    def __init__(self, seconds: dict[str, float], faults: dict[str, float]) -> None:
        super().__init__(seconds)
        self.faults = faults


def _time(methods: Methods, calls: int, rounds: int) -> Timings:
    """Median seconds per call of each method, interleaved over ``rounds``; each
    timing of ``calls`` calls comes right after one untimed call of the same method.
    With them, the timed calls' page faults per call."""
    counts = {k: [0, 0] for k in methods}  # faults, calls

    def counted(name: str, fn: Callable[[], object]) -> Callable[[], None]:
        run = repeated(fn, calls)

        def timed() -> None:
            before = minor_faults()
            run()
            counts[name][0] += minor_faults() - before
            counts[name][1] += calls

        return timed

    medians = interleaved_medians({k: counted(k, fn) for k, fn in methods.items()}, rounds, settle=methods)
    return Timings({k: v / calls for k, v in medians.items()}, {k: f / max(n, 1) for k, (f, n) in counts.items()})


def _result(case: str, t: Timings, ours: str, base: str, baseline: str, target: float | None) -> Result:
    """The line of ``ours`` against ``base`` in timings ``t``."""
    return Result(case, t[ours], t[base], baseline, target, (t.faults[ours], t.faults[base]))


def compiled(fn: Callable[..., torch.Tensor], enabled: bool) -> Callable[..., torch.Tensor] | None:
    """A fresh ``torch.compile(fn)`` with static shapes, or ``None`` (disabled or no
    compiler).  dynamo's caches are reset first: they are kept per code object, so past
    its recompile limit the one ``F.rms_norm`` would quietly run eager."""
    if not enabled:
        return None
    try:
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # pragma: no cover - no C++ compiler, unsupported platform
        print(f"(torch.compile unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _eager_and_compiled(x: torch.Tensor, w: torch.Tensor, compile_: bool) -> Methods:
    hidden = x.shape[-1]
    methods: Methods = {
        "eager F.rms_norm(x, w)": lambda: F.rms_norm(x, (hidden,), w),
        "eager F.rms_norm(x)": lambda: F.rms_norm(x, (hidden,)),
    }
    fn = compiled(F.rms_norm, compile_)
    if fn is not None:
        fn(x, (hidden,), w)  # compiled before timing
        methods["torch.compile(F.rms_norm)"] = lambda: fn(x, (hidden,), w)
    return methods


def out_group(shapes: Sequence[tuple[int, int]], dtypes: Sequence[str], rounds: int) -> list[Result]:
    results = []
    for name in dtypes:
        for rows, hidden in shapes:
            x, w = _input(rows, hidden, DTYPES[name])
            out = torch.empty_like(x).zero_()
            t = _time({"copy_": lambda: out.copy_(x), "ours": lambda: tgn.normalize_sync(x, w, out=out)},
                      _calls(2 * x.nbytes), rounds)
            results.append(_result(f"out= ({rows}, {hidden}) {name}", t, "ours", "copy_", "out.copy_(x)",
                                   1.1 if name == "fp32" else 1.5))
    return results


def fresh_group(shapes: Sequence[tuple[int, int]], dtypes: Sequence[str], rounds: int,
                compile_: bool) -> list[Result]:
    results = []
    for name in dtypes:
        for rows, hidden in shapes:
            x, w = _input(rows, hidden, DTYPES[name])
            module = tgn.RMSNorm(hidden, dtype=x.dtype)
            with torch.no_grad():
                module.weight.copy_(w)

            def module_call() -> object:
                with torch.no_grad():
                    return module(x)

            base = _eager_and_compiled(x, w, compile_)
            # each face in rounds of its own with the baselines, in the same place of
            # the rounds' orders (with both faces in one set of rounds, the one in the
            # second place ran 10-20% slower, whichever face it was: docs/performance.md)
            for face, label in ((lambda: tgn.normalize_sync(x, w), "normalize_sync"),
                                (module_call, "tgn.RMSNorm, no_grad")):
                t = _time({"ours": face, **base}, _calls(2 * x.nbytes), rounds)
                best = fastest(t, *base)
                results.append(_result(f"fresh {label} ({rows}, {hidden}) {name}", t, "ours", best, best, 1.0))
    return results


def exact_group(shapes: Sequence[tuple[int, int]], rounds: int) -> list[Result]:
    results = []
    for rows, hidden in shapes:
        x, w = _input(rows, hidden, torch.float32)
        out = torch.empty_like(x).zero_()
        target = 1.25 if rows <= 64 else 1.1
        # (the fresh pair and the out= pair in rounds of their own: a fresh 64 MiB
        # output's faults and heap trims would otherwise land beside the out= calls)
        t = _time({
            "float": lambda: tgn.normalize_sync(x, w),
            "exact": lambda: tgn.normalize_sync(x, w, accumulate="exact"),
        }, _calls(2 * x.nbytes), rounds)
        results.append(_result(f"exact forward ({rows}, {hidden}) fp32", t, "exact", "float", "the float forward",
                               target))
        t = _time({
            "float out": lambda: tgn.normalize_sync(x, w, out=out),
            "exact out": lambda: tgn.normalize_sync(x, w, accumulate="exact", out=out),
        }, _calls(2 * x.nbytes), rounds)
        results.append(_result(f"exact forward, out= ({rows}, {hidden}) fp32", t, "exact out", "float out",
                               "the float forward, out=", target))
    return results


def _train_inputs(rows: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    return x, dy, 1 + 0.1 * torch.randn(hidden, generator=g)


def _with_weight(module: torch.nn.Module, w: torch.Tensor) -> torch.nn.Module:
    with torch.no_grad():
        module.weight.copy_(w)  # type: ignore[operator]
    return module


def exact_dw_group(rows_list: Sequence[int], hidden: int, rounds: int) -> list[Result]:
    results = []
    for rows in rows_list:
        x, dy, w = _train_inputs(rows, hidden)
        exact = _with_weight(tgn.RMSNorm(hidden, weight_grad="exact"), w)
        float_ = _with_weight(tgn.RMSNorm(hidden, weight_grad="float"), w)
        xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        t = _time({"exact": train_step(exact, xe, dy), "float": train_step(float_, xf, dy)},
                  _calls(6 * x.nbytes), rounds)
        results.append(_result(f"forward+backward, exact dW ({rows}, {hidden}) fp32", t, "exact", "float",
                               'weight_grad="float"', 1.3))
    return results


def train_group(rows_list: Sequence[int], hidden: int, rounds: int, compile_: bool) -> list[Result]:
    results = []
    for rows in rows_list:
        x, dy, w = _train_inputs(rows, hidden)
        ours = _with_weight(tgn.RMSNorm(hidden), w)
        theirs = _with_weight(torch.nn.RMSNorm(hidden), w)
        xo, xt, xc = (x.clone().requires_grad_() for _ in range(3))
        methods: Methods = {"ours": train_step(ours, xo, dy), "eager torch.nn.RMSNorm": train_step(theirs, xt, dy)}
        fn = compiled(theirs, compile_)
        if fn is not None:
            step = train_step(fn, xc, dy)
            step()  # compiled (forward and backward graphs) before timing
            methods["torch.compile(torch.nn.RMSNorm)"] = step
        t = _time(methods, _calls(6 * x.nbytes), rounds)
        base = "torch.compile(torch.nn.RMSNorm)" if "torch.compile(torch.nn.RMSNorm)" in t else "eager torch.nn.RMSNorm"
        results.append(_result(f"forward+backward ({rows}, {hidden}) fp32", t, "ours", base, base, 0.7))
    return results


def small_group(rounds: int) -> list[Result]:
    x, w = _input(1, 4096, torch.float32)
    base = _eager_and_compiled(x, w, False)
    t = _time({"ours": lambda: tgn.normalize_sync(x, w), **base}, 256, rounds)
    best = fastest(t, *base)
    return [_result("normalize_sync (1, 4096) fp32", t, "ours", best, best, 0.45)]


def run(groups: Sequence[str], rounds: int, quick: bool, echo: bool = True) -> list[Result]:
    big = ((1024, 4096),) if quick else ((1024, 4096), (4096, 4096))
    short = ((8192, 64),) if quick else ((32768, 128), (8192, 64))
    dtypes = ("fp32", "bf16") if quick else tuple(DTYPES)
    compile_ = not quick
    results: list[Result] = []
    for group in groups:
        if group == "out":
            found = out_group(big, dtypes, rounds)
        elif group == "fresh":
            found = fresh_group(big + short, dtypes, rounds, compile_)
        elif group == "exact":
            found = exact_group(((1, 4096), (64, 4096)) + big, rounds)
        elif group == "exact_dw":
            found = exact_dw_group((64, 1024) if quick else (64, 1024, 4096), 4096, rounds)
        elif group == "train":
            found = train_group((64,) if quick else (64, 4096), 4096, rounds, compile_)
        else:
            found = small_group(rounds)
        for r in found:
            if echo:
                print(r.row(), flush=True)
        results.extend(found)
    return results


def median_process(runs: Sequence[Sequence[Result]]) -> tuple[list[Result], dict[str, list[float]]]:
    """Each case's line from the process whose ratio is the median of the processes'
    (the lower middle one for an even count), and every process's ratio per case."""
    ratios: dict[str, list[float]] = {}
    merged = []
    for lines in zip(*runs):
        case = lines[0].case
        if any(r.case != case for r in lines):
            raise ValueError(f"the processes timed different cases: {[r.case for r in lines]}")
        ratios[case] = [r.ours / r.base for r in lines]
        merged.append(sorted(lines, key=lambda r: r.ours / r.base)[(len(lines) - 1) // 2])
    return merged, ratios


def _in_processes(argv: Sequence[str], processes: int) -> list[list[Result]]:
    """This script's run in ``processes`` fresh interpreters, one after the other, each
    with ``argv`` (its progress bars on this terminal): their results."""
    runs = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, __file__, *argv, "--json"], stdout=subprocess.PIPE, text=True,
                              check=True)
        runs.append([Result(**{**fields, "faults": tuple(fields["faults"])})
                     for fields in map(json.loads, done.stdout.splitlines())])
    return runs


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (default 16; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, 3 rounds, no torch.compile")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="groups to run")
    parser.add_argument("--processes", type=int, default=1,
                        help="run in this many fresh processes, one after the other, and take each line "
                             "from the process of the median ratio")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # (a worker of --processes)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 16)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.json:
        results = run(args.only, rounds, args.quick, echo=False)
        for r in results:
            print(json.dumps(dataclasses.asdict(r)), flush=True)
        return results
    print(f"# issue 22 targets: torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load {os.getloadavg()[0]:.1f}, "
          f"median of {rounds} interleaved rounds"
          + (f", each line from the median of {args.processes} processes" if args.processes > 1 else "")
          + f"; {tgn.backends.native.loader.describe()}")
    print(TARGET_HEADER)
    ratios: dict[str, list[float]] = {}
    if args.processes > 1:
        worker = ["--rounds", str(rounds), "--only", *args.only, *(["--quick"] if args.quick else [])]
        results, ratios = median_process(_in_processes(worker, args.processes))
        for r in results:
            print(r.row())
    else:
        results = run(args.only, rounds, args.quick)
    judged = [r for r in results if r.met is not None]
    print(f"\n{sum(bool(r.met) for r in judged)} of {len(judged)} targets met")
    faulted = [r for r in results if max(r.faults) >= NOTED_FAULTS]
    if faulted:
        print("\nMinor page faults per timed call (the C allocator gave a freed block back to the OS and "
              "the next call faulted it in again: docs/performance.md, \"Page faults\"):")
        for r in faulted:
            print(f"- {r.case}: ours {r.faults[0]:.0f}, {r.baseline} {r.faults[1]:.0f}")
    if ratios:
        print("\nEach process's ratio (in the order they ran):")
        for case, found in ratios.items():
            print(f"- {case}: " + ", ".join(f"{v:.2f}x" for v in found))
    return results


if __name__ == "__main__":
    main()
