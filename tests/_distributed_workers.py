"""Rank functions for tests/test_distributed.py, run in spawned processes by run_local.

They live in their own module so that a spawned rank imports only this (and the
library), never the test module and its fixtures.  Every function takes
``(rank, world_size, ...)`` and returns something torch.save can write.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import anyio
import torch

import taskgraph_norm as tgn
from taskgraph_norm.distributed import shard_offsets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: (dtype, hidden_size, shard_sizes or None for even, topology, leaf, accumulate, chunk_size)
Case = tuple[str, int, "tuple[int, ...] | None", str, str, str, int]


def make_input(seed: int, rows: int, hidden: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with a wide exponent spread (so rounding order shows), and a weight."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-14, 14, (rows, hidden), generator=g).double())
    x = (torch.randn(rows, hidden, generator=g, dtype=torch.float64) * scale).to(DTYPES[dtype])
    w = (torch.rand(hidden, generator=g, dtype=torch.float64) + 0.5).to(DTYPES[dtype])
    return x, w


def case_sizes(case: Case, world: int) -> tuple[int, ...]:
    sizes = case[2]
    return tuple(sizes) if sizes is not None else tgn.distributed.even_shard_sizes(case[1], world)


def shard(t: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = shard_offsets(sizes)[rank]
    return t[..., start:start + sizes[rank]]


def run_matrix(rank: int, world: int, cases: list[Case], rows: int) -> dict[str, Any]:
    """Every case through normalize_sync (and the naive all-reduce on float cases)."""
    out: dict[str, Any] = {"ours": [], "naive": []}
    for n, case in enumerate(cases):
        dtype, hidden, _, topology, leaf, accumulate, chunk = case
        sizes = case_sizes(case, world)
        x, w = make_input(n, rows, hidden, dtype)
        xs, ws = shard(x, sizes, rank), shard(w, sizes, rank)
        y = tgn.distributed.normalize_sync(
            xs, ws, hidden_size=hidden, topology=topology, leaf=leaf, accumulate=accumulate,
            chunk_size=chunk, shard_sizes=sizes if n % 2 else None,
        )
        out["ours"].append(y)
        out["naive"].append(tgn.distributed.naive_normalize_sync(xs, ws, hidden_size=hidden))
    return out


def run_extras(rank: int, world: int, hidden: int) -> dict[str, Any]:
    """The async variant, the module, and calls that must fail on every rank together."""
    sizes = tgn.distributed.even_shard_sizes(hidden, world)
    x, w = make_input(1234, 5, hidden, "float32")
    xs, ws = shard(x, sizes, rank), shard(w, sizes, rank)
    result: dict[str, Any] = {}
    result["async"] = anyio.run(functools.partial(
        tgn.distributed.normalize, xs, ws, hidden_size=hidden, topology="linear"))
    norm = tgn.distributed.RMSNorm(hidden, topology="tree", chunk_size=16)
    norm.load_full_weight(w)
    result["module"] = [norm(xs), norm(xs.unsqueeze(0)).squeeze(0)]
    errors = []
    for bad in ({"hidden_size": hidden + 1}, {"rows": rank}):
        try:
            x_bad = xs[: bad.get("rows", 5)]
            tgn.distributed.normalize_sync(x_bad, hidden_size=bad.get("hidden_size", hidden))
        except tgn.ShardMismatchError as exc:
            errors.append(str(exc))
    result["errors"] = errors
    return result


def run_group_checks(rank: int, world: int, cases: list[Case], rows: int,
                     extras_hidden: int) -> dict[str, Any]:
    """One spawned group, many checks: the matrix, then the extras."""
    return {"matrix": run_matrix(rank, world, cases, rows),
            "extras": run_extras(rank, world, extras_hidden)}


def die_before_collective(rank: int, world: int) -> None:
    """Rank 1 dies abruptly; the others block in a collective it never joins."""
    if rank == 1:
        os._exit(3)
    tgn.distributed.normalize_sync(torch.ones(2, 8), hidden_size=8 * world)
