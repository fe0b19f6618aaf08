"""Tensor-parallel RMSNorm: time and bytes per call against the naive all-reduce.

    python benchmarks/distributed.py [--worlds 2,4] [--shapes 1x4096,64x4096,64x1000]
                                     [--repeats 30] [--dtype float32]
    python benchmarks/distributed.py --matrix [--worlds 1,2,3,4]

``--matrix`` prints instead the world-size invariance matrix: for each world size,
dtype, certified configuration and hidden size (even shards), whether the gathered
result has the single-process bits, and the same for the naive all-reduce.

Spawns a gloo group over loopback per world size (CPU, one torch thread per rank)
and times, on every rank, back-to-back calls of:

* ``naive``: local ``torch.sum`` of squares + ``all_reduce(SUM)`` of one fp32 per row;
* ``ours float`` (``topology="tree"``), with the shard sizes known (the module's
  steady state: one all-gather) and without (one more all-gather of 6 int64 per rank);
* ``ours exact`` (MAX then SUM all-reduce of fp64).

Bytes are what one rank hands to the collectives per call (buffer sizes); on a ring,
an all-gather of ``b`` bytes per rank makes each rank send ``(W-1) * b``, an
all-reduce of ``b`` bytes about ``2 (W-1)/W * b``.  The "= 1 proc" column says
whether the gathered result has the bits of single-process ``normalize_sync``.
Timings on a shared 2-core machine are indicative only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import taskgraph_norm as tgn  # noqa: E402
from taskgraph_norm.distributed import even_shard_sizes, payload_bytes_per_row, shard_offsets  # noqa: E402
from taskgraph_norm import kernels  # noqa: E402
from taskgraph_norm.testing import bits_equal  # noqa: E402


def _input(rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 7919 + hidden)
    spread = torch.exp2(torch.randint(-14, 14, (rows, hidden), generator=g).float())
    return (torch.randn(rows, hidden, generator=g) * spread).to(dtype)


def _variants(hidden: int, sizes: tuple[int, ...]) -> dict[str, Any]:
    def ours(**kw: Any) -> Any:
        return lambda x, w: tgn.distributed.normalize_sync(x, w, hidden_size=hidden, **kw)
    return {
        "naive all_reduce": lambda x, w: tgn.distributed.naive_normalize_sync(
            x, w, hidden_size=hidden),
        "ours float, sizes known": ours(shard_sizes=sizes),
        "ours float": ours(),
        "ours exact, sizes known": ours(accumulate="exact", shard_sizes=sizes),
    }


def bench_rank(rank: int, world: int, shapes: list[tuple[int, int]], repeats: int,
               dtype_name: str) -> dict[str, Any]:
    dtype = getattr(torch, dtype_name)
    out: dict[str, Any] = {}
    for rows, hidden in shapes:
        sizes = even_shard_sizes(hidden, world)
        start = shard_offsets(sizes)[rank]
        x = _input(rows, hidden, dtype)[:, start:start + sizes[rank]].contiguous()
        for name, fn in _variants(hidden, sizes).items():
            y = fn(x, None)
            for _ in range(2):
                fn(x, None)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn(x, None)
            out[(rows, hidden, name)] = ((time.perf_counter() - t0) / repeats, y)
    return out


MATRIX_CONFIGS = [("tree", "pairwise", "float"), ("linear", "pairwise", "float"),
                  ("cat", "pairwise", "float"), ("tree", "native", "float"),
                  ("tree", "pairwise", "exact"), ("race", "pairwise", "exact")]
MATRIX_HIDDEN = (97, 256, 1000, 4096)
MATRIX_DTYPES = ("float32", "bfloat16")


def matrix_rank(rank: int, world: int, rows: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for dtype_name in MATRIX_DTYPES:
        for hidden in MATRIX_HIDDEN:
            sizes = even_shard_sizes(hidden, world)
            start = shard_offsets(sizes)[rank]
            x = _input(rows, hidden, getattr(torch, dtype_name))[:, start:start + sizes[rank]]
            out[(dtype_name, hidden, "naive")] = tgn.distributed.naive_normalize_sync(
                x, hidden_size=hidden)
            for topology, leaf, accumulate in MATRIX_CONFIGS:
                out[(dtype_name, hidden, topology, leaf, accumulate)] = (
                    tgn.distributed.normalize_sync(x, hidden_size=hidden, topology=topology,
                                                   leaf=leaf, accumulate=accumulate))
    return out


def _rows_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return int((a.view(view) != b.view(view)).any(-1).sum())


def print_matrix(worlds: list[int], rows: int) -> None:
    print(f"gloo over loopback, {rows} rows per input with an exponent spread of 2^+-14, "
          "even shards; 'same' = bit-identical to single-process normalize_sync with the "
          "same options.  Naive on 1 process = torch.sum over the whole row, the "
          "non-parallel model's bits.\n")
    print("| W | dtype | D | " + " | ".join("/".join(c) for c in MATRIX_CONFIGS)
          + " | naive: rows differing from naive on 1 process | naive: rows differing "
          "from tree |")
    print("|---|---|---|" + "---|" * (len(MATRIX_CONFIGS) + 2))
    for world in worlds:
        results = tgn.distributed.run_local(matrix_rank, world, rows, timeout=600)
        for dtype_name in MATRIX_DTYPES:
            for hidden in MATRIX_HIDDEN:
                x = _input(rows, hidden, getattr(torch, dtype_name))
                cells = []
                for topology, leaf, accumulate in MATRIX_CONFIGS:
                    key = (dtype_name, hidden, topology, leaf, accumulate)
                    got = torch.cat([r[key] for r in results], dim=-1)
                    want = tgn.normalize_sync(x, topology=topology, leaf=leaf,
                                              accumulate=accumulate)
                    cells.append("same" if bits_equal(got, want) else "DIFFERENT")
                naive = torch.cat([r[(dtype_name, hidden, "naive")] for r in results], dim=-1)
                one_process = kernels.finalize(x, kernels.sumsq_native(x, 0, hidden), hidden,
                                               kernels.default_eps(x.dtype), None)
                cells.append(f"{_rows_differing(naive, one_process)}/{rows}")
                cells.append(f"{_rows_differing(naive, tgn.normalize_sync(x))}/{rows}")
                print(f"| {world} | {dtype_name} | {hidden} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--shapes", default="1x4096,64x4096,64x1000")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--matrix", action="store_true")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    if args.matrix:
        print_matrix([int(w) for w in args.worlds.split(",")], args.rows)
        return
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    dtype = getattr(torch, args.dtype)
    print(f"gloo over loopback, {args.dtype}, tree topology, chunk_size 64, mean of "
          f"{args.repeats} calls (slowest rank), torch {torch.__version__}\n")
    print("| W | rows x D | variant | us/call | bytes/call/rank | ring bytes sent/rank "
          "| = 1 proc |")
    print("|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        results = tgn.distributed.run_local(bench_rank, world, shapes, args.repeats,
                                            args.dtype, timeout=600)
        for rows, hidden in shapes:
            sizes = even_shard_sizes(hidden, world)
            expected = tgn.normalize_sync(_input(rows, hidden, dtype), None)
            expected_exact = tgn.normalize_sync(_input(rows, hidden, dtype), None,
                                                accumulate="exact")
            for name in _variants(hidden, sizes):
                key = (rows, hidden, name)
                seconds = max(r[key][0] for r in results)
                y = torch.cat([r[key][1] for r in results], dim=-1)
                same = bits_equal(y, expected_exact if "exact" in name else expected)
                sent, ring = _bytes(name, rows, hidden, sizes, dtype, world)
                print(f"| {world} | {rows}x{hidden} | {name} | {seconds * 1e6:.0f} | {sent} "
                      f"| {ring} | {'yes' if same else 'NO'} |")


def _bytes(name: str, rows: int, hidden: int, sizes: tuple[int, ...], dtype: torch.dtype,
           world: int) -> tuple[int, int]:
    meta = 0 if "known" in name or "naive" in name else 6 * 8
    if "naive" in name:
        buffer = 4 * rows
        return buffer, round(2 * (world - 1) / world * buffer)
    if "exact" in name:
        buffer = 24 * rows
        return buffer, round(2 * (world - 1) / world * buffer)
    buffer = payload_bytes_per_row(hidden, sizes, dtype=dtype) * rows + meta
    return buffer, (world - 1) * buffer


if __name__ == "__main__":
    main()
