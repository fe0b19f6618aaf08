"""The ``taskgraph-norm`` command line.  Each subcommand is one ``_cmd_*`` function
registered in :func:`build_parser`; the work itself lives in library modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.lower().replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4x256x4096, got {text!r}") from None
    if not dims or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"shape must be non-negative integers, got {text!r}")
    return dims


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except options with none (``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportConfig, run_report

    config = ReportConfig(
        shape=args.shape, dtype=args.dtype, seed=args.seed, chunk_size=args.chunk_size,
        leaf=args.leaf, repeats=args.repeats, norm=args.norm,
    )
    rows, text = run_report(config, stream=sys.stdout)
    if args.out is not None:
        from .report_files import write_report_dir

        for path in write_report_dir(config, text, args.out):
            print(f"wrote {path}")
    return 0 if all(r.agrees for r in rows) else 1


def _cmd_prove(args: argparse.Namespace) -> int:
    from ..prover import prove
    from ..topologies import build_graph

    graph = build_graph(
        args.hidden_size, chunk_size=args.chunk_size, topology=args.topology,
        leaf=args.leaf, accumulate=args.accumulate,
    )
    proof = prove(graph, witness_dtype=args.dtype)
    print(proof.explain(full=args.full))
    return 0 if proof.certified else 1


def _cmd_viz(args: argparse.Namespace) -> int:
    from ..topologies import build_graph
    from ..viz import render

    graph = build_graph(
        args.hidden_size, chunk_size=args.chunk_size, topology=args.topology,
        leaf=args.leaf, accumulate=args.accumulate,
    )
    if args.timeline:
        from .report import traced_run
        from ..viz import render_timeline

        trace = traced_run(graph, rows=args.rows, max_workers=args.workers, schedule=args.schedule)
        written = render_timeline(
            trace, args.output, graph,
            title=f"{args.topology} D={args.hidden_size} chunk={args.chunk_size}: "
            f"{args.rows} rows, {args.schedule} schedule, {len(trace.workers)} workers",
        )
        if args.chrome:
            trace.to_chrome(args.chrome)
            print(f"wrote {args.chrome}")
        print(f"wrote {written}")
        return 0
    proof = None
    if args.prove:
        from ..prover import prove

        proof = prove(graph)
    collapse = {"auto": None, "always": True, "never": False}[args.collapse]
    written = render(graph, args.output, proof, engine=args.engine, collapse=collapse)
    print(f"wrote {written}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import BenchConfig, run_bench

    config = BenchConfig(out_dir=Path(args.out), rounds=args.rounds,
                         torch_compile=not args.no_torch_compile, memory=not args.no_memory,
                         native=not args.torch_ops)
    if args.quick:
        config = BenchConfig(shapes=((1024, 4096),), batches=(1, 64, 1024), rounds=min(args.rounds, 3),
                             out_dir=config.out_dir, torch_compile=config.torch_compile,
                             memory=config.memory, native=config.native)
    run_bench(config, stream=sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskgraph-norm", formatter_class=_HelpFormatter,
        description="RMSNorm as an explicit merge DAG: run, prove and compare reduction orders.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = sub.add_parser(
        "report", formatter_class=_HelpFormatter, help="run every row of the original report and print one table",
        description="Run every RMSNorm system of the original report (or, with --norm layer, "
        "LayerNorm's rows) on one input and print time, run-to-run and batch-size invariance, "
        "and accuracy.",
    )
    report.add_argument("--norm", choices=("rms", "layer"), default="rms",
                        help="which norm's rows: RMSNorm's (the original report) or LayerNorm's")
    report.add_argument("--shape", type=_shape, default="4x256x4096",
                        help="input shape; the last dimension is normalised")
    report.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                        default="float32", help="input dtype")
    report.add_argument("--seed", type=int, default=0, help="seed of the random input and weight")
    report.add_argument("--chunk-size", type=int, default=64, help="elements per leaf chunk")
    report.add_argument("--out", metavar="DIR",
                        help="also write DIR/report.md with the table, merge-DAG pictures and a "
                        "timeline of the race row's run")
    report.add_argument("--leaf", choices=("pairwise", "native"), default="pairwise",
                        help="how each chunk is summed (pairwise: a fixed halving order)")
    report.add_argument("--repeats", type=_positive_int, default=40,
                        help="interleaved rounds (each runs every row once, timed and compared)")
    report.set_defaults(func=_cmd_report)

    prove = sub.add_parser(
        "prove", formatter_class=_HelpFormatter, help="certify or refute that a merge DAG gives the same bits every time",
        description="Build one merge DAG and prove, from its structure, whether it is "
        "deterministic and batch-invariant.  Exit status 0: certified (deterministic and "
        "batch-invariant); 1: refuted or not certified.  A refutation prints a replay command.",
    )
    prove.add_argument("--topology", choices=("standard", "linear", "tree", "race", "cat"),
                       default="tree", help="how the chunk partials are merged")
    prove.add_argument("--hidden-size", type=int, required=True, help="D, the row length")
    prove.add_argument("--chunk-size", type=int, default=64, help="elements per leaf chunk")
    prove.add_argument("--leaf", choices=("pairwise", "native"), default="pairwise",
                       help="how each chunk is summed")
    prove.add_argument("--accumulate", choices=("float", "exact"), default="float",
                       help="float sums, or exact (order-free) sums")
    prove.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                       default="float32", help="input dtype of a counterexample")
    prove.add_argument("--full", action="store_true",
                       help="print the whole expression (long graphs are shortened otherwise)")
    prove.set_defaults(func=_cmd_prove)

    from ..topologies import ACCUMULATES, LEAVES, TOPOLOGIES

    viz = sub.add_parser(
        "viz", formatter_class=_HelpFormatter, help="draw a merge DAG (.svg, .png, .dot or .mmd by the output's extension)",
        description="Draw the merge DAG of one configuration.  Node colours tell leaves, "
        "ordered merges, races and exact-domain nodes apart; edge labels give operand order.",
    )
    viz.add_argument("--topology", choices=TOPOLOGIES, default="tree",
                     help="how the chunk partials are merged")
    viz.add_argument("--hidden-size", type=int, required=True, help="D, the normalised length")
    viz.add_argument("--chunk-size", type=int, default=64, help="elements per leaf chunk")
    viz.add_argument("--leaf", choices=LEAVES, default="pairwise", help="how each chunk is summed")
    viz.add_argument("--accumulate", choices=ACCUMULATES, default="float",
                     help="float sums, or exact (order-free) sums")
    viz.add_argument("--engine", choices=("auto", "graphviz", "matplotlib"), default="auto",
                     help="picture back end (auto: Graphviz if installed, else matplotlib)")
    viz.add_argument("--collapse", choices=("auto", "always", "never"), default="auto",
                     help="per-level summary boxes (auto: above 32 chunks)")
    viz.add_argument("--prove", action="store_true",
                     help="prove the graph and show the verdict, rule and fingerprint in the "
                     "caption; a refuted race node is drawn red")
    viz.add_argument("--timeline", action="store_true",
                     help="run the graph once on the concurrent executor and draw its trace as a "
                     "timeline (.svg or .png) instead of the DAG")
    viz.add_argument("--rows", type=_positive_int, default=64, help="rows of the --timeline input")
    viz.add_argument("--workers", type=_positive_int, default=2, help="worker threads for --timeline")
    viz.add_argument("--schedule", choices=("fifo", "random"), default="fifo",
                     help="schedule policy for --timeline (random: unseeded)")
    viz.add_argument("--chrome", metavar="PATH", help="with --timeline: also write Chrome trace JSON")
    viz.add_argument("-o", "--output", required=True, help="e.g. dag.svg, dag.png, dag.dot, dag.mmd")
    viz.set_defaults(func=_cmd_viz)

    bench = sub.add_parser(
        "bench", formatter_class=_HelpFormatter, help="time the compiled executor against torch's kernels; table and plot",
        description="Time the compiled executor against eager and torch.compile'd F.rms_norm "
        "and the copy_ bandwidth floor, in one run; write bench.md and bench.png.",
    )
    bench.add_argument("--out", default="bench-results", help="output folder")
    bench.add_argument("--rounds", type=_positive_int, default=7, help="timed rounds")
    bench.add_argument("--quick", action="store_true", help="one small shape, 3 rounds")
    bench.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (slow to build)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bench.add_argument("--torch-ops", action="store_true",
                       help="run the compiled executor on its torch ops, not its native kernels "
                       "(what a machine with no C compiler gets)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..errors import TaskGraphError

    try:
        return int(args.func(args))
    except TaskGraphError as exc:
        print(f"taskgraph-norm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
