"""First-call cost against the node count: build, prove, lower and the first run.

For every hidden size D, topology and accumulation, a fresh Python process
(so no cache of graph, proof or plan survives) times, with ``chunk_size=1``
(one leaf per element, the most nodes a D can have) and ``leaf="pairwise"``:

* build:  ``tgn.build_graph`` (construction and ``validate``);
* prove:  ``tgn.prove`` (reading, rules, fingerprint; never the witness search);
* lower:  ``lower(graph, fingerprint)`` for a certified graph (else skipped);
* run:    the first ``tgn.normalize_sync`` on a ``(2, D)`` input, which finds the
          proof and plan cached and runs the executor ``auto`` picks (a float
          ``race`` over 3+ chunks is refuted, so it runs on the reference).

The first three run under one pause of Python's cyclic collector, as a first call
makes them (``pipeline.for_config``); its one collection afterwards falls in ``run``.

The sum is what a first call costs (wall time).  ``us/node`` is that sum over
the node count: near-constant across D is what near-linear means, and the
``x4`` column gives the ratio to the row with a quarter of the nodes (4 for
linear cost).  ``cpu`` is the process's CPU time for the four steps: on a
shared machine it is the steadier figure.

Run:  python benchmarks/prover_scale.py [--full] [--sizes 4096 16384 65536]
      [--topologies linear tree race cat standard] [--timeout 600]
``--full`` adds D = 2**20 (about a minute per row on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = (4096, 16384, 65536)
FULL = 1 << 20
TOPOLOGIES = ("linear", "tree", "race", "cat", "standard")


def measure(hidden: int, topology: str, accumulate: str) -> dict[str, object]:
    """One configuration, timed in this (fresh) process."""
    import torch

    import taskgraph_norm as tgn
    from taskgraph_norm.errors import GraphError
    from taskgraph_norm import pipeline
    from taskgraph_norm.lowering import lower
    from taskgraph_norm.graph.nodes import gc_paused

    options = dict(chunk_size=1, topology=topology, leaf="pairwise", accumulate=accumulate)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(0))
    cpu0 = time.process_time()
    with gc_paused():  # as the first call pauses the collector once (pipeline.for_config)
        t0 = time.perf_counter()
        graph = tgn.build_graph(hidden, **options)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        proof = tgn.prove(graph)
        t2 = time.perf_counter()
        if proof.certified:
            try:
                lower(graph, proof.fingerprint)
            except GraphError:
                pass
        t3 = time.perf_counter()
    tgn.normalize_sync(x, **options)  # type: ignore[arg-type]
    t4 = time.perf_counter()
    cpu = time.process_time() - cpu0
    return {
        "nodes": len(graph), "rule": proof.rule,
        "executor": pipeline.for_config(hidden, 1, topology, "pairwise", accumulate, "auto").executor,
        "build": t1 - t0, "prove": t2 - t1, "lower": t3 - t2, "run": t4 - t3, "cpu": cpu,
    }


def child(hidden: int, topology: str, accumulate: str, timeout: float) -> dict[str, object] | None:
    """Run :func:`measure` in a fresh interpreter; None if it ran past ``timeout``."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); import prover_scale as p; "
        f"print(json.dumps(p.measure({hidden}, {topology!r}, {accumulate!r})))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also D = 2**20")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    parser.add_argument("--accumulate", nargs="+", default=["float", "exact"])
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    sizes = sorted(set(args.sizes) | ({FULL} if args.full else set()))
    print(f"{'D':>8} {'topology':<9} {'acc':<6} {'nodes':>8} {'rule':<9} {'executor':<10} "
          f"{'build':>7} {'prove':>7} {'lower':>7} {'run':>7} {'total':>7} {'us/node':>8} "
          f"{'x4':>5} {'cpu':>7}")
    previous: dict[tuple[str, str], tuple[int, float]] = {}
    for topology in args.topologies:
        for accumulate in args.accumulate:
            if topology == "standard" and accumulate != "float":
                continue
            for hidden in sizes:
                row = child(hidden, topology, accumulate, args.timeout)
                if row is None:
                    print(f"{hidden:>8} {topology:<9} {accumulate:<6} timed out after "
                          f"{args.timeout:.0f} s", flush=True)
                    continue
                parts = [float(row[k]) for k in ("build", "prove", "lower", "run")]  # type: ignore[arg-type]
                total = sum(parts)
                nodes = int(row["nodes"])  # type: ignore[call-overload]
                key = (topology, accumulate)
                last_d, last_total = previous.get(key, (0, 0.0))
                ratio = f"{total / last_total:5.1f}" if hidden == 4 * last_d else ""
                previous[key] = (hidden, total)
                print(f"{hidden:>8} {topology:<9} {accumulate:<6} {nodes:>8} {row['rule']!s:<9} "
                      f"{row['executor']!s:<10} "
                      + " ".join(f"{p:7.2f}" for p in parts)
                      + f" {total:7.2f} {1e6 * total / nodes:8.2f} {ratio:>5}"
                      + f" {float(row.get('cpu', 0.0)):7.2f}", flush=True)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
