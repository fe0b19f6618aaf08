"""Before/after timings of two versions of taskgraph_norm, interleaved in one run.

    python benchmarks/versions.py --old REV_OR_DIR --new REV_OR_DIR [--rounds 15] [--runs 1]
                                  [--suite small_calls|training_step|exact_dw|both] [--tolerance 0.05]

One Python process cannot import two versions of a package, so each version gets
its own persistent worker process (``version_worker.py``) with ``PYTHONPATH`` at
its tree, ``OMP_WAIT_POLICY=PASSIVE`` (unless set) and the same torch thread count;
each imports ``taskgraph_norm`` from its tree (it checks where the import came
from) and the cases of ``version_cases.py`` from the new tree's ``benchmarks/``
(from this folder when the new tree has none): the figures of ``small_calls.py``
and ``training_step.py`` for this library, through the public API both versions
share.  A git rev (not a directory) is checked out in a temporary ``git worktree``
of this repository, its kernels built in place (``setup.py build_ext --inplace``),
and removed at the end; a directory is used as it is, so build its kernels first.

Each round asks both workers for one timing of every case, the two timings of a
case back to back (old first in even rounds, new first in odd ones; the case order
rotates from round to round); the idle worker waits on a pipe and takes no CPU.
The table gives each case's median over rounds per version, new / old, the middle
half of the per-round ratios (the two timings of a round saw the same load, so
their spread is the round-to-round noise) and whether new / old is within the
tolerance of 1.  A process can also be faster or slower than its twin for all its
life (on a 2-core VM the worker started second was often 5-10% faster on the
large cases), which no number of rounds averages out: ``--runs N`` starts a fresh
pair of workers N times, which one starts first alternating (an even N balances
it), prints each run's table, and then one over all runs' rounds with each run's
new / old beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = ["VersionsError", "Options", "Tree", "Comparison", "Worker", "parse_args", "checkout", "run_rounds",
           "compare", "pooled", "table", "runs_table", "summary", "run", "main"]

HERE = Path(__file__).resolve().parent
SUITES = ("small_calls", "training_step", "exact_dw", "both")
Timings = dict[str, list[float]]


def _load_progress_bar() -> Any:
    """``taskgraph_norm.tools.progress.progress_bar`` of this checkout, loaded from its
    file: this process imports no version of the package (each worker imports its
    own), and that module needs only tqdm."""
    spec = importlib.util.spec_from_file_location(
        "_tgn_progress", HERE.parent / "taskgraph_norm" / "tools" / "progress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.progress_bar


progress_bar = _load_progress_bar()


class VersionsError(Exception):
    """A tree, a build or a worker that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Options:
    old: str
    new: str
    rounds: int
    suite: str
    tolerance: float
    threads: int
    runs: int = 1


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the version before: a directory or a git rev")
    parser.add_argument("--new", required=True, help="the version after: a directory or a git rev")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per run (default 15)")
    parser.add_argument("--runs", type=int, default=1, help="runs, each with a fresh pair of workers (default 1)")
    parser.add_argument("--suite", choices=SUITES, default="both", help="which script's figures (default both)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest |new / old - 1| that counts as unchanged (default 0.05)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in both workers (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        parser.error("--rounds and --runs must be at least 1")
    if not 0 < args.tolerance < 1:
        parser.error("--tolerance must be between 0 and 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's choice) or more")
    return Options(args.old, args.new, args.rounds, args.suite, args.tolerance, args.threads, args.runs)


# -- the two trees -------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A checkout of the project: ``path`` holds ``taskgraph_norm/``; ``label`` says what it is."""

    path: Path
    label: str


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise VersionsError(f"git {' '.join(args)} in {repo}: {done.stderr.strip()}")
    return done.stdout.strip()


def _describe_dir(path: Path) -> str:
    try:
        head = _git(path, "rev-parse", "--short", "HEAD")
        dirty = _git(path, "status", "--porcelain", "--untracked-files=no")
    except VersionsError:
        return f"{path} (not a git checkout)"
    return f"{path} (HEAD {head}{', with uncommitted changes' if dirty else ''})"


def _build_kernels(path: Path) -> None:
    print(f"building the kernels in {path} ...", file=sys.stderr)
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path,
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise VersionsError(f"setup.py build_ext --inplace failed in {path}:\n{tail}")


@contextmanager
def checkout(spec: str, repo: Path) -> Iterator[Tree]:
    """``spec`` as a tree: a directory as it is; a git rev of ``repo`` as a temporary
    worktree with its kernels built, removed on exit."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "taskgraph_norm" / "__init__.py").is_file():
            raise VersionsError(f"{path} has no taskgraph_norm/__init__.py: not a checkout of this project")
        yield Tree(path.resolve(), _describe_dir(path.resolve()))
        return
    found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"],
                           capture_output=True, text=True)
    commit = found.stdout.strip()
    if found.returncode != 0 or not commit:
        raise VersionsError(f"{spec!r} is neither a directory nor a git rev of {repo}")
    scratch = Path(tempfile.mkdtemp(prefix="tgn-versions-"))
    tree = scratch / commit[:12]
    try:
        _git(repo, "worktree", "add", "--detach", str(tree), commit)
        _build_kernels(tree)
        yield Tree(tree, f"git rev {spec} ({commit[:12]}), built in {tree}")
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)


# -- the workers ---------------------------------------------------------------------


class Timer(Protocol):
    def time(self, case: str) -> float: ...


class Worker:
    """One version's ``version_worker.py`` process: ``time(case)`` is one timing, in
    seconds per call; ``hello`` is what it said about itself when it was ready."""

    def __init__(self, role: str, tree: Tree, bench_dir: Path, suite: str, threads: int) -> None:
        self.role = role
        env = dict(os.environ, PYTHONPATH=str(tree.path))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's threads spin otherwise: training_step.py
        command = [sys.executable, "-u", str(bench_dir / "version_worker.py"), "--tree", str(tree.path),
                   "--suite", suite, "--threads", str(threads)]
        self._process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)
        self.hello: dict[str, Any] = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise VersionsError(f"the {self.role} worker stopped (exit code {code}); its stderr is above")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def time(self, case: str) -> float:
        stdin: IO[str] | None = self._process.stdin
        assert stdin is not None
        stdin.write(json.dumps({"case": case}) + "\n")
        stdin.flush()
        return float(self._reply()["seconds"])

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# -- rounds and the table (no processes: the tests drive these with fakes) ------------


def run_rounds(old: Timer, new: Timer, cases: Sequence[str], rounds: int,
               label: str = "rounds") -> tuple[Timings, Timings]:
    """Per-call seconds of every case, one list per version in round order.  In
    round ``r`` the case order starts at case ``r % len(cases)``, and each case is
    timed by both versions back to back, old first when ``r`` is even.  A terminal
    on stderr shows a bar over the rounds, named ``label``."""
    times: tuple[Timings, Timings] = ({c: [] for c in cases}, {c: [] for c in cases})
    order = list(cases)
    rounds = rounds if order else 0
    with progress_bar(rounds, label, unit="round") as bar:
        for r in range(rounds):
            k = r % len(order)
            pair = ((0, old), (1, new)) if r % 2 == 0 else ((1, new), (0, old))
            for case in order[k:] + order[:k]:
                for side, timer in pair:
                    times[side][case].append(timer.time(case))
            bar.update()
    return times


@dataclass(frozen=True)
class Comparison:
    """One case: median seconds per call of each version and the per-round ratios."""

    case: str
    calls: int
    old_s: float
    new_s: float
    round_ratios: tuple[float, ...]

    @property
    def ratio(self) -> float:
        return self.new_s / self.old_s

    def verdict(self, tolerance: float) -> str:
        if abs(self.ratio - 1) <= tolerance:
            return "yes"
        return "no, slower" if self.ratio > 1 else "no, faster"

    def middle_half(self) -> tuple[float, float]:
        """The 25th and 75th percentiles of the per-round ratios."""
        if len(self.round_ratios) < 2:
            return self.round_ratios[0], self.round_ratios[0]
        q1, _, q3 = statistics.quantiles(self.round_ratios, n=4, method="inclusive")
        return q1, q3


def compare(old: Timings, new: Timings, calls: dict[str, int]) -> list[Comparison]:
    """A :class:`Comparison` per case of ``old``, in its order (``new`` has the same cases)."""
    return [Comparison(case, calls[case], statistics.median(old[case]), statistics.median(new[case]),
                       tuple(n / o for o, n in zip(old[case], new[case], strict=True)))
            for case in old]


def table(rows: Sequence[Comparison], tolerance: float) -> str:
    lines = [f"| case | calls per timing | old us | new us | new / old | per-round new / old, middle half "
             f"| within {tolerance:.0%} |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        q1, q3 = row.middle_half()
        lines.append(f"| {row.case} | {row.calls} | {row.old_s * 1e6:.1f} | {row.new_s * 1e6:.1f} "
                     f"| {row.ratio:.3f} | {q1:.3f} - {q3:.3f} | {row.verdict(tolerance)} |")
    return "\n".join(lines)


def pooled(runs: Sequence[tuple[Timings, Timings]]) -> tuple[Timings, Timings]:
    """Every run's rounds of each case in one list per version."""
    old: Timings = {}
    new: Timings = {}
    for run_old, run_new in runs:
        for case in run_old:
            old.setdefault(case, []).extend(run_old[case])
            new.setdefault(case, []).extend(run_new[case])
    return old, new


def runs_table(rows: Sequence[Comparison], per_run: Sequence[Sequence[Comparison]], tolerance: float) -> str:
    """``rows`` (over all runs' rounds) with each run's new / old of the same case beside them."""
    ratios = {row.case: [r.ratio for run in per_run for r in run if r.case == row.case] for row in rows}
    lines = [f"| case | old us | new us | new / old, all rounds | new / old of each run | within {tolerance:.0%} |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        each = ", ".join(f"{x:.3f}" for x in ratios[row.case])
        lines.append(f"| {row.case} | {row.old_s * 1e6:.1f} | {row.new_s * 1e6:.1f} | {row.ratio:.3f} | {each} "
                     f"| {row.verdict(tolerance)} |")
    return "\n".join(lines)


def summary(rows: Sequence[Comparison], tolerance: float) -> str:
    within = [r for r in rows if r.verdict(tolerance) == "yes"]
    ratios = [r.ratio for r in rows]
    text = (f"{len(within)} of {len(rows)} cases within {tolerance:.0%}; new / old from {min(ratios):.3f} "
            f"to {max(ratios):.3f}")
    for word in ("slower", "faster"):
        outside = [f"{r.case} ({r.ratio:.3f})" for r in rows if r.verdict(tolerance) == f"no, {word}"]
        if outside:
            text += f"; {word}: " + ", ".join(outside)
    return text


# -- the run ---------------------------------------------------------------------------


def _bench_dir(new: Tree) -> Path:
    """The new tree's benchmark code where it has the worker, else this folder's."""
    candidate = new.path / "benchmarks"
    return candidate if (candidate / "version_worker.py").is_file() else HERE


def _header(workers: Sequence[Worker], bench_dir: Path, trees: Sequence[Tree], rounds: int) -> str:
    lines = [f"{w.role}: {t.label}\n    package {w.hello['package']}; torch {w.hello['torch']}, "
             f"{w.hello['threads']} threads, OMP_WAIT_POLICY {w.hello['omp_wait_policy']}; {w.hello['kernels']}"
             for w, t in zip(workers, trees, strict=True)]
    lines.append(f"cases from {bench_dir}/version_cases.py; median of {rounds} interleaved rounds; "
                 f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return "\n".join(lines)


def _check_alike(old: Worker, new: Worker) -> None:
    for key in ("torch", "threads", "cases"):
        if old.hello[key] != new.hello[key]:
            raise VersionsError(f"the two workers differ in {key}: old {old.hello[key]}, new {new.hello[key]}")


def _one_run(trees: Sequence[Tree], bench_dir: Path, options: Options, index: int
             ) -> tuple[list[Worker], dict[str, int], Timings, Timings]:
    """A fresh pair of workers (the first run starts old's first, the next new's...),
    their hellos, and their timings."""
    with ExitStack() as stack:
        roles = [("old", trees[0]), ("new", trees[1])]
        workers: dict[str, Worker] = {}
        for role, tree in roles if index % 2 == 0 else roles[::-1]:
            workers[role] = Worker(role, tree, bench_dir, options.suite, options.threads)
            stack.callback(workers[role].close)
        _check_alike(workers["old"], workers["new"])
        calls = {name: n for name, n in workers["old"].hello["cases"]}
        label = f"run {index + 1}/{options.runs}" if options.runs > 1 else "rounds"
        old, new = run_rounds(workers["old"], workers["new"], list(calls), options.rounds, label)
        return [workers["old"], workers["new"]], calls, old, new


def run(options: Options, repo: Path = HERE.parent) -> str:
    """Check out, start, time and compare; the report as text."""
    with ExitStack() as stack:
        trees = [stack.enter_context(checkout(spec, repo)) for spec in (options.old, options.new)]
        bench_dir = _bench_dir(trees[1])
        parts: list[str] = []
        timings: list[tuple[Timings, Timings]] = []
        per_run: list[list[Comparison]] = []
        for index in range(options.runs):
            workers, calls, old, new = _one_run(trees, bench_dir, options, index)
            if not parts:
                parts.append(_header(workers, bench_dir, trees, options.rounds))
            timings.append((old, new))
            per_run.append(compare(old, new, calls))
            title = f"run {index + 1} of {options.runs}\n\n" if options.runs > 1 else ""
            parts += [title + table(per_run[-1], options.tolerance), summary(per_run[-1], options.tolerance)]
        if options.runs > 1:
            rows = compare(*pooled(timings), calls)
            parts += [f"all {options.runs} runs\n\n" + runs_table(rows, per_run, options.tolerance),
                      summary(rows, options.tolerance)]
        return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    try:
        print(run(options))
    except VersionsError as exc:
        raise SystemExit(f"versions.py: {exc}") from None


if __name__ == "__main__":
    main()
